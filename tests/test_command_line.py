"""The command line as a user meets it: a workdir keeps its run, a component is chosen with one flag,
a config error comes before any work and names its key, and Ctrl-C says how to resume."""

import json
import os
import signal
import subprocess
import sys

import jax
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mmsi_jax import checkpointing, config_check, config_cli, reporting, run_record, step, train
from mmsi_jax.bench._steps import random_batch
from tests.test_train import REPO, tiny_config

# The trainer's heavy libraries: a config error must come before any of them loads (seconds of start).
_TRAINER_LIBRARIES = ("tensorflow_datasets", "grain", "orbax", "matplotlib")
# `python -m mmsi_jax.main ARGS`, then the trainer libraries it loaded, on stderr.
_MAIN_REPORTING_IMPORTS = (
    "import runpy, sys\n"
    "sys.argv = ['mmsi_jax.main', *sys.argv[1:]]\n"
    "try:\n"
    "  runpy.run_module('mmsi_jax.main', run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    f"  loaded = {{m.split('.')[0] for m in sys.modules}} & set({_TRAINER_LIBRARIES})\n"
    "  print('trainer libraries loaded:', sorted(loaded), file=sys.stderr)\n")

CONFIG_ERRORS = {  # Case: (overrides, what the error says).
    "tuple": (["--config.eval.ks=1,2,x"],
              "--config.eval.ks=1,2,x: eval.ks takes a tuple of integers, e.g. "
              "--config.eval.ks=1,2,4,8."),
    "integer": (["--config.train.num_steps=abc"],
                "train.num_steps takes an integer, e.g. --config.train.num_steps=800."),
    "refused_value": (["--config.loss.name=triplet", "--config.loss.hparams.mining=hardest"],
                      "loss.hparams.mining='hardest' is refused by the pair loss 'triplet': "
                      "mining='hardest' is not one of ('all', 'hard', 'semihard')."),
    "alias": (["--config.optim.lr=0.1"], "did you mean --config.optim.learning_rate?"),
    "alias_wd": (["--config.optim.wd=0.1"], "did you mean --config.optim.weight_decay?"),
    "spelling": (["--config.train.num_stepz=5"], "did you mean --config.train.num_steps?"),
    "component_setting": (["--config.references.xbm.sise=5"],
                          "(references.xbm holds the settings of the references 'xbm'); did you "
                          "mean --config.references.xbm.size?"),
    "warmup": (["--config.optim.warmup_steps=800"],
               "optim.warmup_steps=800 must be in [0, train.num_steps=800): lower "
               "--config.optim.warmup_steps or raise --config.train.num_steps."),
    "component_name": (["--config.loss.name=lifted_structur"],
                       "did you mean --config.loss.name=lifted_structure?"),
    "setting_of_the_old_component": (
        ["--config.model.name=resnet18", "--config.model.widths=8,16"],
        "unknown config key 'model.widths' (model holds the settings of the model 'resnet18')"),
    "references_of_the_other_kind": (
        ["--config.references.name=proxies"],
        "loss.name='multi_similarity' is a pair loss, which references.name='proxies' does not "
        "serve: use one of ['batch', 'triplets', 'xbm']."),
}


@pytest.fixture(scope="module")
def config_error_runs(tmp_path_factory):
  """{case: (workdir, data_dir, completed process)}, the commands run side by side."""
  root = tmp_path_factory.mktemp("config_errors")
  started = {}
  for case, (overrides, _) in CONFIG_ERRORS.items():
    workdir, data_dir = root / case / "run", root / case / "data"
    started[case] = (workdir, data_dir, subprocess.Popen(
        [sys.executable, "-c", _MAIN_REPORTING_IMPORTS, "--config=configs/demo.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  runs = {}
  for case, (workdir, data_dir, process) in started.items():
    stdout, stderr = process.communicate(timeout=300)
    runs[case] = workdir, data_dir, subprocess.CompletedProcess(process.args, process.returncode,
                                                                 stdout, stderr)
  return runs


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_a_config_error_names_its_key_before_any_work(config_error_runs, case):
  workdir, data_dir, result = config_error_runs[case]
  assert result.returncode == 1, result.stderr
  assert CONFIG_ERRORS[case][1] in result.stderr, result.stderr
  assert "Traceback" not in result.stderr
  # Reported before the dataset, the workdir or the trainer's libraries: within seconds.
  assert "trainer libraries loaded: []" in result.stderr
  assert not workdir.exists() and not data_dir.exists()


# ---------------------------------------------------------------------------------------------------
# A workdir belongs to one run.

def switched(config, *overrides):
  """`config` with command-line overrides applied, as `python -m mmsi_jax.main` applies them."""
  config = config.copy_and_resolve_references()
  config_cli.apply_overrides(config, overrides)
  return config


def test_a_workdir_refuses_another_config_and_resumes_its_own_for_more_steps(glyphs_dir, tmp_path,
                                                                            capsys):
  workdir = str(tmp_path / "run")
  config = tiny_config(glyphs_dir, num_steps=10)
  train.train_and_evaluate(config, workdir)
  config_file = os.path.join(workdir, run_record.CONFIG_FILE)
  with open(config_file, "rb") as f:
    recorded = f.read()
  records = reporting.read_metrics(workdir)

  # Another loss, of the same kind or the other one: refused before any work, naming the keys.
  for overrides, named in [
      (["--config.loss.name=contrastive"], [
          '  loss.name: "multi_similarity" in the run, "contrastive" now',
          "  loss.hparams.alpha: 2.0 in the run, absent now"]),
      (["--config.loss.name=proxy_anchor"], [
          '  loss.name: "multi_similarity" in the run, "proxy_anchor" now',
          '  references.name: "batch" in the run, "proxies" now'])]:
    with pytest.raises(run_record.WorkdirInUseError) as refusal:
      train.train_and_evaluate(switched(config, *overrides), workdir)
    message = str(refusal.value)
    assert message.startswith(f"{workdir} holds another run"), message
    for line in named:
      assert line in message.splitlines(), message
    assert "Pass another --workdir for a new run, or the config the run was made with" in message
    assert "train.num_steps" in message  # The keys that may change.
  # A start that fails (here the weights to start from are missing) changes nothing either.
  with pytest.raises(FileNotFoundError, match="no such directory"):
    train.train_and_evaluate(switched(config, f"--config.init_from={tmp_path / 'none'}"), workdir)
  with open(config_file, "rb") as f:
    assert f.read() == recorded
  assert reporting.read_metrics(workdir) == records
  # A new workdir whose start fails keeps no record: it is no run's.
  with pytest.raises(FileNotFoundError, match="no such directory"):
    train.train_and_evaluate(switched(config, f"--config.init_from={tmp_path / 'none'}"),
                             str(tmp_path / "never_started"))
  assert not os.path.exists(tmp_path / "never_started" / run_record.CONFIG_FILE)

  # More steps, other evaluation and logging cadences: the same run, resumed.
  capsys.readouterr()
  train.train_and_evaluate(
      switched(config, "--config.train.num_steps=20", "--config.train.eval_every=20",
               "--config.eval.nmi=true"), workdir)
  printed = capsys.readouterr().out
  assert "Resuming at step 10 of 20" in printed
  assert ("Changed since the run started (allowed on resume):\n"
          "  eval.nmi: false in the run, true now\n"
          "  train.eval_every: 10 in the run, 20 now\n"
          "  train.num_steps: 10 in the run, 20 now\n") in printed
  with open(config_file, "rb") as f:
    assert f.read() == recorded  # Written once, when the run started.
  records = reporting.read_metrics(workdir)
  assert len([r for r in records if "baseline/recall@1" in r]) == 1
  assert [r["step"] for r in records if "train/loss" in r] == [5, 10, 15, 20]
  assert [r["step"] for r in records if "test/recall@1" in r] == [10, 20]
  evaluations = [r for r in records if "test/recall@1" in r]
  assert "test/nmi" not in evaluations[0] and "test/nmi" in evaluations[1]
  # The learning rate of each logged step (constant after 2 warm-up steps); TensorBoard has the same
  # scalars, the evaluation figures and the run's settings.
  assert [r["train/learning_rate"] for r in records if "train/loss" in r] == pytest.approx([5e-3] * 4)
  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={"images": 0})
  accumulator.Reload()
  assert [e.step for e in accumulator.Scalars("baseline/recall_1")] == [0]  # Its "@" is spelt "_".
  assert [e.step for e in accumulator.Scalars("train/learning_rate")] == [5, 10, 15, 20]
  assert {tag: [e.step for e in accumulator.Images(tag)] for tag in accumulator.Tags()["images"]} == {
      "baseline/retrieval_grid": [0], "baseline/recall_at_k": [0], "test/retrieval_grid": [10, 20],
      "test/recall_at_k": [10, 20]}
  start_info = plugin_data_pb2.HParamsPluginData.FromString(
      accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
  assert start_info.hparams["loss.name"].string_value == "multi_similarity"
  assert start_info.hparams["train.num_steps"].number_value == 10


# ---------------------------------------------------------------------------------------------------
# A component chosen by name.

SWITCHES = [(kind.name_key, name) for kind in config_cli.COMPONENTS for name in kind.names()]


@pytest.mark.parametrize("key, name", SWITCHES, ids=[f"{k}={n}" for k, n in SWITCHES])
def test_every_component_is_chosen_with_one_flag(key, name):
  """On the demo config: a runnable config whose train step traces (shapes only: compiling the
  ResNet-50 and BN-Inception steps alone takes over a minute on 2 cores), or (a component that does
  not fit the demo's loss or batches) a refusal that names what to change. Every loss chosen this way
  also trains 30 steps (tests/test_step.py)."""
  config, notes = config_cli.resolve("configs/demo.py", [f"--config.{key}={name}"])
  kind = next(kind for kind in config_cli.COMPONENTS if kind.name_key == key)
  registry = kind.registry_of(name)
  if registry is not None:  # The settings left are the new component's own: its factory takes them.
    parent, _, block = kind.settings_of(name).rpartition(".")
    settings = (config[parent] if parent else config).get(block, {})
    defaults = registry.setting_defaults(name, kind.context)
    assert set(settings) - {"name"} <= set(defaults), (settings, defaults)
  if key in ("references.name", "data.batch_policy") and name in ("memvir", "proxies", "triplets"):
    with pytest.raises(ValueError, match="use one of|does not deliver"):
      config_check.check_config(config)
    return
  config_check.check_config(config)
  components = step.build(config, num_classes=100)
  batch = random_batch(components, 32, config.data.classes_per_batch, config.data.samples_per_class)
  state = jax.eval_shape(lambda rng: step.create_train_state(rng, components, (32, 32, 3)),
                         jax.random.PRNGKey(0))  # Shapes only: nothing is initialised or compiled.
  new_state, metrics = jax.eval_shape(step.make_train_step(components), state, batch)
  assert metrics["train/loss"].shape == ()
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  if key == "loss.name" and name != "multi_similarity":
    assert any(note.startswith(f"loss.name={name!r} (the config's was 'multi_similarity') starts "
                               f"from its own defaults: dropped loss.hparams alpha=2.0") for note in notes)


def test_a_switched_loss_trains_from_the_command_line_and_ctrl_c_says_how_to_resume(glyphs_dir,
                                                                                   tmp_path):
  workdir = tmp_path / "run"
  # The child takes Ctrl-C's default action even where this test runs in the background, which
  # ignores SIGINT (an ignored signal stays ignored in a child; a handler does not carry over).
  ignoring = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    run = subprocess.Popen(
        [sys.executable, "-m", "mmsi_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.loss.name=lifted_structure", f"--config.data.data_dir={glyphs_dir}",
         "--config.train.num_steps=1000", "--config.train.log_every=5",
         "--config.train.checkpoint_every=5", "--config.optim.warmup_steps=0",
         # The small model and evaluation of the other tests: programs compiled once, and the raw-pixel
         # baseline (without NMI's k-means) that they stored.
         "--config.model.widths=8,16", "--config.model.embed_dim=16",
         "--config.data.classes_per_batch=8", "--config.data.eval_batch_size=600",
         "--config.eval.nmi=false"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  finally:
    signal.signal(signal.SIGINT, ignoring)
  printed = []
  for line in run.stdout:  # Interrupted once step 10 is logged (and its checkpoint under way).
    printed.append(line)
    if line.startswith("step   10/1000"):
      run.send_signal(signal.SIGINT)
      break
  stdout, stderr = run.communicate(timeout=120)
  printed = "".join(printed) + stdout
  assert printed.startswith(
      "Note: loss.name='lifted_structure' (the config's was 'multi_similarity') starts from its own "
      "defaults: dropped loss.hparams alpha=2.0, base=0.5, beta=50.0, epsilon=0.1, prefactor=1.0.\n"
  ), printed
  assert run.returncode == 130, stderr
  assert "Traceback" not in stderr, stderr  # Neither ours nor that of a checkpoint cut short.
  # The step in flight is saved (step 10's line was printed), and the message names it.
  last = checkpointing.latest_step(str(workdir))
  assert last >= 10
  assert stderr.strip().endswith(
      f"Stopped after step {last} (Ctrl-C); its checkpoint is in {workdir / 'checkpoints'}: the same "
      f"command resumes from it."), stderr
  assert not [name for name in os.listdir(workdir / "checkpoints") if "tmp" in name]
  records = reporting.read_metrics(str(workdir))
  assert [r["step"] for r in records if "train/loss" in r][:2] == [5, 10]
  with open(workdir / run_record.CONFIG_FILE) as f:
    assert json.load(f)["loss"] == {"name": "lifted_structure", "hparams": {}}


def test_ctrl_c_while_a_checkpoint_starts_takes_effect_after_it():
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Also when run in the background.
  try:
    reached = []
    with pytest.raises(KeyboardInterrupt):
      with checkpointing.interrupt_after():
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("end of the block")
    assert reached == ["end of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with checkpointing.interrupt_after():  # No Ctrl-C: nothing raised.
      reached.append("again")
    assert reached[-1] == "again"
  finally:
    signal.signal(signal.SIGINT, previous)
