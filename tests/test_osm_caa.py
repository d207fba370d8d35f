"""OSM + CAA: the pair weights, the weighted loss and the classifier against an independent NumPy
implementation of the authors' rule, gradients against finite differences, the step's auxiliary loss,
SGD with a step schedule, label noise, training without augmentation and the configs."""

import io
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
import pytest

from configs import cars196, cub200, default, demo
from mmsi_jax import losses, mining, step, train
from mmsi_jax.data import pipeline, transforms
from mmsi_jax.mining.osm_caa import ALL_FEATURES, CLASSIFIER_PARAMS

MARGIN, POS_SIGMA, ATTENTION_SIGMA, LAMBDA = 1.2, 0.8, 0.68, 0.5


def osm_settings(**overrides):
  settings = dict(default.get_config().miner.osm_caa)
  settings.update(overrides)
  return settings


def make_miner(num_classes, **overrides):
  return mining.MINERS.build("osm_caa", osm_settings(**overrides), where="miner.osm_caa", model=None,
                             pair_loss=None, hparams={}, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------------
# The authors' rule, pair by pair, in float64 NumPy.

def np_softmax(logits):
  z = np.exp(logits - logits.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


def np_own_probability(features, kernel, bias, labels):
  return np_softmax(features @ kernel + bias)[np.arange(len(labels)), labels]


def np_pair_weights(x, labels, p, attention=True):
  """{(i, j): w^_ij} over i < j: OSM times min(a_i, a_j), each set normalised to lambda."""
  a = np.exp(-(p - 1) ** 2 / (2 * ATTENTION_SIGMA ** 2))
  raw = {}
  for i in range(len(x)):
    for j in range(i + 1, len(x)):
      d = np.linalg.norm(x[i] - x[j])
      if labels[i] == labels[j]:
        w = np.exp(-d ** 2 / (2 * POS_SIGMA ** 2))
      else:
        w = max(0.0, MARGIN - d)
      raw[i, j] = w * (min(a[i], a[j]) if attention else 1.0)
  totals = {same: sum(w for (i, j), w in raw.items() if (labels[i] == labels[j]) == same)
            for same in (True, False)}
  return {(i, j): LAMBDA * w / (totals[labels[i] == labels[j]] + 1e-12) for (i, j), w in raw.items()}


def np_pair_loss(x, labels, i, j):
  """l_ij = d^2 (positive) or max(0, alpha - d)^2 (negative)."""
  d = np.linalg.norm(x[i] - x[j])
  return d ** 2 if labels[i] == labels[j] else max(0.0, MARGIN - d) ** 2


def np_weighted_loss(x, labels, weights):
  """The authors': sum_{i<j} w^_ij * 1/P * 1/2 l_ij, P = B (B - 1) / 2."""
  num_pairs = len(x) * (len(x) - 1) / 2
  return sum(w * 0.5 * np_pair_loss(x, labels, i, j) / num_pairs for (i, j), w in weights.items())


def np_pair_count_loss(x, labels, weights):
  """Scale "pair_count": sum_{i<j} w^_ij l_ij, the weighted pair losses summed (no 1/P, no 1/2)."""
  return sum(w * np_pair_loss(x, labels, i, j) for (i, j), w in weights.items())


def check_step_gradient(x, labels, multipliers, np_loss):
  """The step's weighted pair sum with `multipliers` has the gradient of np_loss(unit embeddings) at
  1.3 x (NumPy central differences, float64)."""
  def step_objective(raw):
    e = raw / jnp.linalg.norm(raw, axis=-1, keepdims=True)
    pairs = losses.build_pairs(e, jnp.asarray(labels))
    weights = losses.pair_weights(losses.get_pair_loss("distance_contrastive"), pairs, margin=MARGIN)
    return losses.weighted_pair_loss(pairs.sim, weights, jnp.asarray(multipliers))

  raw = 1.3 * x
  gradient = np.asarray(jax.jit(jax.grad(step_objective))(jnp.asarray(raw)))
  numeric = np.zeros_like(raw)
  eps = 1e-6
  for index in np.ndindex(raw.shape):
    up, down = raw.copy(), raw.copy()
    up[index] += eps
    down[index] -= eps
    numeric[index] = (np_loss(unit(up)) - np_loss(unit(down))) / (2 * eps)
  np.testing.assert_allclose(gradient, numeric, rtol=1e-6, atol=1e-10)


def unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def problem(case, seed=0, batch=10, dim=5, feature_dim=6, num_classes=5):
  """Embeddings, labels, features and a classifier. Cases: "random" (a singleton class: its image has no
  positive), "ties" (duplicated embeddings and features: equal distances and probabilities),
  "one_class" (no negatives), "coincident_negative" (a negative pair at distance 0)."""
  rng = np.random.default_rng(seed)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4])[:batch]
  x = unit(rng.normal(size=(batch, dim)))
  features = rng.normal(size=(batch, feature_dim))
  if case == "ties":
    x[1], x[4], features[1], features[4] = x[0], x[3], features[0], features[3]
  if case == "coincident_negative":
    x[6] = x[0]
  if case == "one_class":
    labels = np.zeros(batch, int)
  classifier = {"kernel": rng.normal(size=(feature_dim, num_classes)),
                "bias": rng.normal(size=num_classes) * 0.1}
  return x, labels, features, classifier


def miner_multipliers(miner, x, labels, features, classifier, wrap=True):
  """The miner's multipliers and metrics; `classifier` is the one over all features (`wrap`) or the
  classifiers by group."""
  pairs = losses.build_pairs(jnp.asarray(x), jnp.asarray(labels))
  classifiers = {ALL_FEATURES: classifier} if wrap else classifier
  inputs = mining.StepInputs(
      step=jnp.zeros((), jnp.int32), params={CLASSIFIER_PARAMS: jax.tree.map(jnp.asarray, classifiers)},
      batch_stats={}, labels=jnp.asarray(labels), features=jnp.asarray(features),
      embeddings=jnp.asarray(x), pairs=pairs, weights=None, cotangent_of=None, sim_vjp=None,
      pairs_of=None, extras={},
      learning_rate=jnp.zeros(()))
  multipliers, _, metrics, _ = jax.jit(miner.multipliers)(None, inputs)
  return np.asarray(multipliers), metrics


@pytest.mark.parametrize("attention", [True, False], ids=["osm_caa", "osm"])
@pytest.mark.parametrize("case", ["random", "ties", "one_class", "coincident_negative"])
def test_weights_and_weighted_loss_match_numpy(case, attention):
  """m = w^ on both entries of every pair; the step's weighted pair sum has the gradient of the
  authors' loss with the weights held constant (NumPy finite differences, float64)."""
  with jax.enable_x64(True):
    x, labels, features, classifier = problem(case)
    miner = make_miner(5, attention=attention)
    multipliers, metrics = miner_multipliers(miner, x, labels, features, classifier)
    p = np_own_probability(features, classifier["kernel"], classifier["bias"], labels)
    expected = np_pair_weights(x, labels, p, attention)
    assert np.all(np.isfinite(multipliers)) and np.all(np.diag(multipliers) == 0)
    for (i, j), w in expected.items():
      np.testing.assert_allclose([multipliers[i, j], multipliers[j, i]], [w, w], rtol=1e-9, atol=1e-15)
    same = labels[:, None] == labels[None, :]
    for group in (same & ~np.eye(len(x), dtype=bool), ~same):  # Each set sums to lambda (or is empty).
      assert np.isclose(multipliers[group].sum() / 2, LAMBDA) or not group.any()
    if case == "one_class":
      assert np.all(multipliers[~same] == 0)
    if case == "coincident_negative":  # Weighted max(0, alpha - 0); the loss has no gradient there.
      assert multipliers[0, 6] > 0
      return
    if attention:
      np.testing.assert_allclose(metrics["osm_caa/attention"],
                                 np.mean(np.exp(-(p - 1) ** 2 / (2 * ATTENTION_SIGMA ** 2))))

    check_step_gradient(x, labels, multipliers,
                        lambda e: np_weighted_loss(e, labels, expected))


def test_pair_count_scale_and_refusals():
  """Scale "pair_count": m times the B (B - 1) = 2P ordered pairs the loss averages over, so that the
  step trains on sum_{i<j} w^_ij l_ij, 2P times the authors' loss."""
  with jax.enable_x64(True):
    x, labels, features, classifier = problem("random")
    authors, _ = miner_multipliers(make_miner(5), x, labels, features, classifier)
    rescaled, _ = miner_multipliers(make_miner(5, scale="pair_count"), x, labels, features, classifier)
    np.testing.assert_allclose(rescaled, authors * len(x) * (len(x) - 1), rtol=1e-12)
    p = np_own_probability(features, classifier["kernel"], classifier["bias"], labels)
    weights = np_pair_weights(x, labels, p)
    check_step_gradient(x, labels, rescaled, lambda e: np_pair_count_loss(e, labels, weights))
  miner = make_miner(5)
  pairs = losses.build_pairs(jnp.asarray(x), jnp.asarray(labels), ref_embeddings=jnp.asarray(x),
                             ref_labels=jnp.asarray(labels))
  inputs = mining.StepInputs(jnp.zeros(()), {}, {}, jnp.asarray(labels), jnp.asarray(features),
                             jnp.asarray(x), pairs, None, None, None, None, {}, jnp.zeros(()))
  with pytest.raises(ValueError, match="references.name='batch'"):
    miner.multipliers(None, inputs)
  with pytest.raises(ValueError, match="scale='mean'"):
    make_miner(5, scale="mean")
  with pytest.raises(ValueError, match="classifier_weight=0"):
    make_miner(5, classifier_weight=0)


def np_focused_cross_entropy(logits, labels, focus=None):
  p = np_softmax(logits)[np.arange(len(labels)), labels]
  if focus is None:
    focus = np.exp(-(p - 0.5) ** 2 / (2 * 0.18 ** 2))
    focus = focus / focus.sum()
  return -np.sum(focus * np.log(p)), focus


def test_classifier_loss_and_its_gradient_match_numpy():
  """The focused cross-entropy against NumPy; its gradient, with the focus v held constant, against
  finite differences in float64, w.r.t. the classifier and the features."""
  with jax.enable_x64(True):
    _, labels, features, classifier = problem("random")
    features = 0.5 * features  # Probabilities spread over (0, 1): every focus weight matters.
    miner = make_miner(5, classifier_weight=2.0)
    params = {CLASSIFIER_PARAMS: {ALL_FEATURES: jax.tree.map(jnp.asarray, classifier)}}
    (value, metrics), (grad_params, grad_features) = jax.jit(jax.value_and_grad(
        miner.auxiliary_loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(features),
                                                             jnp.asarray(labels))
    logits = features @ classifier["kernel"] + classifier["bias"]
    expected, focus = np_focused_cross_entropy(logits, labels)
    np.testing.assert_allclose(value, 2.0 * expected, rtol=1e-12)
    np.testing.assert_allclose(metrics["osm_caa/classifier_loss"], expected, rtol=1e-12)

    def frozen(kernel, bias, f):
      return 2.0 * np_focused_cross_entropy(f @ kernel + bias, labels, focus)[0]

    arrays = [classifier["kernel"], classifier["bias"], features]
    analytic = [grad_params[CLASSIFIER_PARAMS][ALL_FEATURES]["kernel"],
                grad_params[CLASSIFIER_PARAMS][ALL_FEATURES]["bias"],
                grad_features]
    for which, (array, gradient) in enumerate(zip(arrays, analytic)):
      numeric = np.zeros_like(array)
      for index in np.ndindex(array.shape):
        shifted = []
        for sign in (1, -1):
          moved = [a.copy() for a in arrays]
          moved[which][index] += sign * 1e-6
          shifted.append(frozen(*moved))
        numeric[index] = (shifted[0] - shifted[1]) / 2e-6
      np.testing.assert_allclose(gradient, numeric, rtol=1e-6, atol=1e-9)


def test_a_classifier_per_feature_group():
  """A model with feature groups (BN-Inception's "osm_caa" layout) gets one classifier per group: the
  auxiliary loss is the sum of their focused cross-entropies (NumPy), and the attention reads the first
  group's classifier alone (the multipliers of a one-group miner over the first group's features)."""
  groups = (("pool5", 4), ("inception_4e", 3), ("inception_3c", 5))
  with jax.enable_x64(True):
    x, labels, features, _ = problem("random", feature_dim=12)
    model = types.SimpleNamespace(feature_groups=groups)
    miner = mining.MINERS.build("osm_caa", osm_settings(), where="miner.osm_caa", model=model,
                                pair_loss=None, hparams={}, num_classes=5)
    params, _ = miner.init(jax.random.PRNGKey(0), 3, 12)
    classifiers = params[CLASSIFIER_PARAMS]
    assert {name: c["kernel"].shape for name, c in classifiers.items()} == {
        "pool5": (4, 5), "inception_4e": (3, 5), "inception_3c": (5, 5)}
    rng = np.random.default_rng(1)  # Non-zero biases too.
    classifiers = jax.tree.map(lambda a: np.asarray(a) + 0.3 * rng.normal(size=a.shape), classifiers)
    value, metrics = miner.auxiliary_loss({CLASSIFIER_PARAMS: jax.tree.map(jnp.asarray, classifiers)},
                                          jnp.asarray(features), jnp.asarray(labels))
    starts = np.cumsum([0] + [width for _, width in groups])
    expected = [np_focused_cross_entropy(features[:, start:stop] @ classifiers[name]["kernel"]
                                         + classifiers[name]["bias"], labels)[0]
                for (name, _), start, stop in zip(groups, starts, starts[1:])]
    np.testing.assert_allclose(value, sum(expected), rtol=1e-12)
    np.testing.assert_allclose(metrics["osm_caa/classifier_loss/inception_3c"], expected[2], rtol=1e-12)
    multipliers, _ = miner_multipliers(miner, x, labels, features, classifiers, wrap=False)
    first_only, _ = miner_multipliers(make_miner(5), x, labels, features[:, :4], classifiers["pool5"])
    np.testing.assert_allclose(multipliers, first_only, rtol=1e-12)
    with pytest.raises(ValueError, match="do not add up"):
      miner.init(jax.random.PRNGKey(0), 3, 13)


def tiny_osm_config(tmp_path):
  config = demo.get_config("osm_caa")
  config.data.data_dir = str(tmp_path / "data")
  config.data.classes_per_batch = 4
  config.data.samples_per_class = 3
  config.model.widths = (4, 8)
  config.model.embed_dim = 6
  config.optim.update(name="sgd", momentum=0.0, weight_decay=0.0, learning_rate=1.0,
                      schedule="constant", warmup_steps=0)
  return config


def test_the_train_step_adds_the_classifier_loss_to_the_objective(tmp_path):
  """One step of plain SGD (lr 1) moves every parameter by minus the gradient of
  sum_ij m_ij W_ij S_ij + L_cls, computed here directly: the classifier's loss trains the classifier
  and, through the features, the backbone; the embedding head only sees the pair loss."""
  config = tiny_osm_config(tmp_path)
  components = step.build(config, num_classes=10)
  state = step.create_train_state(jax.random.PRNGKey(0), components, (12, 12, 3))
  images, labels = tiny_batch(12)
  new_state, metrics = step.make_train_step(components)(state, {"images": images,
                                                                "labels": labels})
  miner, model = components.miner, components.model

  def objective(params):
    (features, embeddings), _ = model.apply(
        {"params": params["model"], "batch_stats": state.batch_stats},
        step.transforms.normalize(jnp.asarray(images), config.data.normalization), train=True,
        mutable=["batch_stats"], method="features_and_embeddings")
    pairs = losses.build_pairs(embeddings, jnp.asarray(labels))
    weights = losses.pair_weights(components.loss_fn, pairs, **components.hparams)
    inputs = mining.StepInputs(state.step, params, state.batch_stats, jnp.asarray(labels), features,
                               embeddings, pairs, weights, None, None, None, {}, jnp.zeros(()))
    multipliers = miner.multipliers(None, inputs)[0]
    classifier_loss = miner.auxiliary_loss(params, features, jnp.asarray(labels))[0]
    return losses.weighted_pair_loss(pairs.sim, weights, multipliers) + classifier_loss

  gradient = jax.jit(jax.grad(objective))(state.params)
  expected = jax.tree.map(lambda p, g: p - g, state.params, gradient)
  for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(new_state.params)[0],
                              jax.tree.leaves(expected)):
    np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(gradient[CLASSIFIER_PARAMS][ALL_FEATURES]["kernel"]).max()) > 0
  assert set(gradient) == {"model", CLASSIFIER_PARAMS}
  assert metrics["train/auxiliary_loss"] > 0


def tiny_batch(size):
  """12 images [12, size, size, 3] (uint8) of 4 classes x 3."""
  images = np.random.default_rng(0).integers(0, 256, (12, size, size, 3), dtype=np.uint8)
  return images, np.repeat(np.arange(4), 3).astype(np.int32)


def test_the_authors_layout_trains_every_classifier_and_branch(tmp_path):
  """BN-Inception's "osm_caa" layout in the step: a classifier per feature group, each trained; the
  embedding (the inception_4e branch) learns from the pair loss and its classifier, the inception_3c
  branch from its classifier alone; no embedding head. (The step's objective is checked term by term
  above on one feature group; the groups' classifier loss in test_a_classifier_per_feature_group.)"""
  config = tiny_osm_config(tmp_path)
  config.model = ml_collections.ConfigDict(dict(name="bn_inception", embed_dim=8, pooling="avg",
                                                layout="osm_caa"))
  components = step.build(config, num_classes=10)
  state = step.create_train_state(jax.random.PRNGKey(0), components, (32, 32, 3))
  images, labels = tiny_batch(32)
  new_state, metrics = step.make_train_step(components)(state, {"images": images, "labels": labels})
  moved = jax.tree.map(lambda new, old: float(jnp.abs(new - old).max()), new_state.params, state.params)
  assert set(moved[CLASSIFIER_PARAMS]) == {"pool5", "inception_4e", "inception_3c"}
  assert all(leaf > 0 for leaf in jax.tree.leaves(moved[CLASSIFIER_PARAMS]))
  backbone = moved["model"]["backbone"]
  assert "head" not in moved["model"]
  for branch in ("inception_4e_branch", "inception_3c_branch"):
    assert backbone[branch]["fc"]["kernel"] > 0 and backbone[branch]["conv"]["kernel"] > 0
  assert backbone["conv1_7x7_s2"]["kernel"] > 0
  for name in ("", "/inception_4e", "/inception_3c"):
    assert np.isfinite(metrics[f"osm_caa/classifier_loss{name}"])


def test_sgd_with_a_step_schedule_is_caffes():
  """v <- mu v + lr(t) (g + wd theta), theta <- theta - v, lr halved at each boundary: a NumPy loop
  on a quadratic."""
  optim = ml_collections.ConfigDict(dict(
      name="sgd", momentum=0.9, weight_decay=0.1, learning_rate=0.2, schedule="step",
      step_boundaries=(2, 4), step_factor=0.5, warmup_steps=0, eps=1e-8, lr_mults={"proxies": 1.0}))
  schedule = step.create_schedule(optim, 6)
  tx = step.create_optimizer(optim, schedule)
  target = np.array([1.0, -2.0, 0.5])
  theta = jnp.zeros(3)
  opt_state = tx.init(theta)
  expected, velocity = np.zeros(3), np.zeros(3)
  for t in range(6):
    grad = 2 * (theta - target)
    updates, opt_state = tx.update(grad, opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    lr = 0.2 * 0.5 ** sum(t >= b for b in (2, 4))
    velocity = 0.9 * velocity + lr * (2 * (expected - target) + 0.1 * expected)
    expected = expected - velocity
    np.testing.assert_allclose(theta, expected, rtol=1e-5)


def test_label_noise_shuffles_a_fixed_fraction():
  labels = np.repeat(np.arange(20), 10)
  noisy = pipeline.shuffled_labels(labels, 0.1, seed=3)
  changed = noisy != labels
  assert 0 < changed.sum() <= 20  # 20 labels shuffled; a few may land on their own class.
  np.testing.assert_array_equal(np.sort(noisy), labels)  # A permutation: class sizes kept.
  np.testing.assert_array_equal(noisy, pipeline.shuffled_labels(labels, 0.1, seed=3))
  assert np.any(noisy != pipeline.shuffled_labels(labels, 0.1, seed=4))
  np.testing.assert_array_equal(pipeline.shuffled_labels(labels, 0.0, seed=3), labels)

  class Records:
    def __len__(self):
      return len(labels)

    def __getitems__(self, indices):
      return [{"label": labels[i], "image": i} for i in indices]

    def __getitem__(self, index):
      return self.__getitems__([index])[0]

  relabeled = pipeline.RelabeledSource(Records(), noisy)
  indices = np.flatnonzero(changed)[:3]
  assert [r["label"] for r in relabeled.__getitems__(indices)] == noisy[indices].tolist()
  assert relabeled[int(indices[0])] == {"label": noisy[indices[0]], "image": indices[0]}


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.optim.update(schedule="step", step_boundaries=(500, 100)), "step_boundaries"),
    (lambda c: c.optim.update(name="sgd", momentum=1.0), "momentum"),
    (lambda c: c.data.update(label_noise=1.5), "label_noise"),
    (lambda c: c.miner.osm_caa.update(attention_sigma=0.0), "attention_sigma=0.0 must be positive"),
    (lambda c: c.miner.osm_caa.update(scal="authors"), "miner.osm_caa.scal is not a setting"),
])
def test_config_errors(edit, message):
  config = demo.get_config("osm_caa")
  edit(config)
  with pytest.raises(ValueError, match=message):
    train.check_config(config)


def test_authors_configs():
  for module, lr, steps in ((cub200, 5e-4, 3_000), (cars196, 1e-3, 10_000)):
    config = module.get_config("osm_caa")
    train.check_config(config)
    assert (config.optim.name, config.optim.learning_rate, config.train.num_steps) == ("sgd", lr, steps)
    assert config.data.classes_per_batch * config.data.samples_per_class == 56
    assert config.miner.osm_caa.scale == "authors" and not config.model.frozen_bn
    assert config.model.layout == "osm_caa" and config.model.embed_dim == 1024
  for variant in ("distance_contrastive", "osm", "osm_caa"):
    train.check_config(demo.get_config(variant))


def test_center_crop_training_is_the_test_transform():
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)).save(buffer, "PNG")
  data = ml_collections.ConfigDict(dict(train_crop="center", image_size=16, resize_size=20, flip=True))
  image = transforms.train_transform(data)(buffer.getvalue(), np.random.default_rng(1))
  np.testing.assert_array_equal(image, transforms.test_transform(data)(buffer.getvalue()))
  assert image.shape == (16, 16, 3)
