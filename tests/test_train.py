"""The train loop end to end on the built-in dataset: learning, outputs, exact resume and errors."""

import os
import signal
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import demo
from mmsi_jax import losses, reporting, stopping, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, num_steps=20, miner="none"):
  config = demo.get_config()
  config.miner.name = miner
  config.miner.mmsi.wait_for_coverage = False
  config.miner.mmsi.warmup_steps = 4
  config.data.data_dir = data_dir
  config.data.classes_per_batch = 8
  config.data.samples_per_class = 4
  config.data.eval_batch_size = 600
  config.eval.nmi = False  # Its k-means costs more than the rest of an evaluation: on where tested.
  config.model.widths = (8, 16)
  config.model.embed_dim = 16
  config.train.num_steps = num_steps
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.checkpoint_every = 10
  config.optim.warmup_steps = 2
  config.optim.learning_rate = 5e-3
  config.optim.schedule = "constant"
  return config


def latest_params(workdir):
  """(step, state as a tree of arrays) of the latest checkpoint, restored onto this process's device."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                              item_handlers=ocp.StandardCheckpointHandler())
  step = mngr.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        mngr.item_metadata(step))
  return step, mngr.restore(step, args=ocp.args.StandardRestore(target))


@pytest.fixture(scope="module")
def tiny_run(glyphs_dir, tmp_path_factory):
  """(workdir, final metrics) of one finished tiny_config run of 20 steps, shared by the tests that
  only read it."""
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  return workdir, train.train_and_evaluate(tiny_config(glyphs_dir), workdir)


def test_short_run_learns_and_writes_its_outputs(tiny_run):
  workdir, final = tiny_run
  records = reporting.read_metrics(workdir)
  train_losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert [r["step"] for r in records if "train/loss" in r] == [5, 10, 15, 20]
  assert train_losses[-1] < train_losses[0]
  baseline = [r for r in records if "baseline/recall@1" in r]
  assert len(baseline) == 1 and {"baseline/map@r"} <= set(baseline[0])
  evals = [r for r in records if "test/recall@1" in r]
  assert [r["step"] for r in evals] == [10, 20]
  for key in ("test/recall@1", "test/recall@2", "test/recall@4", "test/recall@8", "test/map@r"):
    assert 0.0 <= evals[-1][key] <= 1.0
  assert final["test/recall@1"] == evals[-1]["test/recall@1"]
  # Even 20 tiny steps beat raw pixels, which retrieve poorly on this dataset.
  assert baseline[0]["baseline/recall@1"] < 0.5
  assert final["test/recall@1"] > baseline[0]["baseline/recall@1"]
  # The step time, apart from the metrics: every log interval, the first one with the compilation.
  timing = reporting.read_timing(workdir)
  assert [(r["step"], r["steps"], r["compiling"]) for r in timing] == [
      (5, 5, True), (10, 5, False), (15, 5, False), (20, 5, False)]
  assert all(r["seconds"] > 0 for r in timing)
  # TensorBoard reads the events without TensorFlow.
  accumulator = event_accumulator.EventAccumulator(workdir)
  accumulator.Reload()
  assert [e.step for e in accumulator.Scalars("train/loss")] == [5, 10, 15, 20]
  assert "tensorflow" not in sys.modules


def method_config(data_dir, method):
  """tiny_config with a method: "mmsi_xbm" (MMSI weighting the pairs of MS over the batch and XBM's
  memory of 100 slots from step 4), "memvir" (NormSoftmax with MemVir's queues from step
  4, N 2, M 2, in random batches, its proxies at 10x, over blocks of 16 classes, the 100 classes padded
  to 102 for 3 class shards: the trainer's sharded path, on one device here), "osm_caa" or
  "smart_mining" (batches of 8
  triplets mined anew every 10 steps, the ratio triplet and global loss)."""
  config = tiny_config(data_dir, miner="mmsi" if method == "mmsi_xbm" else "none")
  if method == "mmsi_xbm":  # With MS, whose pair weights vary (a contrastive loss's are constant).
    config.references.name = "xbm"
    config.references.xbm.update(size=100, start_step=4)
  elif method == "memvir":
    config.loss = ml_collections.ConfigDict(dict(name="norm_softmax", hparams={}))
    config.references.name = "memvir"
    config.references.memvir.update(num_steps=2, step_gap=2, warmup_steps=4, class_block=16,
                                    class_shards=3)
    config.optim.lr_mults.proxies = 10.0
    config.data.sampler = "random"
  elif method == "osm_caa":  # With its classifier, SGD, a step schedule and 10% of the labels shuffled.
    config = demo.osm_config(config, attention=True)
    config.optim.update(name="sgd", learning_rate=0.05, schedule="step", step_boundaries=(12,))
    config.data.label_noise = 0.1
  elif method == "smart_mining":
    config.loss = ml_collections.ConfigDict(dict(name="ratio_triplet_global", hparams={}))
    config.references.name = "triplets"
    config.data.batch_policy = "smart_mining"
    config.data.smart_mining.update(triplets_per_batch=8, refresh_every=10, start_epoch=0,
                                    kappa=1.0, neighbors=16)
  return config


# Every method's state on top of the plain run's (parameters, Adam or SGD state, BatchNorm statistics,
# rng, data position): a plain-loss case would add nothing that these do not check. MMSI and XBM in one
# run (their composition); MemVir's proxies with their optimizer state stand for every proxy loss's.
@pytest.mark.parametrize("method", ["mmsi_xbm", "memvir", "osm_caa", "smart_mining"])
def test_resume_after_a_kill_equals_an_uninterrupted_run_bitwise(glyphs_dir, tmp_path, monkeypatch,
                                                                  method):
  config = method_config(glyphs_dir, method)
  straight = str(tmp_path / "straight")
  final = train.train_and_evaluate(config, straight)
  records = reporting.read_metrics(straight)
  # It learns, with every method (XBM's total grows as its memory fills: its batch term falls). Smart
  # Mining's triplets are mined harder as the model learns, so that its loss need not fall; the demo
  # shows what it learns (docs/BENCHMARKS.md).
  tracked = "xbm/batch_loss" if method == "mmsi_xbm" else "train/loss"
  train_losses = [r[tracked] for r in records if tracked in r]
  assert method == "smart_mining" or train_losses[-1] < train_losses[0]
  # 20 tiny steps show each of the 100 proxies about 6 samples: too few. OSM + CAA's 20 SGD steps on
  # noisy labels go mostly to its 100-class classifier. Smart Mining's triplets: see above.
  if method == "mmsi_xbm":  # Meta-weighting was on after the warm-up, with non-uniform weights.
    assert final["test/recall@1"] > final["baseline/recall@1"]
    np.testing.assert_allclose([r["mmsi/ready"] for r in records if "mmsi/ready" in r], [0.2, 1, 1, 1])
    assert records[-2]["mmsi/pos_weight"] != 1.0
  if method == "smart_mining":  # Refreshed before steps 1 and 11 (the resume below is at 10).
    refreshes = [r for r in records if "batches/mined" in r]
    assert [r["step"] for r in refreshes] == [1, 11]
    assert all(r["batches/mined"] > 0.2 for r in refreshes)
    assert refreshes[0]["batches/kappa"] != refreshes[1]["batches/kappa"]  # The controller moved it.

  killed = str(tmp_path / "killed")
  real_make_train_step = train.make_train_step

  def make_dying_train_step(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)
    calls = []

    def dying(state, batch):
      calls.append(1)
      if len(calls) == 17:  # Killed after the step-10 checkpoint and the step-15 log line.
        raise KeyboardInterrupt
      return step_fn(state, batch)
    return dying

  monkeypatch.setattr(train, "make_train_step", make_dying_train_step)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, killed)
  monkeypatch.setattr(train, "make_train_step", real_make_train_step)
  assert max(r["step"] for r in reporting.read_metrics(killed)) == 15
  # A checkpoint half-written by the kill: a temporary directory with partial content.
  partial = os.path.join(killed, "checkpoints", "15.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(partial, "default"))
  with open(os.path.join(partial, "default", "junk"), "wb") as f:
    f.write(b"\x00" * 100)

  train.train_and_evaluate(config, killed)
  assert reporting.read_metrics(killed) == reporting.read_metrics(straight)
  # The timing of the killed start up to its checkpoint, then the resumed start's, compiling again.
  assert [(r["step"], r["compiling"]) for r in reporting.read_timing(killed)] == [
      (5, True), (10, False), (15, True), (20, False)]
  step_a, state_a = latest_params(straight)
  step_b, state_b = latest_params(killed)
  assert step_a == step_b == 20
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)
  if method == "mmsi_xbm":  # MMSI's dictionary and XBM's memory are part of the checkpoint.
    memory = state_b["miner"]["memory"]
    assert 8 < np.asarray(memory["valid"]).sum() <= 100  # One slot per class seen (of 100).
    assert np.asarray(state_b["references"]["valid"]).all()  # Full after 16 steps of 32 from step 4.
    assert int(state_b["references"]["heads"][0]) == 16 * 32
  if method == "smart_mining":  # And the batch policy's last period and its controller.
    assert int(state_b["batches"]["first_step"]) == 10
    assert int(state_b["batches"]["controller"]["count"]) == 2
  if method == "memvir":  # And MemVir's queues (16 steps pushed from step 4, the ring of 7 wrapped),
    queues = state_b["references"]  # its proxies and their Adam moments (compared above).
    assert int(queues["pushed"]) == 16 and queues["proxies"].shape == (7, 102, 16)
    assert records[-2]["memvir/classes"] == 300
    assert state_b["params"]["proxies"].shape == (102, 16)
    np.testing.assert_array_equal(state_b["params"]["proxies"][100:], 0)  # The padding is no class.
  if method == "osm_caa":  # And the classifier (features -> 100 classes), with its SGD momentum.
    kernel_shape = state_b["params"]["classifier"]["features"]["kernel"].shape
    assert kernel_shape[1] == 100
    momenta = [leaf for leaf in jax.tree.leaves(state_b["opt_state"]) if np.shape(leaf) == kernel_shape]
    assert len(momenta) == 1 and np.any(np.asarray(momenta[0]) != 0)
  assert not os.path.exists(partial)


def test_sigterm_saves_the_step_in_flight_and_the_resumed_run_equals_an_uninterrupted_one(
    glyphs_dir, tmp_path, monkeypatch, tiny_run):
  """SIGTERM during step 13, between the checkpoint of step 10 and the log line of step 15: step 13 is
  saved, with the metrics of steps 11-13 for the resumed run's line of step 15."""
  workdir = str(tmp_path / "run")
  real_make_train_step = train.make_train_step

  def make_signalled_train_step(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)
    calls = []

    def signalled(state, batch):
      calls.append(1)
      if len(calls) == 13:
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(state, batch)
    return signalled

  monkeypatch.setattr(train, "make_train_step", make_signalled_train_step)
  with stopping.StopSignals(distributed=False) as stop, pytest.raises(stopping.Stopped) as stopped:
    train.train_and_evaluate(tiny_config(glyphs_dir), workdir, stop=stop)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Restored after the first signal.
  assert (stopped.value.step, stopped.value.status) == (13, stopping.PREEMPTED)
  assert str(stopped.value) == (f"Stopped after step 13 (SIGTERM); its checkpoint is in "
                                f"{os.path.join(workdir, 'checkpoints')}: the same command resumes "
                                f"from it.")
  assert latest_params(workdir)[0] == 13
  assert max(r["step"] for r in reporting.read_metrics(workdir)) == 10
  monkeypatch.setattr(train, "make_train_step", real_make_train_step)

  train.train_and_evaluate(tiny_config(glyphs_dir), workdir)
  assert reporting.read_metrics(workdir) == reporting.read_metrics(tiny_run[0])
  (step_a, state_a), (step_b, state_b) = latest_params(tiny_run[0]), latest_params(workdir)
  assert step_a == step_b == 20
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    glyphs_dir, tmp_path, monkeypatch):
  config = tiny_config(glyphs_dir, num_steps=10)
  config.loss = ml_collections.ConfigDict(dict(name="exploding", hparams={}))
  workdir = str(tmp_path / "run")

  def finite(sim, pos, neg):  # The same loss up to step 10 (the run's config may not change) ...
    return jnp.mean(jnp.where(neg, sim, 0.0)) - jnp.mean(jnp.where(pos, sim, 0.0))

  def exploding(sim, pos, neg):  # ... and NaN when the run is resumed.
    return finite(sim, pos, neg) * jnp.nan

  with losses.PAIR_LOSSES.registered("exploding", finite):
    train.train_and_evaluate(config, workdir)
  config.train.num_steps = 20
  with losses.PAIR_LOSSES.registered("exploding", exploding), pytest.raises(
      train.NonFiniteLossError, match=r"non-finite at step 11.*checkpoint is step 10"):
    train.train_and_evaluate(config, workdir)
  assert latest_params(workdir)[0] == 10


def test_invalid_settings_fail_before_any_work(glyphs_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match="Cannot write to workdir"):
    train.train_and_evaluate(tiny_config(glyphs_dir), str(blocker / "run"))
  config = tiny_config(glyphs_dir)
  config.loss.hparams.alpah = 2.0
  with pytest.raises(ValueError, match="loss.hparams.alpah"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config = tiny_config(glyphs_dir)
  config.train.checkpoint_every = 7
  with pytest.raises(ValueError, match="multiple of train.log_every"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # A missing weights file is reported before the dataset is prepared.
  config = tiny_config(str(tmp_path / "data"))
  config.model = ml_collections.ConfigDict(
      dict(name="bn_inception", embed_dim=16, pretrained=str(tmp_path / "bn_inception.pth")))
  with pytest.raises(ValueError, match="bn_inception.pth.: no such file"):
    train.train_and_evaluate(config, str(tmp_path / "weights_run"))
  assert not (tmp_path / "data").exists()


def test_init_from_starts_a_new_run_from_another_runs_weights(glyphs_dir, tmp_path, tiny_run):
  first = tiny_run[0]
  _, first_state = latest_params(first)
  weights = train.checkpointing.read_weights(first)
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(
      {"params": first_state["params"]["model"], "batch_stats": first_state["batch_stats"]})):
    np.testing.assert_array_equal(a, b)

  config = tiny_config(glyphs_dir, num_steps=10)
  config.init_from = os.path.join(first, "checkpoints", "20")  # One checkpoint, named.
  second = str(tmp_path / "second")
  train.train_and_evaluate(config, second)

  def losses_of(workdir):
    return [r["train/loss"] for r in reporting.read_metrics(workdir) if "train/loss" in r]
  # Steps count from 0 again, from the trained weights: the loss starts where the first run ended,
  # below the first run's own start (its steps 1-5 are those of a fresh run: a constant rate).
  assert [r["step"] for r in reporting.read_metrics(second) if "train/loss" in r] == [5, 10]
  assert losses_of(second)[0] < losses_of(first)[0]
  assert losses_of(second)[0] < 1.1 * losses_of(first)[-1]

  config.init_from = str(tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match="nothing_here.: no such directory"):
    train.train_and_evaluate(config, str(tmp_path / "third"))
  config.init_from = first
  config.model.embed_dim = 8
  with pytest.raises(ValueError, match=r"does not fit this model's params: .*mis-shaped \[.*head"):
    train.train_and_evaluate(config, str(tmp_path / "fourth"))
