"""MemVir (references/memvir.py): S and the loss against an explicit NumPy concatenation of past steps
over a run (before the queues fill, at the stairs, after they wrap), with every proxy loss, S whole and
over class blocks; gradients
against finite differences; no gradient through the stored entries; the curriculum; the memory bound.
Resuming with the queues: tests/test_train.py."""

import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from configs import real_datasets
from mmsi_jax import losses, step, train
from mmsi_jax.losses.class_blocks import stored_values
from mmsi_jax.models import l2_normalize
from mmsi_jax.references import memvir as memvir_lib
from tests.test_every_loss import reference, unit
from tests.test_train import method_config

C, B, D = 3, 4, 5  # Classes, batch rows, embedding size.
N, M, U = 2, 1, 3  # Past steps used at once, gap, warm-up: stairs at steps 5 and 7, the ring of 5 wraps.
SETTINGS = dict(init="normal", init_std=1.0, num_steps=N, step_gap=M, warmup_steps=U, batch_size=B,
                dtype="float32", max_memory_gb=1.0)


def make(**changes):
  """The component of SETTINGS with `changes`; float64 queues for the checks in double precision."""
  return memvir_lib.MemoryVirtualClasses(C, **{**SETTINGS, **changes})


def history(steps, seed=0):
  """Per step: unit embeddings [B, D], labels [B] (a class may be missing), raw proxies [C, D]."""
  rng = np.random.default_rng(seed)
  return [(unit(rng.normal(size=(B, D))), rng.integers(0, C, B), rng.normal(size=(C, D)))
          for _ in range(steps)]


def explicit(steps, t):
  """NumPy: (E' [(k + 1) B, D], y', W' [(k + 1) C, D] unit rows) of step t, from the authors' rule."""
  chosen = [t] + [t - j * (M + 1) for j in range(1, N + 1) if t >= U and t - j * (M + 1) >= U]
  embeddings = np.concatenate([steps[s][0] for s in chosen])
  labels = np.concatenate([steps[s][1] + i * C for i, s in enumerate(chosen)])
  proxies = np.concatenate([unit(steps[s][2]) for s in chosen])
  return embeddings, labels, proxies


def run(refs, steps):
  """The state after each step's update, and that step's pairs, as the train step makes them."""
  state = refs.init(jax.random.PRNGKey(0), D)[1]
  update, pairs = jax.jit(refs.update), jax.jit(refs.pairs)
  for t, (e, y, w) in enumerate(steps):
    params = {"proxies": jnp.asarray(w)}
    state = update(state, params, jnp.asarray(e), jnp.asarray(y), jnp.asarray(t))
    yield t, state, pairs(state, params, jnp.asarray(e), jnp.asarray(y))


def test_pairs_are_the_explicit_concatenation_of_past_steps():
  steps = history(14)
  with jax.enable_x64(True):
    for t, _, pairs in run(make(dtype="float64"), steps):
      embeddings, labels, proxies = explicit(steps, t)
      rows, columns = len(embeddings), len(proxies)
      np.testing.assert_allclose(pairs.sim[:rows, :columns], embeddings @ proxies.T, rtol=1e-12,
                                 atol=1e-12)
      own = labels[:, None] == np.arange(columns)[None, :]
      np.testing.assert_array_equal(pairs.pos[:rows, :columns], own)
      np.testing.assert_array_equal(pairs.neg[:rows, :columns], ~own)
      # The steps not yet available take no part: no pair in their rows or their columns.
      assert not pairs.pos[rows:].any() and not pairs.neg[rows:].any()
      assert not pairs.pos[:, columns:].any() and not pairs.neg[:, columns:].any()
      assert pairs.sim.shape == ((N + 1) * B, (N + 1) * C)


@pytest.mark.parametrize("class_block", [0, 2], ids=["whole", "blocks_of_2"])
@pytest.mark.parametrize("name", sorted(losses.proxy_names()))
def test_every_proxy_loss_equals_numpy_on_the_virtual_classes(name, class_block):
  steps = history(12, seed=1)
  refs = make(dtype="float64", class_block=class_block)
  with jax.enable_x64(True):
    objective = jax.jit(lambda state, t, pairs: refs.objective(
        state, t, pairs, losses.get_proxy_loss(name), {})[0])
    for t, state, pairs in run(refs, steps):
      embeddings, labels, proxies = explicit(steps, t)
      problem = dict(x=embeddings, labels=labels, mem=np.zeros((0, D)),
                     mem_labels=np.zeros((0,), int), mem_valid=np.zeros((0,), bool), proxies=proxies)
      np.testing.assert_allclose(objective(state, t, pairs), reference(name, {}, problem), rtol=1e-9,
                                 atol=1e-12)


@pytest.mark.parametrize("class_block", [0, 2], ids=["whole", "blocks_of_2"])
@pytest.mark.parametrize("name", ["norm_softmax", "proxy_anchor"])
def test_gradient_in_the_batch_and_the_proxies_matches_finite_differences(name, class_block):
  steps = history(10, seed=2)
  refs = make(dtype="float64", class_block=class_block)
  with jax.enable_x64(True):
    *_, (t, state, _) = run(refs, steps)  # Step 9: N = 2 virtual steps.
    assert int(jnp.sum(refs.available(state))) == N
    y = jnp.asarray(steps[t][1])

    def loss(raw_embeddings, proxies):
      pairs = refs.pairs(state, {"proxies": proxies}, l2_normalize(raw_embeddings), y)
      return refs.objective(state, t, pairs, losses.get_proxy_loss(name), {})[0]

    check_grads(jax.jit(loss), (1.3 * jnp.asarray(steps[t][0]), jnp.asarray(steps[t][2])), order=1,
                modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_no_gradient_reaches_the_stored_entries():
  """What a step pushes is detached: the queues carry no gradient back to the embeddings and proxies
  that produced them, so a later step's loss trains only its own e_t and W_t."""
  steps = history(U + 1)
  refs = make(dtype="float64")
  with jax.enable_x64(True):
    state = refs.init(jax.random.PRNGKey(0), D)[1]
    e, y, w = (jnp.asarray(x) for x in steps[U])

    def stored(e, w):
      pushed = refs.update(state, {"proxies": w}, e, y, jnp.asarray(U))
      return jnp.sum(pushed.embeddings ** 2) + jnp.sum(pushed.proxies ** 2)

    assert stored(e, w) > 0  # The step was pushed.
    for gradient in jax.grad(stored, argnums=(0, 1))(e, w):
      np.testing.assert_array_equal(gradient, 0.0)


def test_the_class_count_grows_in_stairs():
  refs = make(num_steps=3, step_gap=2, warmup_steps=4)
  counts = []
  for t, state, pairs in run(refs, history(20)):
    counts.append(int(refs.objective(state, t, pairs, losses.norm_softmax, {})[1]["memvir/classes"]))
  # Warm-up (steps 0-4: nothing stored before step 4), then one more C every M + 1 = 3 steps, to 4C.
  assert counts == [C] * 7 + [2 * C] * 3 + [3 * C] * 3 + [4 * C] * 7


def test_bf16_queues_store_the_entries_rounded():
  steps = history(6)
  for t, state, _ in run(make(dtype="bfloat16"), steps):
    slot = t - U
    if slot >= 0:
      assert state.embeddings.dtype == jnp.uint16  # bfloat16's bits (class_blocks.stored_bits).
      np.testing.assert_allclose(stored_values(state.embeddings[slot]).astype(jnp.float32),
                                 steps[t][0], rtol=1e-2, atol=1e-2)


def test_memory_formula_and_the_budget():
  # (N(M+1) + 1) x ((C + B) x D x s + 4B): Cars (C 98) and SOP (C 11,318), N 45, M 10, D 512, B 128.
  cars = memvir_lib.queue_bytes(num_classes=98, embed_dim=512, batch_size=128, num_steps=45,
                                step_gap=10, dtype="float32")
  assert cars == 496 * (226 * 512 * 4 + 512)
  sop = memvir_lib.queue_bytes(num_classes=11_318, embed_dim=512, batch_size=128, num_steps=45,
                               step_gap=10, dtype="bfloat16")
  assert sop == 496 * (11_446 * 512 * 2 + 512)
  refs = memvir_lib.MemoryVirtualClasses(11_318, **{**SETTINGS, "num_steps": 45, "step_gap": 10,
                                                    "batch_size": 128, "max_memory_gb": 8.0})
  with pytest.raises(ValueError, match=r"\(45 x 11 \+ 1\) x \(\(11318 \+ 128\) x 512 x 4 \+ 4 x "
                                       r"128\) = 11.63 GB, over references.memvir.max_memory_gb=8.0"):
    refs.init(jax.random.PRNGKey(0), 512)
  with pytest.raises(ValueError, match="references.memvir.dtype='float16'"):
    make(dtype="float16")
  with pytest.raises(ValueError, match="batch_size=4, but the batch has 6 rows"):
    refs = make()
    state = refs.init(jax.random.PRNGKey(0), D)[1]
    refs.update(state, {"proxies": jnp.zeros((C, D))}, jnp.zeros((6, D)), jnp.zeros((6,), int), 0)


def test_a_run_whose_queues_exceed_the_budget_stops_before_the_first_step(glyphs_dir, tmp_path):
  config = method_config(glyphs_dir, "memvir")
  # The tiny run's queues: 7 x 8,704 B = 6e-5 GB (its classes padded to 102 for 3 class shards).
  config.references.memvir.max_memory_gb = 1e-5
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"\(2 x 3 \+ 1\) x \(\(102 \+ 32\) x 16 x 4 \+ 4 x 32\) = "
                                       r"0.00 GB, over references.memvir.max_memory_gb=1e-05"):
    train.train_and_evaluate(config, str(workdir))
  assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------
# The real-dataset schedule against MemVir's main.py.

def np_memvir_learning_rates(images, epochs, decay_step, decay_stop, learning_rate=1e-4, batch=128,
                             decay_rate=0.1):
  """The rate of every step of MemVir's main.py: a loader without drop_last (ceil(images / batch)
  steps an epoch), and adjust_learning_rate at the start of each epoch e = 1, 2, ...: times decay_rate
  where e % decay_step == 0 and e <= decay_stop."""
  steps_per_epoch = len(range(0, images, batch))
  rates = []
  for epoch in range(1, epochs + 1):
    if epoch % decay_step == 0 and epoch <= decay_stop:
      learning_rate *= decay_rate
    rates += [learning_rate] * steps_per_epoch
  return np.array(rates), steps_per_epoch


@pytest.mark.parametrize("dataset,images", [("cub200", 5_864), ("cars196", 8_054)])
@pytest.mark.parametrize("variant,epochs,decay_epoch", [("proxy_nca", 130, 50),
                                                        ("memvir_proxy_nca", 2_000, 2_000)])
def test_real_dataset_schedules_count_epochs_as_the_authors(dataset, images, variant, epochs,
                                                            decay_epoch):
  """The README's ProxyNCA runs: the baseline with decay_step = decay_stop = 50, MemVir with 2,000 (the
  last epoch at 0.1x) and its virtual classes after 40 epochs; the config's schedule, inside jit in
  float64, gives NumPy's rate at every step."""
  config = real_datasets.get_config(dataset, variant)
  assert config.loss.hparams.own_proxy_in_denominator  # MemVir's ProxyNCA: a softmax over all proxies.
  expected, steps_per_epoch = np_memvir_learning_rates(images, epochs, decay_epoch, decay_epoch)
  assert config.train.num_steps == len(expected)
  if variant.startswith("memvir"):
    assert config.references.memvir.warmup_steps == 40 * steps_per_epoch
  with jax.enable_x64(True):
    schedule = step.create_schedule(config.optim, config.train.num_steps)
    rates = jax.jit(jax.vmap(schedule))(jnp.arange(len(expected)))
  np.testing.assert_allclose(rates, expected, rtol=1e-6)
