"""Every registered loss: against an independent NumPy implementation, gradients against finite
differences in float64 inside jit, W = dL/dS and the weighted pair sum, invariances, degenerate
inputs."""

import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from mmsi_jax import losses
from mmsi_jax.models import l2_normalize

NUM_CLASSES = 7  # Batch classes 0-3 and a singleton 6; memory classes 0-4; class 5 has no sample.

# One case per loss (and per triplet mining), then hyperparameter variants checked against NumPy only.
MAIN_CASES = [
    ("contrastive", {}),
    ("distance_contrastive", {}),
    ("multi_similarity", {}),
    ("triplet", dict(mining="all")),
    ("triplet", dict(mining="hard")),
    ("triplet", dict(mining="semihard", margin=0.3)),
    ("lifted_structure", {}),
    ("binomial_deviance", {}),
    ("ntxent", {}),
    ("ratio_triplet", {}),
    ("global_loss", {}),
    ("ratio_triplet_global", {}),
    ("norm_softmax", {}),
    ("cosface", {}),
    ("arcface", {}),
    ("proxy_nca", {}),
    ("proxy_nca", dict(own_proxy_in_denominator=True)),  # MemVir's code.
    ("proxy_anchor", {}),
]
CASES = MAIN_CASES + [
    ("contrastive", dict(pos_margin=0.9, neg_margin=0.2)),
    ("triplet", dict(mining="all", margin=0.3)),
    ("ntxent", dict(temperature=0.5)),
    ("distance_contrastive", dict(margin=0.7)),
    ("ratio_triplet", dict(margin=0.5)),
    ("global_loss", dict(mean_weight=3.0, margin=0.4)),
    ("ratio_triplet_global", dict(margin=0.1, global_weight=0.5, mean_weight=2.0, global_margin=0.3)),
    ("arcface", dict(margin=1.2, scale=8.0)),  # theta + margin passes pi: the linear continuation.
]


def case_id(case):
  name, hparams = case
  return name + "".join(f"-{k}={v}" for k, v in hparams.items())


def is_proxy(name):
  return name in losses.proxy_names()


# ---------------------------------------------------------------------------------------------------
# Independent NumPy implementations, one anchor (or one proxy) at a time, in float64.

def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def anchor_sets(problem):
  """For each batch anchor, the similarities to its positives and to its negatives."""
  x, labels = problem["x"], problem["labels"]
  valid = problem["mem_valid"]
  refs = np.concatenate([x, problem["mem"][valid]])
  ref_labels = np.concatenate([labels, problem["mem_labels"][valid]])
  sets = []
  for i in range(len(x)):
    others = np.arange(len(refs)) != i
    sims = refs @ x[i]
    sets.append((sims[others & (ref_labels == labels[i])], sims[ref_labels != labels[i]]))
  return sets


def np_contrastive(sets, pos_margin=1.0, neg_margin=0.8):
  return sum(np.maximum(pos_margin - p, 0).sum() + np.maximum(n - neg_margin, 0).sum()
             for p, n in sets) / len(sets)


def np_distance_contrastive(sets, margin=1.2):
  """Mean over every (anchor, reference) pair of 1/2 |x - y|^2 (positive) or 1/2 [margin - |x - y|]_+^2."""
  terms = [0.5 * (2 - 2 * s) for p, _ in sets for s in p]
  terms += [0.5 * max(margin - np.sqrt(2 - 2 * s), 0) ** 2 for _, n in sets for s in n]
  return sum(terms) / len(terms)


def np_multi_similarity(sets, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
  total = 0.0
  for p, n in sets:
    if len(p) == 0 or len(n) == 0:
      continue
    mined_p, mined_n = p[p - epsilon < n.max()], n[n + epsilon > p.min()]
    if len(mined_p) and len(mined_n):
      total += np.log1p(np.exp(-alpha * (mined_p - base)).sum()) / alpha
      total += np.log1p(np.exp(beta * (mined_n - base)).sum()) / beta
  return total / len(sets)


def np_triplet(sets, margin=0.1, mining="all"):
  if mining == "hard":
    return sum(max(n.max() - p.min() + margin, 0) for p, n in sets if len(p) and len(n)) / len(sets)
  costs = []
  for p, n in sets:
    for s_ap in p:
      if mining == "all":
        costs.extend(c for c in n - s_ap + margin if c > 0)
      else:  # semihard: the most similar negative among those less similar than the positive.
        easier = n[n < s_ap]
        costs.append(max(easier.max() - s_ap + margin, 0) if len(easier) else 0.0)
  return sum(costs) / max(len(costs), 1)


def np_lifted_structure(sets, margin=1.0):
  total = sum(max(np.log(np.exp(-p).sum()) + np.log(np.exp(n).sum()) + margin, 0)
              for p, n in sets if len(p) and len(n))
  return total / len(sets)


def np_binomial_deviance(sets, alpha=2.0, beta=50.0, base=0.5):
  total = 0.0
  for p, n in sets:
    if len(p):
      total += np.mean(np.log1p(np.exp(-alpha * (p - base))))
    if len(n):
      total += np.mean(np.log1p(np.exp(beta * (n - base))))
  return total / len(sets)


def np_ntxent(sets, temperature=0.1):
  per_anchor = []
  for p, n in sets:
    if len(p):
      denominator = np.exp(np.concatenate([p, n]) / temperature).sum()
      per_anchor.append(np.mean([-np.log(np.exp(s / temperature) / denominator) for s in p]))
  return np.mean(per_anchor) if per_anchor else 0.0


def np_ratio_triplet(sets, margin=0.2):
  distance = lambda s: np.sqrt(np.maximum(2 - 2 * s, 1e-12))  # The floor where S rounds to 1.
  costs = [max(1 - distance(s_an) / (distance(s_ap) + margin), 0)
           for p, n in sets for s_ap in p for s_an in n]
  return np.mean(costs) if costs else 0.0


def np_global_loss(sets, mean_weight=1.0, margin=0.01):
  d_pos = (1 - np.concatenate([p for p, _ in sets])) / 2
  d_neg = (1 - np.concatenate([n for _, n in sets])) / 2
  if not len(d_pos) or not len(d_neg):
    return 0.0
  return (np.var(d_pos) + np.var(d_neg)
          + mean_weight * max(d_pos.mean() - d_neg.mean() + margin, 0))


def np_ratio_triplet_global(sets, margin=0.2, global_weight=1.0, mean_weight=1.0,
                            global_margin=0.01):
  return (np_ratio_triplet(sets, margin)
          + global_weight * np_global_loss(sets, mean_weight, global_margin))


def proxy_samples(problem):
  """The samples (batch, then valid memory rows), their labels, and the unit proxies."""
  valid = problem["mem_valid"]
  return (np.concatenate([problem["x"], problem["mem"][valid]]),
          np.concatenate([problem["labels"], problem["mem_labels"][valid]]),
          unit(problem["proxies"]))


def softmax_nll(logits, target):
  return -(logits[target] - np.log(np.exp(logits).sum()))


def np_norm_softmax(problem, temperature=0.05):
  x, y, prox = proxy_samples(problem)
  return np.mean([softmax_nll(prox @ xi / temperature, yi) for xi, yi in zip(x, y)])


def np_cosface(problem, scale=64.0, margin=0.35):
  x, y, prox = proxy_samples(problem)
  out = []
  for xi, yi in zip(x, y):
    cos = prox @ xi
    cos[yi] -= margin
    out.append(softmax_nll(scale * cos, yi))
  return np.mean(out)


def np_arcface(problem, scale=64.0, margin=0.5):
  x, y, prox = proxy_samples(problem)
  out = []
  for xi, yi in zip(x, y):
    cos = prox @ xi
    theta = np.arccos(cos[yi])
    cos[yi] = np.cos(theta + margin) if theta + margin <= np.pi else cos[yi] - margin * np.sin(margin)
    out.append(softmax_nll(scale * cos, yi))
  return np.mean(out)


def np_proxy_nca(problem, scale=12.0, own_proxy_in_denominator=False):
  x, y, prox = proxy_samples(problem)
  out = []
  for xi, yi in zip(x, y):
    dist = np.sum((prox - xi) ** 2, axis=1)
    denominator = np.ones(len(prox), bool) if own_proxy_in_denominator else np.arange(len(prox)) != yi
    out.append(-np.log(np.exp(-scale * dist[yi]) / np.exp(-scale * dist[denominator]).sum()))
  return np.mean(out)


def np_proxy_anchor(problem, alpha=32.0, margin=0.1):
  x, y, prox = proxy_samples(problem)
  pos_total, with_samples, neg_total = 0.0, 0, 0.0
  for c, proxy in enumerate(prox):
    sims = x @ proxy
    if np.any(y == c):
      with_samples += 1
      pos_total += np.log1p(np.exp(-alpha * (sims[y == c] - margin)).sum())
    neg_total += np.log1p(np.exp(alpha * (sims[y != c] + margin)).sum())
  return pos_total / with_samples + neg_total / len(prox)


def reference(name, hparams, problem):
  if is_proxy(name):
    return globals()[f"np_{name}"](problem, **hparams)
  return globals()[f"np_{name}"](anchor_sets(problem), **hparams)


# ---------------------------------------------------------------------------------------------------

def random_problem(seed, batch=12, dim=6, memory=10):
  """Duplicate labels, a singleton class, a memory with invalid rows, proxies for all classes."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, batch)
  labels[-1] = 6  # The singleton: an anchor with no positive.
  return dict(x=unit(rng.normal(size=(batch, dim))), labels=labels,
              mem=unit(rng.normal(size=(memory, dim))), mem_labels=rng.integers(0, 5, memory),
              mem_valid=rng.permutation(np.arange(memory) < 7),
              proxies=rng.normal(size=(NUM_CLASSES, dim)))


def loss_on(name, hparams):
  """f(x, labels, mem, mem_labels, mem_valid, proxies) -> loss, through the embedding-level call."""
  loss_fn = losses.get(name)

  def f(x, labels, mem, mem_labels, mem_valid, proxies):
    extra = dict(proxies=proxies) if is_proxy(name) else {}
    return loss_fn(x, labels, ref_embeddings=mem, ref_labels=mem_labels, ref_valid=mem_valid,
                   **extra, **hparams)
  return f


def args_of(problem):
  return tuple(jnp.asarray(problem[k]) for k in ("x", "labels", "mem", "mem_labels", "mem_valid",
                                                 "proxies"))


@pytest.mark.parametrize("name,hparams", CASES, ids=map(case_id, CASES))
def test_matches_numpy(name, hparams):
  with jax.enable_x64(True):
    f = jax.jit(loss_on(name, hparams))
    for seed in range(4):
      problem = random_problem(seed)
      expected = reference(name, hparams, problem)
      np.testing.assert_allclose(f(*args_of(problem)), expected, rtol=1e-9, atol=1e-12)
      assert expected != 0


@pytest.mark.parametrize("name,hparams", MAIN_CASES, ids=map(case_id, MAIN_CASES))
def test_gradient_matches_finite_differences(name, hparams):
  problem = random_problem(10)
  loss_fn = loss_on(name, hparams)
  with jax.enable_x64(True):
    x, labels, mem, mem_labels, mem_valid, proxies = args_of(problem)

    def f(raw_x, raw_proxies):
      return loss_fn(l2_normalize(raw_x), labels, mem, mem_labels, mem_valid, raw_proxies)

    check_grads(jax.jit(f), (1.3 * x, proxies), order=1, modes=["rev"], eps=1e-6, atol=1e-6,
                rtol=1e-6)


@pytest.mark.parametrize("name,hparams", MAIN_CASES, ids=map(case_id, MAIN_CASES))
def test_pair_weights_reproduce_the_gradient(name, hparams):
  problem = random_problem(20)
  x, labels, mem, mem_labels, mem_valid, proxies = args_of(problem)
  extra = dict(ref_embeddings=mem, ref_labels=mem_labels, ref_valid=mem_valid)
  if is_proxy(name):
    loss_fn = losses.get_proxy_loss(name)
    build = lambda e: losses.build_proxy_pairs(e, labels, proxies, **extra)
  else:
    loss_fn = losses.get_pair_loss(name)
    build = lambda e: losses.build_pairs(e, labels, **extra)

  with jax.enable_x64(True):
    @jax.jit
    def weights_and_gradients(e):
      def weighted(e):
        pairs = build(e)
        return losses.weighted_pair_loss(pairs.sim, losses.pair_weights(loss_fn, pairs, **hparams))

      def direct(e):
        pairs = build(e)
        return loss_fn(pairs.sim, pairs.pos, pairs.neg, **hparams)

      pairs = build(e)
      weights = losses.pair_weights(loss_fn, pairs, **hparams)
      return pairs, weights, jax.grad(weighted)(e), jax.grad(direct)(e)

    pairs, weights, via_weights, direct_gradient = weights_and_gradients(x)
  np.testing.assert_allclose(via_weights, direct_gradient, rtol=1e-9, atol=1e-12)
  weights = np.asarray(weights)
  assert np.all(weights[~np.asarray(pairs.pos | pairs.neg)] == 0)  # No weight off the pairs.
  # Supervised NT-Xent may push a positive that holds most of the softmax mass; the global loss's
  # variances pull every pair towards its set's mean distance, from either side.
  if name not in ("ntxent", "global_loss", "ratio_triplet_global"):
    assert np.all(weights[np.asarray(pairs.pos)] <= 0) and np.all(weights[np.asarray(pairs.neg)] >= 0)


@pytest.mark.parametrize("name,hparams", MAIN_CASES, ids=map(case_id, MAIN_CASES))
def test_invariant_to_batch_order_and_to_invalid_rows(name, hparams):
  problem = random_problem(30)
  f = jax.jit(loss_on(name, hparams))
  value = f(*args_of(problem))

  order = np.random.default_rng(0).permutation(len(problem["labels"]))
  permuted = dict(problem, x=problem["x"][order], labels=problem["labels"][order])
  np.testing.assert_allclose(f(*args_of(permuted)), value, rtol=1e-5)

  invalid = ~problem["mem_valid"]
  garbage = dict(problem, mem=np.where(invalid[:, None], 0.5, problem["mem"]),
                 mem_labels=np.where(invalid, problem["labels"][0], problem["mem_labels"]))
  np.testing.assert_allclose(f(*args_of(garbage)), value, rtol=1e-6)
  keep = problem["mem_valid"]
  dropped = dict(problem, mem=problem["mem"][keep], mem_labels=problem["mem_labels"][keep],
                 mem_valid=keep[keep])
  np.testing.assert_allclose(f(*args_of(dropped)), value, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Degenerate inputs, on the unified form directly.

def loss_table(name):
  return losses.get_proxy_loss(name) if is_proxy(name) else losses.get_pair_loss(name)


def satisfied_pairs():
  """Every positive at S = 1, every negative at S = -1, two negatives per anchor (so that the lifted
  structure's soft maxima stay inside its margin), and an anchor without positives."""
  pos = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
  neg = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], bool)
  return np.where(pos, 1.0, -1.0), pos, neg


# Anchor-coupled losses: an anchor without a positive has no term at all. Contrastive and binomial
# deviance score each pair on its own, so their negatives still count (checked against NumPy above).
UNCOUPLED = ("contrastive", "binomial_deviance", "distance_contrastive")
# Smooth losses are never exactly zero; the other pair losses have a hinge and are, once every pair is
# on the right side of its margin.
# The distance contrastive loss's positive term d^2 = 2 - 2 S has no hinge: its W is -1/N even at S = 1.
SMOOTH = ("binomial_deviance", "ntxent", "distance_contrastive")


@pytest.mark.parametrize("name,hparams", MAIN_CASES, ids=map(case_id, MAIN_CASES))
def test_degenerate_inputs(name, hparams):
  """No pairs, no positives, all pairs satisfied, S exactly +-1: finite, never NaN, zero where due."""
  loss_fn = loss_table(name)
  f = jax.jit(jax.value_and_grad(lambda s, p, n: loss_fn(s, p, n, **hparams)))
  sim, pos, neg = satisfied_pairs()
  no_pos = np.zeros_like(pos)
  random_sim = np.random.default_rng(0).uniform(-1, 1, sim.shape)

  def run(s, p, n):
    value, weights = f(jnp.asarray(s, jnp.float32), jnp.asarray(p), jnp.asarray(n))
    assert np.isfinite(value) and np.all(np.isfinite(weights))
    return value, weights

  for s in (sim, np.ones_like(sim), -np.ones_like(sim)):  # Collapsed, antipodal, on the proxy.
    run(s, pos, neg)
  value, weights = run(random_sim, no_pos, no_pos)
  assert value == 0 and np.all(weights == 0)
  if name in losses.names() and name not in UNCOUPLED:
    value, weights = run(random_sim, no_pos, neg)
    assert value == 0 and np.all(weights == 0)
  if name in losses.names() and name not in SMOOTH:
    value, weights = run(sim, pos, neg)
    assert value == 0 and np.all(weights == 0)


# ---------------------------------------------------------------------------------------------------
# Triplets: anchors with more positives than one chunk of the chunked selection, and tied similarities.

def dense_triplet(sim, pos, neg, margin, mining):
  """Batch-all or semi-hard triplet loss over the explicit [B, P, N] cube of triplets."""
  cost = sim[:, None, :] - sim[:, :, None] + margin  # [anchor, positive, negative]
  if mining == "all":
    active = pos[:, :, None] & neg[:, None, :] & (cost > 0)
    return jnp.sum(jnp.where(active, cost, 0.0)) / jnp.maximum(jnp.sum(active), 1)
  easier = neg[:, None, :] & (sim[:, None, :] < sim[:, :, None])
  hardest_easier = jnp.max(jnp.where(easier, sim[:, None, :], -jnp.inf), axis=2)
  cost = jnp.where(pos & jnp.any(easier, axis=2), jax.nn.relu(hardest_easier - sim + margin), 0.0)
  return jnp.sum(cost) / jnp.maximum(jnp.sum(pos), 1)


def crowded_problem(seed, duplicates):
  """Two classes in the batch and 3 in a memory of 110: about 50 positives per anchor. With
  `duplicates`, memory rows repeat batch rows and each other, so that many similarities tie exactly."""
  rng = np.random.default_rng(seed)
  x, mem = unit(rng.normal(size=(16, 5))), unit(rng.normal(size=(110, 5)))
  labels, mem_labels = np.arange(16) % 2, rng.integers(0, 3, 110)
  if duplicates:
    mem[:16], mem_labels[:16] = x, labels
    mem[60:100] = mem[20:60]
  return dict(x=x, labels=labels, mem=mem, mem_labels=mem_labels, mem_valid=np.ones(110, bool),
              proxies=np.zeros((NUM_CLASSES, 5)))


def dense_ratio_triplet(sim, pos, neg, margin):
  """Harwood et al.'s ratio triplet loss over the explicit [B, P, N] cube of triplets."""
  distance = jnp.sqrt(jnp.maximum(2.0 - 2.0 * sim, 1e-12))
  cost = jax.nn.relu(1.0 - distance[:, None, :] / (distance[:, :, None] + margin))
  triplets = pos[:, :, None] & neg[:, None, :]
  return jnp.sum(jnp.where(triplets, cost, 0.0)) / jnp.maximum(jnp.sum(triplets), 1)


CHUNKED_CASES = [("triplet", dict(mining="all", margin=0.1)), ("triplet", dict(mining="all", margin=0.5)),
                 ("triplet", dict(mining="semihard", margin=0.3)), ("ratio_triplet", dict(margin=0.2)),
                 ("ratio_triplet", dict(margin=0.9))]


@pytest.mark.parametrize("name,hparams", CHUNKED_CASES, ids=map(case_id, CHUNKED_CASES))
def test_chunked_triplets_with_many_positives_and_ties(name, hparams):
  """Several chunks of positives per anchor: the value against NumPy (ties included) and the gradient
  against the explicit triplet cube."""
  with jax.enable_x64(True):
    f = jax.jit(loss_on(name, hparams))
    for seed in range(3):
      problem = crowded_problem(seed, duplicates=True)
      assert min(len(p) for p, _ in anchor_sets(problem)) > 32
      np.testing.assert_allclose(f(*args_of(problem)), reference(name, hparams, problem), rtol=1e-9)

    def dense(x, labels, mem, mem_labels, mem_valid, proxies):
      pairs = losses.build_pairs(x, labels, ref_embeddings=mem, ref_labels=mem_labels,
                                 ref_valid=mem_valid)
      if name == "ratio_triplet":
        return dense_ratio_triplet(*pairs, **hparams)
      return dense_triplet(*pairs, **hparams)
    args = args_of(crowded_problem(3, duplicates=False))
    np.testing.assert_allclose(jax.jit(jax.grad(f))(*args), jax.jit(jax.grad(dense))(*args),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mining", ["all", "semihard"])
def test_triplet_with_positives_known_at_compile_time(mining):
  """Masks that are constants of the jitted function, one positive per anchor (as a per-triplet loss,
  vmapped over triplets): the loss equals NumPy's [S_an - S_ap + margin]_+, where XLA's trip-count
  error once made the chunk loop run no iteration and the loss 0."""
  rng = np.random.default_rng(0)
  s_ap, s_an = rng.uniform(-1, 1, 8), rng.uniform(-1, 1, 8)
  loss_fn = losses.get_pair_loss("triplet")

  def one(ap, an):
    sim = jnp.stack([jnp.ones_like(ap), ap, an])[None]
    return loss_fn(sim, jnp.array([[False, True, False]]), jnp.array([[False, False, True]]),
                   margin=0.1, mining=mining)
  expected = np.maximum(s_an - s_ap + 0.1, 0.0)
  if mining == "semihard":  # The negative counts only when less similar than the positive.
    expected = np.where(s_an < s_ap, expected, 0.0)
  np.testing.assert_allclose(jax.jit(jax.vmap(one))(s_ap, s_an), expected, rtol=1e-6, atol=1e-7)
  assert np.any(expected > 0)


# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,hparams", [("triplet", dict(mining="all")),
                                          ("ratio_triplet_global", {})])
def test_all_triplets_fit_in_memory_at_scale(name, hparams):
  """B = 128 anchors against M = 8192 references would be 34 GB of triplets; the chunked forms stay
  within 1 GB of working memory (compiled, not run)."""
  batch, refs, dim = 128, 8192, 512
  loss_fn = losses.get(name)

  def f(e, mem, mem_labels):
    return loss_fn(e, jnp.arange(batch) % 32, ref_embeddings=mem, ref_labels=mem_labels, **hparams)
  compiled = jax.jit(jax.value_and_grad(f)).lower(
      jax.ShapeDtypeStruct((batch, dim), jnp.float32),
      jax.ShapeDtypeStruct((refs - batch, dim), jnp.float32),
      jax.ShapeDtypeStruct((refs - batch,), jnp.int32)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 2**30


def test_registry_and_argument_errors():
  assert set(losses.names()) == {"binomial_deviance", "contrastive", "distance_contrastive",
                                 "lifted_structure", "multi_similarity", "ntxent", "triplet",
                                 "ratio_triplet", "global_loss", "ratio_triplet_global"}
  assert set(losses.proxy_names()) == {"arcface", "cosface", "norm_softmax", "proxy_anchor",
                                       "proxy_nca"}
  e, labels = jnp.asarray(np.eye(4, 6), jnp.float32), jnp.arange(4) % 2
  with pytest.raises(ValueError, match="mining"):
    losses.get("triplet")(e, labels, mining="easy")
  with pytest.raises(ValueError, match="proxies"):
    losses.get("arcface")(e, labels)
  with pytest.raises(ValueError, match="no proxies"):
    losses.get("contrastive")(e, labels, proxies=e)
  with pytest.raises(KeyError, match="arcface"):
    losses.get_pair_loss("arcface")
  with pytest.raises(KeyError, match="known losses"):
    losses.get("circle")
