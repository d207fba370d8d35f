"""The tuning protocol (docs/METHODS.md, "Tuning") on tiny runs of configs/demo.py:ms: validation classes
(disjoint, deterministic, covering the training classes, the test split never read), a study that
resumes to N trials in all, a failing trial, pruning fed by the trainer's periodic validation metric,
the search spaces of every component and variant, and compare --tuned (tests/compare_config.py)."""

import contextlib
import copy
import csv
import io
import os
import subprocess
import sys
import types

from absl import app
import numpy as np
import optuna
import pytest

from configs import default, demo, finetune
from mmsi_jax import (compare, config_check, config_cli, pretrain, reporting, run_record,
                      search_space, step, train, tune)
from mmsi_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = "tests/compare_config.py"  # Its variants, for compare --tuned.
CONFIG = "configs/demo.py:ms"  # The study's: with TINY, the runs of tests/test_train.py's tiny_config,
# whose compiled programs the test session shares (conftest.py).
TINY = ("--config.data.classes_per_batch=8", "--config.data.samples_per_class=4",
        "--config.data.eval_batch_size=600", "--config.model.widths=8,16", "--config.model.embed_dim=16",
        "--config.train.num_steps=4", "--config.train.log_every=2", "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2", "--config.optim.warmup_steps=2",
        "--config.optim.learning_rate=0.005", "--config.optim.schedule=constant",
        "--config.eval.nmi=false", "--config.eval.grid_queries=2", "--config.eval.grid_results=2")


def overrides(data_dir):
  return (f"--config.data.data_dir={data_dir}",)


@pytest.fixture(scope="module")
def study(glyphs_dir, tmp_path_factory):
  """A study of tiny runs of configs/demo.py:ms on the half-and-half split, in two sittings with a kill
  between them. --trials=2: the authors' settings, then a trial that fails. A trial left running, as a
  killed command leaves it, and a rival trial recorded as better at every evaluation. --trials=4, its
  median pruner starting after one trial: the authors' settings again (compiled already), pruned at its
  first evaluation. Records which splits were opened, and what the command printed."""
  workdir = str(tmp_path_factory.mktemp("tune"))
  protocol = tune.Protocol(CONFIG, overrides(glyphs_dir) + TINY, folds=1)
  config, _ = config_cli.resolve(CONFIG, protocol.overrides)
  opened, printed = [], io.StringIO()
  load_split, train_and_evaluate = pipeline.load_split, train.train_and_evaluate

  def recorded_load_split(name, split, *args, **kwargs):
    opened.append(split)
    return load_split(name, split, *args, **kwargs)

  def second_trial_fails(run_config, run_dir, on_evaluation):
    if os.sep + "trial_0001" + os.sep in run_dir:
      raise RuntimeError("a trial that fails")
    return train_and_evaluate(run_config, run_dir, on_evaluation)

  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
    patch.setattr(pipeline, "load_split", recorded_load_split)
    patch.setattr(train, "train_and_evaluate", second_trial_fails)
    patch.setitem(tune.PRUNERS, "median", lambda: optuna.pruners.MedianPruner(n_startup_trials=1))
    first = tune.run_study(config, protocol, workdir, trials=2)
    first_states = [t.state for t in first.trials]
    first.ask()  # Killed during this trial.
    first.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={2: 1.0, 4: 1.0}))
    first.enqueue_trial(first.trials[0].params)
    second = tune.run_study(config, protocol, workdir, trials=4)
  space, _ = tune.variant_space(config)
  return types.SimpleNamespace(
      workdir=workdir, directory=os.path.join(workdir, "ms"), protocol=protocol, config=config,
      space=space, first_states=first_states, trials=second.trials, opened=opened,
      printed=printed.getvalue())


def test_validation_folds_split_the_training_classes_and_the_test_split_is_never_read(glyphs_dir):
  classes = np.arange(100)
  folds = [pipeline.validation_fold(classes, 4, fold) for fold in range(4)]
  assert [len(f) for f in folds] == [25] * 4
  np.testing.assert_array_equal(np.concatenate(folds), classes)  # Disjoint, covering, contiguous.
  np.testing.assert_array_equal(pipeline.validation_fold(np.repeat(classes, 3)[::-1], 2, 1),
                                classes[50:])  # The second half, whatever the order of the labels.
  data = default.get_config().data
  data.data_dir = glyphs_dir
  opened = []
  load_split = pipeline.load_split

  def recorded_load_split(name, split, *args, **kwargs):
    opened.append(split)
    return load_split(name, split, *args, **kwargs)

  def class_ids(source):
    return np.array([r["class_id"] for r in source.__getitems__(list(range(len(source))))])

  all_train = class_ids(load_split("glyphs", "train", glyphs_dir, decode_images=False))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pipeline, "load_split", recorded_load_split)
    for num_folds, fold in ((2, 0), (4, 3)):
      data.validation.update(folds=num_folds, fold=fold)
      splits = pipeline.load_splits(data)
      assert splits.prefix == "validation"
      trained, evaluated = class_ids(splits.train), class_ids(splits.evaluation)
      held_out = pipeline.validation_fold(all_train, num_folds, fold)
      np.testing.assert_array_equal(np.unique(evaluated), held_out)
      assert not set(trained) & set(evaluated) and len(trained) + len(evaluated) == len(all_train)
      # Trained on labels 0 .. C - 1, in the order of the classes; evaluated with the classes' own.
      np.testing.assert_array_equal(splits.train_labels, np.unique(trained, return_inverse=True)[1])
      assert [r["label"] for r in splits.train.__getitems__(list(range(len(trained))))] == list(
          splits.train_labels)
      np.testing.assert_array_equal(class_ids(pipeline.load_splits(data).evaluation), evaluated)
  assert set(opened) == {"train"}  # The test split was never opened.
  data.validation.folds = 0
  assert pipeline.load_splits(data).prefix == "test"
  config = default.get_config()
  config.data.validation.folds = 1
  with pytest.raises(ValueError, match="data.validation.folds=1"):
    config_check.check_config(config)


def test_a_model_trained_on_the_training_classes_is_rebuilt_on_the_folds_training_classes(
    tmp_path, monkeypatch, capsys):
  """configs/finetune.py:mmsi_ms starts from the `ms` model of every training class: each fold starts
  from the `ms` recipe trained on its own training classes, built once (the training is recorded here,
  not run); a backbone pretrained on other classes, or a run without validation classes, is kept."""
  builds = []

  def recorded_training(config, workdir):
    builds.append((config.data.validation.to_dict(), config.data.name, workdir))
    os.makedirs(workdir)  # As the trainer makes it.

  monkeypatch.setattr(train, "train_and_evaluate", recorded_training)
  config = finetune.get_config("mmsi_ms")
  config.data.data_dir = str(tmp_path / "data")
  config.data.validation.update(folds=2, fold=1)
  assert pretrain.trained_on_run_dataset(config.init_from, config)
  directory = str(tmp_path / "study")
  for _ in range(2):  # Built once; then found.
    path = pretrain.for_validation(config.init_from, config, directory)
    assert path == os.path.join(directory, "validation_2_1", "glyphs_resnet18_ms")
  assert builds == [({"folds": 2, "fold": 1}, "glyphs", path)]
  assert pretrain.is_built(path, pretrain.recipe_of(path))
  assert f"{path} is missing: building it once" in capsys.readouterr().out
  backbone = config.model.pretrained  # Trained on the 1,000 pretraining glyphs: other classes.
  assert not pretrain.trained_on_run_dataset(backbone, config)
  assert pretrain.for_validation(backbone, config, directory) == backbone
  own_model = str(tmp_path / "runs" / "mine")
  assert pretrain.for_validation(own_model, config, directory) == own_model
  config.data.validation.folds = 0
  assert pretrain.for_validation(config.init_from, config, directory) == config.init_from
  assert len(builds) == 1


def test_a_study_resumes_to_n_trials_in_all_and_a_failing_trial_is_reported(study):
  assert study.first_states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
  assert [tune.state_name(t) for t in study.trials] == [
      "COMPLETE", "FAIL", "INTERRUPTED", "COMPLETE", "PRUNED"]
  assert len(tune.counted(study.trials)) == 4
  authors, failed = study.trials[:2]
  assert authors.user_attrs[tune.AUTHORS] and failed.user_attrs[tune.ERROR] == (
      "RuntimeError: a trial that fails")
  assert "Study ms" in study.printed and "0 of 2 trials done, 2 to run" in study.printed
  assert "3 of 4 trials done, 1 to run" in study.printed  # The interrupted trial does not count.
  assert "[tune ms] trial 1 FAILED: RuntimeError: a trial that fails" in study.printed
  assert f"trial 0 validation MAP@R {authors.value:.4f}" in study.printed
  assert "| best 1.0000 (trial 3) | 4/4 trials | ETA 0m00s" in study.printed
  # The authors' settings, the config's own, with the value the trainer gave.
  assert authors.params["loss.hparams.alpha"] == study.config.loss.hparams.alpha
  assert authors.params["optim.learning_rate"] == study.config.optim.learning_rate
  run_dir = os.path.join(study.directory, "trial_0000", "fold_0")
  records = reporting.read_metrics(run_dir)
  assert authors.value == authors.user_attrs["fold_0"] == records[-1]["validation/map@r"]
  assert not any(k.startswith("test/") for r in records for k in r)
  assert set(study.opened) == {"train"}  # The trials never opened the test split.
  assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
  with open(os.path.join(run_dir, tune.LOG_FILE)) as f:
    assert "Validation split glyphs/train fold 1/2 (50 classes) after 4 steps" in f.read()
  with open(os.path.join(study.directory, "trials.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "INTERRUPTED", "COMPLETE", "PRUNED"]
  assert rows[0]["note"] == "authors' settings" and "a trial that fails" in rows[1]["note"]
  assert float(rows[0]["map@r"]) == pytest.approx(authors.value)
  assert {"optim.learning_rate", "loss.hparams.beta"} <= set(rows[0])
  for name in ("trials.md", "optimization_history.png", "param_importances.png", "study.db",
               search_space.TUNED_CONFIG):
    assert os.path.getsize(os.path.join(study.directory, name)) > 0


def test_the_same_command_continues_the_study_and_refuses_another_protocol(study):
  command = [sys.executable, "-m", "mmsi_jax.tune", f"--config={CONFIG}", "--trials=4",
             f"--workdir={study.workdir}", "--folds=1", *study.protocol.overrides]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert "4 of 4 trials done, 0 to run" in result.stdout and "best: trial 3" in result.stdout
  assert len(optuna.load_study(study_name="ms", storage=f"sqlite:///{study.directory}/study.db").trials) \
      == 5
  other = tune.Protocol(CONFIG, study.protocol.overrides, folds=4)
  with pytest.raises(app.UsageError, match="holds a study of another protocol"):
    tune.open_study(study.directory, "ms", other, "median", trials=4)


def test_pruning_reads_the_trainers_periodic_validation_metric(study):
  trial = study.trials[4]  # The authors' settings against a rival that was better at every step.
  assert trial.params == study.trials[0].params
  assert "fold 0 at step 2" in trial.user_attrs[tune.PRUNED]
  run_dir = os.path.join(study.directory, "trial_0004", "fold_0")
  records = reporting.read_metrics(run_dir)
  assert max(r["step"] for r in records) == 2  # Stopped at its first evaluation, of a 4-step run.
  assert trial.intermediate_values == {2: records[-1]["validation/map@r"]}
  assert study.trials[0].intermediate_values[2] == records[-1]["validation/map@r"]
  assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
  assert "[tune ms] trial 4 pruned (fold 0 at step 2, validation MAP@R" in study.printed


def registries():
  """(kind, name, registry) of every registered component a config selects (config_cli.COMPONENTS)."""
  for kind in config_cli.COMPONENTS:
    for name in kind.names():
      registry = kind.registry_of(name)
      if registry is not None:
        yield kind, name, registry


def test_every_component_declares_its_space_of_its_own_settings():
  config = default.get_config()
  for kind, name, registry in registries():
    space = search_space.declared(registry.get(name))
    assert space is not None, f"{registry.kind} {name} declares no search space"
    defaults = registry.setting_defaults(name, kind.context)
    for setting, param in space.items():
      assert setting in defaults, f"{registry.kind} {name}: {setting} is not one of its settings"
      path = f"{kind.settings_of(name)}.{setting}"
      try:
        value = search_space.lookup(config, path)
      except KeyError:  # A loss's setting left to its default by configs/default.py.
        assert kind.name_key == "loss.name", f"{path} is not in configs/default.py"
        value = defaults[setting]
      expected = int if isinstance(param, (search_space.Int, search_space.ShareOfRun)) else float
      assert type(value) is expected, f"{path}: {value!r} is not a {expected.__name__}"
  assert set(step.OPTIMIZER_SPACE) == {"optim.learning_rate"}


@pytest.mark.parametrize("module", [demo, finetune])
def test_each_variant_tunes_its_components_settings_around_its_authors_values(module):
  sampler = optuna.samplers.RandomSampler(seed=0)
  for variant in (v for v in module.VARIANTS if v):
    config = module.get_config(variant)
    space, authors = tune.variant_space(config)
    draws = optuna.create_study(sampler=sampler)
    draws.enqueue_trial({p: space[p].recorded(v, config) for p, v in authors.items()})
    for trial in (draws.ask(), draws.ask()):  # The authors' settings, then a random draw.
      settings = {p: param.setting(param.suggest(trial, p, config)) for p, param in space.items()}
      tried = copy.deepcopy(config)
      search_space.apply(tried, settings)
      config_check.check_config(tried)  # Every draw is a config that runs.
      for path, param in space.items():
        value = search_space.lookup(tried, path)
        record = param.recorded(value, tried)
        if isinstance(param, search_space.Around):
          base = search_space.lookup(config, path)
          low, high = base / param.factor, base * param.factor
        else:
          low, high = param.low, param.high
        assert low <= record <= high, f"{variant}: {path}={value} outside [{low}, {high}]"
        assert type(value) is type(authors[path]), f"{variant}: {path}={value!r}"
  spaces = {v: set(tune.variant_space(module.get_config(v))[0]) for v in (
      "mmsi_ms", "xbm_ms", "memvir_proxy_nca", "osm_caa", "smart_mining")}
  assert spaces["mmsi_ms"] == {"optim.learning_rate", "loss.hparams.alpha", "loss.hparams.beta",
                               "loss.hparams.base", "loss.hparams.epsilon",
                               "miner.mmsi.net_learning_rate", "miner.mmsi.memory_size"}
  assert {"references.xbm.size", "references.xbm.start_step"} < spaces["xbm_ms"]
  assert spaces["memvir_proxy_nca"] == {"optim.learning_rate", "loss.hparams.scale",
                                        "references.memvir.num_steps", "references.memvir.step_gap",
                                        "references.memvir.warmup_steps"}
  assert {"miner.osm_caa.pos_sigma", "miner.osm_caa.attention_sigma", "loss.hparams.margin"} < \
      spaces["osm_caa"]
  assert "data.smart_mining.target_error" in spaces["smart_mining"]


def test_a_share_of_the_run_follows_its_length():
  shortened = tune.Protocol("configs/demo.py:xbm_ms", ("--config.train.num_steps=200",), folds=1)
  config, _ = config_cli.resolve(shortened.config, shortened.overrides)
  space, authors = tune.variant_space(config)
  # The authors' start, step 400 of their 800, is half the run, also of a trial shortened to 200 steps.
  assert tune.authors_params(space, authors, config, shortened)["references.xbm.start_step"] == 0.5
  config = demo.get_config("xbm_ms")
  search_space.apply(config, {"references.xbm.start_step": search_space.Share(0.25)})
  assert config.references.xbm.start_step == 200
  config_cli.apply_overrides(config, ["--config.train.num_steps=400"])
  assert config.references.xbm.start_step == 100


def tuned_study(directory, config_spec, data_dir, winner_is_authors):
  """A study of two finished trials in `directory`, the authors' settings and others (alpha or margin
  and the learning rate changed), with the tuned config it leaves."""
  protocol = tune.Protocol(config_spec, overrides(data_dir), folds=1)
  config, _ = config_cli.resolve(config_spec, protocol.overrides)
  space, authors = tune.variant_space(config)
  recorded = {p: space[p].recorded(v, config) for p, v in authors.items()}
  changed = {**recorded, "optim.learning_rate": 0.004}
  changed.update({p: 0.7 for p in space if p.startswith("loss.hparams.") and p.endswith(
      ("alpha", "neg_margin"))})
  values = (0.5, 0.4) if winner_is_authors else (0.3, 0.4)
  trials = optuna.create_study(direction="maximize")
  for params, value, attrs in ((recorded, values[0], {tune.AUTHORS: True}), (changed, values[1], {})):
    trials.enqueue_trial(params, user_attrs=attrs)
    trial = trials.ask()
    for path, param in space.items():
      param.suggest(trial, path, config)
    trials.tell(trial, value)
  os.makedirs(directory)
  return tune.write_tuned_config(trials.trials, space, protocol, directory)


def test_compare_runs_each_variant_with_its_tuned_settings_beside_its_authors(glyphs_dir, tmp_path,
                                                                            capsys):
  tuned_dir = str(tmp_path / "tune")
  path = tuned_study(os.path.join(tuned_dir, "ms"), f"{CONFIG_FILE}:ms", glyphs_dir,
                     winner_is_authors=False)
  tuned_study(os.path.join(tuned_dir, "contrastive"), f"{CONFIG_FILE}:contrastive", glyphs_dir,
              winner_is_authors=True)
  variants = ["ms", "contrastive", "broken"]
  studies = compare.tuned_studies(tuned_dir, variants)
  printed = capsys.readouterr().out
  assert "broken: no tuned settings" in printed and "runs its authors' settings alone" in printed
  assert "contrastive: its study found its authors' settings best" in printed
  workdir = str(tmp_path / "compare")
  configs, runs = compare.make_runs(CONFIG_FILE, variants, [0, 1], list(overrides(glyphs_dir)), workdir,
                                    studies)
  assert list(configs) == ["ms", "contrastive", "broken", "ms (tuned)"]
  # The tuned row is the authors' config with the study's settings, as the trainer reads the file.
  tuned, authors = configs["ms (tuned)"], configs["ms"]
  assert tuned.loss.hparams.alpha == 0.7 and tuned.optim.learning_rate == 0.004
  differences = run_record.differences(run_record.flat_config(authors), tuned)
  assert differences == [("loss.hparams.alpha", 2.0, 0.7),
                         ("optim.learning_rate", authors.optim.learning_rate, 0.004)]
  assert authors.optim.learning_rate != 0.004
  tuned_runs = [r for r in runs if r.variant == "ms (tuned)"]
  assert [(r.seed, r.config.seed, r.config_spec) for r in tuned_runs] == [(0, 0, path), (1, 1, path)]
  assert tuned_runs[1].workdir == os.path.join(workdir, "ms_tuned", "seed_1")
  assert tuned_runs[0].config.data.data_dir == glyphs_dir and tuned_runs[0].config.data.validation.folds == 0
  assert config_cli.resolve(path, overrides(glyphs_dir))[0].loss.hparams.alpha == 0.7

  for run in runs:  # Finished runs, as their metrics.jsonl shows them.
    os.makedirs(run.workdir)
    score = 0.5 + 0.1 * (run.variant == "ms (tuned)") + 0.01 * run.seed
    with open(os.path.join(run.workdir, reporting.METRICS_FILE), "w") as f:
      f.write(f'{{"step": {run.num_steps}, "test/map@r": {score}, "test/recall@1": {score}}}\n')
  lines = compare.tuned_table(compare.summarize(runs, configs), variants, studies, tuned_dir)
  rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
  assert ("learning_rate 0.004, alpha 0.7, beta 50, base 0.5, epsilon 0.1 (trial 1) | 0.3000 | 0.4000 | "
          "0.5050 ± 0.0071 | 0.6050 ± 0.0071") in rows["ms"]
  assert "the authors' (trial 0) | 0.5000 | 0.5000 | 0.5050 ± 0.0071 | 0.5050 ± 0.0071" in \
      rows["contrastive"]
  assert "none: no study |  |  | 0.5050 ± 0.0071 |  |" in rows["broken"]
  # Does each method help: authors' against authors', tuned against tuned (the authors' settings where
  # the study found them best, where there is no study).
  lines = compare.verdict_table(runs, variants, {"contrastive": "ms", "broken": "contrastive"}, studies,
                                margin=0.005)
  rows = [line for line in lines if line.startswith("| contrastive") or line.startswith("| broken")]
  assert [row.split(" | ")[2] for row in rows] == [
      "authors' / authors'", "tuned: the authors' / tuned", "authors' / authors'",
      "authors' (no study) / tuned: the authors'"]
  assert rows[1].endswith("| 0.5050 ± 0.0071 | 0.6050 ± 0.0071 | -0.1000 [-0.1304, -0.0696] | "
                          "does not help (worse) |")
  assert all(row.endswith("| cannot tell |") for row in rows[::2] + rows[3:])
