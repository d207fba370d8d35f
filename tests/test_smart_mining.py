"""Smart Mining: the batch assembly against a brute-force NumPy implementation of the rule, the adaptive
controller on synthetic error curves, the triplet references, and the exact neighbour lists."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsi_jax import losses
from mmsi_jax.batch_policies import controller, smart_mining
from mmsi_jax.eval.retrieval import nearest_by_class
from mmsi_jax.references.triplets import ACTIVE, TripletReferences, triplet_losses

SETTINGS = dict(triplets_per_batch=6, refresh_every=0, start_epoch=1, mined_fraction=2 / 3,
                neighbors=5, adaptive=True, kappa=1.5, target_error=0.6, window=3, step_gain=2.0,
                kappa_range=(0.05, 50.0), chunk_size=32)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def small_split(seed=0, num=70):
  """Unit embeddings of 10 classes (sizes 1 to 12: a singleton never anchors) in 4-d."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(10), [1, 3, 5, 6, 6, 7, 8, 10, 12, 12])[:num]
  centres = unit(rng.normal(size=(10, 4)))
  return unit(centres[labels] + 0.6 * rng.normal(size=(len(labels), 4))).astype(np.float32), labels


def make_policy(labels, loss="ratio_triplet", **overrides):
  return smart_mining.SmartMiningPolicy(
      labels, 2, 2, seed=3, held_out_fraction=0.0, loss_fn=losses.get_pair_loss(loss), hparams={},
      sampler="pk", **{**SETTINGS, **overrides})


def brute_force_rule(x, labels, anchor, kappa, k):
  """(positive or None, negative or None) of one anchor by the rule, from the full distance matrix:
  None where the rule draws at random."""
  d2 = np.sum((x[:, None] - x[None]) ** 2, axis=-1).astype(np.float64)
  others = np.nonzero(labels != labels[anchor])[0]
  listed = others[np.lexsort((others, d2[anchor, others]))][:k]  # Nearest first, ties: lower index.
  same = np.nonzero((labels == labels[anchor]) & (np.arange(len(labels)) != anchor))[0]
  nearest_positive = same[np.lexsort((same, d2[anchor, same]))][0]
  bound = kappa * d2[anchor, nearest_positive]
  valid = [n for n in listed if d2[anchor, n] > bound]
  if not valid:
    return None, None
  negative = valid[0]
  positive = nearest_positive if d2[anchor, nearest_positive] < d2[anchor, negative] else None
  return positive, negative


@pytest.mark.parametrize("x64", [False, True])
def test_neighbour_lists_are_exact(x64):
  x, labels = small_split()
  sim = x @ x.T
  for same_class in (False, True):
    with jax.enable_x64(x64):
      listed_sim, listed = nearest_by_class(x, labels, 4, same_class=same_class, chunk_size=32)
    for a in range(len(x)):
      candidates = np.nonzero(((labels == labels[a]) == same_class) & (np.arange(len(x)) != a))[0]
      expected = candidates[np.lexsort((candidates, -sim[a, candidates]))][:4]
      np.testing.assert_array_equal(listed[a, :len(expected)], expected)
      assert np.all(listed[a, len(expected):] == -1) and np.all(np.isinf(listed_sim[a, len(expected):]))


@pytest.mark.parametrize("kappa", [0.5, 1.5, 4.0])
def test_mined_batches_follow_the_rule(kappa):
  x, labels = small_split()
  policy = make_policy(labels, kappa=kappa)
  steps_per_epoch = policy.steps_per_epoch
  assert policy.refresh_every == steps_per_epoch == 12  # ceil(69 / 6).
  state = policy.init_state()
  calls = []

  def embed_split():
    calls.append(1)
    return x, labels

  # Epoch 0: random triplets, without embedding the split.
  state, metrics = policy.refresh(state, 0, embed_split)
  assert not calls and metrics == {smart_mining.MINED: 0.0}
  # Epoch 1: mined.
  state, metrics = policy.refresh(state, steps_per_epoch, embed_split)
  assert calls == [1] and metrics[smart_mining.KAPPA] == kappa
  batches = np.asarray(state["batches"])
  assert batches.shape == (steps_per_epoch, 18) and int(state["first_step"]) == steps_per_epoch
  triplets = batches.reshape(-1, 3)
  anchors = triplets[:, 0]
  # The 69 samples of classes of two or more: epoch 0 took the first 69 slots (steps 0 to 11 hold
  # 72), so steps 12 to 23 hold epoch 1's anchors from its 4th on, then epoch 2's first 6.
  assert np.all(labels[anchors] != 0)
  np.testing.assert_array_equal(
      anchors, np.concatenate([policy.epoch_anchors(1)[3:], policy.epoch_anchors(2)[:6]]))
  assert np.all(labels[triplets[:, 1]] == labels[anchors]) and np.all(triplets[:, 1] != anchors)
  assert np.all(labels[triplets[:, 2]] != labels[anchors])
  num_mined, counted, hard = 0, 0, 0
  for slot, (anchor, positive, negative) in enumerate(triplets):
    if slot % 6 >= 4:  # mined_fraction 2/3: the last 2 of each batch's 6 are random.
      continue
    counted += 1
    expected_positive, expected_negative = brute_force_rule(x, labels, anchor, kappa, k=5)
    if expected_negative is None:
      continue  # A random triplet (checked above to be a valid one).
    num_mined += 1
    assert negative == expected_negative
    if expected_positive is not None:
      assert positive == expected_positive
    ratio = 1 - np.linalg.norm(x[anchor] - x[negative]) / (np.linalg.norm(x[anchor] - x[positive]) + 0.2)
    hard += ratio > 0
  assert 0 < num_mined and metrics[smart_mining.MINED] == pytest.approx(num_mined / len(triplets))
  assert metrics[smart_mining.ERROR] == pytest.approx(hard / counted, abs=1e-9)
  # The controller observed (e, kappa) and moved kappa towards the target.
  moved = float(state["controller"].kappa)
  assert (moved < kappa) == (metrics[smart_mining.ERROR] < SETTINGS["target_error"])
  # The same refresh again gives the same batches: a pure function of (seed, step, state).
  again, _ = policy.refresh(policy.init_state(), steps_per_epoch, embed_split)
  np.testing.assert_array_equal(again["batches"], batches)


def test_every_sample_is_an_anchor_once_an_epoch():
  """The epochs' permutations are read T anchors a step: no epoch's remainder is dropped."""
  _, labels = small_split()
  policy = make_policy(labels)
  anchors, epochs = policy.step_anchors(np.arange(3 * policy.steps_per_epoch))
  slots = anchors.reshape(-1)[:3 * 69].reshape(3, 69)
  for epoch in range(3):
    np.testing.assert_array_equal(np.sort(slots[epoch]), policy.anchors)
  np.testing.assert_array_equal(epochs, np.arange(len(epochs)) * 6 // 69)


def test_a_larger_bound_picks_easier_negatives():
  x, labels = small_split(1)
  d2 = {}
  for kappa in (0.5, 3.0):
    policy = make_policy(labels, kappa=kappa, start_epoch=0, mined_fraction=1.0, neighbors=60)
    state, _ = policy.refresh(policy.init_state(), 0, lambda: (x, labels))
    triplets = np.asarray(state["batches"]).reshape(-1, 3)
    d2[kappa] = np.sum((x[triplets[:, 0]] - x[triplets[:, 2]]) ** 2, axis=1).mean()
  assert d2[3.0] > d2[0.5]


def test_period_sampler_and_policy_schedule():
  _, labels = small_split()
  policy = make_policy(labels, refresh_every=4)
  assert [policy.due(s) for s in range(6)] == [True, False, False, False, True, False]
  assert policy.period_end(5, 100) == 8 and policy.period_end(5, 6) == 6
  state, _ = policy.refresh(policy.init_state(), 4, lambda: None)
  sampler = policy.sampler(state)
  np.testing.assert_array_equal(sampler.batch_indices(6), np.asarray(state["batches"])[2])
  with pytest.raises(IndexError, match="outside the refresh period"):
    sampler.batch_indices(8)
  # No PK batches: a split of fewer classes than data.classes_per_batch (10 < 50) is served, and a
  # miner's extra batches too.
  few_classes = smart_mining.SmartMiningPolicy(labels, 50, 9, 3, 0.0, losses.get_pair_loss("triplet"),
                                               {}, "pk", **SETTINGS)
  extra = few_classes.sampler(few_classes.init_state()).extra_indices(0, 5)
  assert len(set(labels[extra].tolist())) == 5
  with pytest.raises(ValueError, match="mined_fraction"):
    make_policy(labels, mined_fraction=0.0)
  with pytest.raises(ValueError, match="kappa_range"):
    make_policy(labels, kappa=100.0)
  with pytest.raises(ValueError, match="held-out"):
    smart_mining.SmartMiningPolicy(labels, 2, 2, 0, 0.2, losses.get_pair_loss("triplet"), {}, "pk",
                                   **SETTINGS)
  with pytest.raises(ValueError, match="data.sampler='random' must be 'pk'"):
    smart_mining.SmartMiningPolicy(labels, 2, 2, 0, 0.0, losses.get_pair_loss("triplet"), {},
                                   "random", **SETTINGS)


# ---------------------------------------------------------------------------------------------------
# The controller.

def run_controller(error_of_kappa, refreshes, kappa=8.0, target=0.6, window=4):
  state = controller.init(kappa, window)
  update = jax.jit(lambda state, error: controller.update(
      state, error, target=target, step_gain=2.0, kappa_min=0.05, kappa_max=50.0))
  kappas, errors = [], []
  for _ in range(refreshes):
    errors.append(error_of_kappa(float(state.kappa)))
    kappas.append(float(state.kappa))
    state = update(state, errors[-1])
  return np.array(kappas), np.array(errors), state


@pytest.mark.parametrize("curve", ["linear", "saturating"])
def test_controller_settles_near_the_target_on_a_synthetic_curve(curve):
  """e falls as kappa grows; the controller starts large (e = 0 here) and settles where e = e_t."""
  rng = np.random.default_rng(0)
  if curve == "linear":
    def error_of_kappa(kappa):  # e_t = 0.6 at kappa = 1.
      return float(np.clip(0.95 - 0.35 * kappa + 0.01 * rng.normal(), 0, 1))
  else:
    def error_of_kappa(kappa):  # e_t = 0.6 at kappa = 2/3.
      return float(np.clip(1 / (1 + kappa) + 0.01 * rng.normal(), 0, 1))
  kappas, errors, _ = run_controller(error_of_kappa, refreshes=15)
  assert kappas[1] < kappas[0]  # e below the target: harder negatives, a smaller bound.
  assert np.all(np.abs(errors[-5:] - 0.6) < 0.05)
  expected_kappa = 1.0 if curve == "linear" else 2 / 3
  assert abs(np.median(kappas[-5:]) - expected_kappa) < 0.1 * expected_kappa


def test_controller_fit_and_fallback_step():
  # Above the target from the start: kappa grows (easier negatives) by the documented step.
  kappas, _, state = run_controller(lambda kappa: 0.9, refreshes=3, kappa=1.0)
  np.testing.assert_allclose(kappas, [1.0, np.exp(0.6), np.exp(1.2)], rtol=1e-5)
  assert int(state.count) == 3
  # The least-squares line over the window, against NumPy.
  errors, kappas = np.array([0.2, 0.5, 0.7, 0.1]), np.array([3.0, 2.0, 1.2, 9.0])
  alpha, beta, determined = controller.fit(jnp.asarray(errors), jnp.asarray(kappas),
                                           jnp.array([True, True, True, False]))
  np.testing.assert_allclose([alpha, beta], np.polyfit(errors[:3], kappas[:3], 1), rtol=1e-5)
  assert bool(determined)
  state = controller.ControllerState(kappa=jnp.float32(1.2), errors=jnp.asarray(errors[:3]),
                                     kappas=jnp.asarray(kappas[:3]), count=jnp.int32(2))
  new = controller.update(state, 0.7, target=0.6, step_gain=2.0, kappa_min=0.05, kappa_max=50.0)
  np.testing.assert_allclose(new.kappa, np.polyval(np.polyfit(errors[:3], kappas[:3], 1), 0.6),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    controller.init(4.0, 1)


# ---------------------------------------------------------------------------------------------------
# The triplet references.

def test_triplet_references_keep_one_positive_and_one_negative_per_anchor():
  rng = np.random.default_rng(0)
  x = jnp.asarray(unit(rng.normal(size=(9, 5))), jnp.float32)
  labels = jnp.array([0, 0, 1, 2, 2, 0, 1, 1, 2])  # Triplets (0, 1, 2), (3, 4, 5), (6, 7, 8).
  refs = TripletReferences(num_classes=3)
  pairs = refs.pairs(None, None, x, labels)
  expected_pos, expected_neg = np.zeros((9, 9), bool), np.zeros((9, 9), bool)
  expected_pos[[0, 3, 6], [1, 4, 7]] = True
  expected_neg[[0, 3, 6], [2, 5, 8]] = True
  np.testing.assert_array_equal(pairs.pos, expected_pos)
  np.testing.assert_array_equal(pairs.neg, expected_neg)
  loss, metrics = refs.objective(None, 0, pairs, losses.get_pair_loss("ratio_triplet"), {})
  d = np.sqrt(np.maximum(2 - 2 * np.asarray(pairs.sim), 0))
  per_triplet = np.maximum(1 - d[[0, 3, 6], [2, 5, 8]] / (d[[0, 3, 6], [1, 4, 7]] + 0.2), 0)
  np.testing.assert_allclose(loss, per_triplet.mean(), rtol=1e-5)
  assert metrics[ACTIVE] == pytest.approx(np.mean(per_triplet > 0))
  with pytest.raises(ValueError, match="multiple of 3"):
    refs.pairs(None, None, x[:8], labels[:8])


def test_each_triplets_own_loss_inside_jit():
  rng = np.random.default_rng(1)
  sim_ap, sim_an = rng.uniform(0.2, 0.9, 30), rng.uniform(0.2, 0.9, 30)
  for name, hparams, expected in [
      ("triplet", dict(margin=0.1, mining="all"), np.maximum(sim_an - sim_ap + 0.1, 0)),
      ("ratio_triplet", {}, np.maximum(
          1 - np.sqrt(2 - 2 * sim_an) / (np.sqrt(2 - 2 * sim_ap) + 0.2), 0))]:
    per_triplet = jax.jit(lambda a, n: triplet_losses(losses.get_pair_loss(name), hparams, a, n))(
        jnp.asarray(sim_ap, jnp.float32), jnp.asarray(sim_an, jnp.float32))
    np.testing.assert_allclose(per_triplet, expected, rtol=1e-5, atol=1e-6)
    assert np.any(expected > 0) and np.any(expected == 0)


def test_config_checks_name_the_key_and_the_fix():
  from configs import demo  # pylint: disable=import-outside-toplevel
  from mmsi_jax import train  # pylint: disable=import-outside-toplevel
  train.check_config(demo.get_config("smart_mining"))
  for change, message in [
      (dict(batch_policy="pk"), "references.name='triplets' reads batches laid out as 'triplets'"),
      (dict(batch_policy="smart"), "data.batch_policy='smart' is not one of"),
  ]:
    config = demo.get_config("smart_mining")
    config.data.update(change)
    with pytest.raises(ValueError, match=message):
      train.check_config(config)
  for key, value, message in [("kapa", 2.0, "data.smart_mining.kapa is not a setting"),
                              ("mined_fraction", 0.0, "mined_fraction must be in")]:
    config = demo.get_config("smart_mining")
    config.data.smart_mining[key] = value
    with pytest.raises(ValueError, match=message):
      train.check_config(config)
