"""Proxy losses over class blocks (losses/class_blocks.py) equal the whole computation: values and
gradients, in float64 to 1e-10 and in float32 to 1e-5, for every proxy loss, over the proxies and over
groups of constant class vectors read from a queue (MemVir's layout), with blocks that divide the class
count or not; the classes sharded over 4 devices; and a train step with blocks equals the whole step.
MemVir's blocked form against its authors' rule in NumPy: tests/test_memvir.py."""

import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from mmsi_jax import losses, step
from mmsi_jax.losses.class_blocks import ClassBlocks, ClassGroups, blocked_loss
from mmsi_jax.models import l2_normalize
from tests import conftest
from tests.test_every_loss import unit

ROWS, C, D = 9, 11, 6  # Rows, classes per group, embedding size.
QUEUE, PAST = 5, 3  # Queue slots, past groups read from it.
HPARAMS = {"proxy_nca": [{}, {"own_proxy_in_denominator": True}], "arcface": [{"margin": 0.5}]}


def problem(dtype, seed=0, with_past=True):
  """Rows (unit) [ROWS, D], raw proxies [C, D], row labels over every group's class ids, row validity,
  and a queue of raw class vectors [QUEUE, C, D] read at PAST slots, one of them unavailable."""
  rng = np.random.default_rng(seed)
  groups = 1 + PAST if with_past else 1
  labels = rng.integers(0, groups * C, ROWS)
  labels[0] = C + 2 if with_past else 2  # A row of a past group whose class is in an unavailable slot
  valid = np.ones(ROWS, bool)             # would have no pair: see `available` below.
  valid[-1] = False
  as_array = lambda x: jnp.asarray(x, dtype)
  return dict(rows=as_array(unit(rng.normal(size=(ROWS, D)))), proxies=as_array(rng.normal(size=(C, D))),
              labels=jnp.asarray(labels), valid=jnp.asarray(valid),
              queue=as_array(rng.normal(size=(QUEUE, C, D))), slots=jnp.asarray([4, 0, 2]),
              available=jnp.asarray([True, False, True]), with_past=with_past)


def blocks_of(p, rows, proxies, block):
  more = (ClassGroups(p["queue"], p["slots"], p["available"], first_id=C),) if p["with_past"] else ()
  return ClassBlocks((rows, proxies), p["labels"], p["valid"], more=more, block=block)


def whole_loss(loss_fn, hparams, p, rows, proxies):
  """The loss on S [ROWS, (1 + PAST) C] held whole, its masks from the class ids."""
  columns, available = [l2_normalize(proxies)], [jnp.ones(C, bool)]
  if p["with_past"]:
    columns.append(l2_normalize(p["queue"][p["slots"]].reshape(-1, D)))
    available.append(jnp.repeat(p["available"], C))
  columns, available = jnp.concatenate(columns), jnp.concatenate(available)
  own = p["labels"][:, None] == jnp.arange(columns.shape[0])[None, :]
  in_step = p["valid"][:, None] & available[None, :]
  return loss_fn(rows @ columns.T, own & in_step, ~own & in_step, **hparams)


CASES = [(name, hparams) for name in sorted(losses.proxy_names())
         for hparams in HPARAMS.get(name, [{}])]


@pytest.mark.parametrize("with_past", [False, True], ids=["proxies", "proxies+queue"])
@pytest.mark.parametrize("name,hparams", CASES)
def test_blocked_equals_whole_in_float64(name, hparams, with_past):
  loss_fn = losses.get_proxy_loss(name)
  with jax.enable_x64(True):
    p = problem(jnp.float64, with_past=with_past)
    whole = jax.jit(jax.value_and_grad(
        lambda r, w: whole_loss(loss_fn, hparams, p, r, w), argnums=(0, 1)))
    expected, expected_grads = whole(p["rows"], p["proxies"])
    assert abs(float(expected)) > 1e-3
    for block in (1, 4, C):  # One class at a time; blocks overlapping at the end; one block.
      blocked = jax.jit(jax.value_and_grad(
          lambda r, w, b=block: blocked_loss(loss_fn, blocks_of(p, r, w, b), hparams)[0],
          argnums=(0, 1)))
      value, grads = blocked(p["rows"], p["proxies"])
      np.testing.assert_allclose(value, expected, rtol=1e-10, atol=1e-12)
      for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,hparams", CASES)
def test_blocked_equals_whole_in_float32(name, hparams):
  loss_fn = losses.get_proxy_loss(name)
  p = problem(jnp.float32, seed=1)
  value, grads = jax.jit(jax.value_and_grad(
      lambda r, w: blocked_loss(loss_fn, blocks_of(p, r, w, 4), hparams)[0], argnums=(0, 1)))(
          p["rows"], p["proxies"])
  expected, expected_grads = jax.jit(jax.value_and_grad(
      lambda r, w: whole_loss(loss_fn, hparams, p, r, w), argnums=(0, 1)))(p["rows"], p["proxies"])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("name", ["norm_softmax", "proxy_anchor"])
def test_blocked_gradient_matches_finite_differences(name):
  loss_fn = losses.get_proxy_loss(name)
  with jax.enable_x64(True):
    p = problem(jnp.float64, seed=2)
    loss = jax.jit(lambda raw, w: blocked_loss(loss_fn, blocks_of(p, l2_normalize(raw), w, 4), {})[0])
    check_grads(loss, (1.3 * p["rows"], p["proxies"]), order=1, modes=["rev"], eps=1e-6, atol=1e-6,
                rtol=1e-6)


def test_an_unavailable_group_takes_no_part():
  loss_fn = losses.get_proxy_loss("norm_softmax")
  with jax.enable_x64(True):
    p = problem(jnp.float64, seed=3)

    def loss(queue):
      return blocked_loss(loss_fn, blocks_of({**p, "queue": queue}, p["rows"], p["proxies"], 4), {})[0]
    # Slot 0 is read by the unavailable group: what it holds changes nothing, the other slots do.
    assert float(loss(p["queue"].at[0].set(100.0))) == float(loss(p["queue"]))
    assert float(loss(p["queue"].at[2].set(100.0))) != float(loss(p["queue"]))


def test_similarity_means_are_reported():
  p = problem(jnp.float32, seed=4)
  _, metrics = blocked_loss(losses.get_proxy_loss("norm_softmax"),
                            blocks_of(p, p["rows"], p["proxies"], 4), {})
  columns = jnp.concatenate([l2_normalize(p["proxies"]),
                             l2_normalize(p["queue"][p["slots"]].reshape(-1, D))])
  sim = np.asarray(p["rows"] @ columns.T)
  available = np.concatenate([np.ones(C, bool), np.repeat(np.asarray(p["available"]), C)])
  own = np.asarray(p["labels"])[:, None] == np.arange(sim.shape[1])[None, :]
  in_step = np.asarray(p["valid"])[:, None] & available[None, :]
  np.testing.assert_allclose(metrics["train/pos_sim"], sim[own & in_step].mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["train/neg_sim"], sim[~own & in_step].mean(), rtol=1e-5, atol=1e-6)


def test_a_negative_block_size_is_refused():
  from mmsi_jax.references import ClassProxies  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="class_block must be >= 0"):
    ClassProxies(5, class_block=-1)


@pytest.mark.parametrize("references_name", ["proxies", "memvir"])
def test_a_train_step_with_class_blocks_equals_the_whole_step(references_name, tiny_proxy_setup):
  """Two steps of the trainer's step (model, proxies, Adam), blocks of 3 of the 8 classes against S
  whole: the same loss and parameters (float32)."""
  make_config, batch = tiny_proxy_setup
  results = []
  for class_block in (0, 3):
    config = make_config(references_name)
    config.references[references_name].class_block = class_block
    components = step.build(config, num_classes=8)
    state = step.create_train_state(jax.random.PRNGKey(0), components, batch["images"].shape[1:])
    train_step = step.make_train_step(components)
    for _ in range(2):
      state, metrics = train_step(state, batch)
    results.append((state.params, metrics))
  (whole_params, whole_metrics), (blocked_params, blocked_metrics) = results
  for key in ("train/loss", "train/pos_sim", "train/neg_sim"):
    np.testing.assert_allclose(blocked_metrics[key], whole_metrics[key], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), blocked_params,
               whole_params)


@pytest.fixture(scope="module")
def tiny_proxy_setup():
  """A config maker for a tiny model with a proxy loss (norm_softmax) and one batch of 8 classes."""
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top

  def make_config(references_name):
    config = tiny_config(data_dir="unused")  # No data is read: the batch is made here.
    config.loss.name = "norm_softmax"
    config.loss.hparams = {}
    config.references.name = references_name
    config.references.memvir.update(num_steps=2, step_gap=0, warmup_steps=0,
                                    batch_size=config.data.classes_per_batch
                                    * config.data.samples_per_class)
    return config
  config = make_config("proxies")
  rows = config.data.classes_per_batch * config.data.samples_per_class
  rng = np.random.default_rng(0)
  batch = {"images": jnp.asarray(rng.integers(0, 256, (rows, 32, 32, 3)), jnp.uint8),
           "labels": jnp.asarray(np.arange(rows) % 8, jnp.int32)}
  return make_config, batch


def test_sop_memvir_runs_over_class_blocks_and_the_smaller_datasets_whole():
  from configs import real_datasets  # pylint: disable=g-import-not-at-top
  for variant in real_datasets.MEMVIR_VARIANTS:
    assert real_datasets.get_config("sop", variant).references.memvir.class_block == (
        real_datasets.SOP_CLASS_BLOCK)
    assert real_datasets.get_config("cars196", variant).references.memvir.class_block == 0


def test_the_run_start_line_gives_the_proxies_queues_and_the_loss_parts_peak():
  from mmsi_jax import loss_memory  # pylint: disable=g-import-not-at-top
  from mmsi_jax.references import MemoryVirtualClasses  # pylint: disable=g-import-not-at-top
  peaks = []
  for class_block in (0, 16):
    refs = MemoryVirtualClasses(64, init="normal", init_std=1.0, num_steps=4, step_gap=1,
                                warmup_steps=0, batch_size=32, dtype="float32", max_memory_gb=1.0,
                                class_block=class_block)
    params, queues = refs.init(jax.random.PRNGKey(0), 16)
    line = loss_memory.report(refs, losses.get_proxy_loss("norm_softmax"), {}, params, queues, 32)
    # 64 x 16 float32 proxies; (4 x 2 + 1) x ((64 + 32) x 16 x 4 + 4 x 32) bytes of queues.
    assert line.startswith("Proxies [64, 16] 0.0 MB per device") and "queues 0.1 MB" in line, line
    assert ("over blocks of 16 classes" if class_block else "with S whole") in line
    peaks.append(float(line.split("peaks at ")[1].split(" MB")[0]))
  assert peaks[1] < peaks[0]  # S [160, 320] whole against [160, 16] blocks.


def test_classes_sharded_over_4_devices_give_the_results_of_one():
  """Classes split over 4 CPU devices: the loss equals the whole one (float64 1e-10), a train step the
  unsharded step, and a checkpoint restores on 2 and 1 devices (tests/sharded_classes.py)."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  done = subprocess.run([sys.executable, "-m", "tests.sharded_classes"], capture_output=True,
                        text=True, env=conftest.host_devices_env(4), timeout=600,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
