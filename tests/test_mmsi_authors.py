"""The MMSI authors' step (docs/METHODS.md, MMSI) is what the authors'-setup configs run.

One l2rw step of the project, configured by configs/real_datasets.py's `mmsi_contrastive` / `mmsi_ms`
on a tiny float64 MLP, gives the per-pair weights of an independent NumPy re-expression of the authors'
step: the batch enqueued into the per-class dictionary first, the validation batch against the
dictionary only, an unmined meta loss, a virtual step over all parameters at the model's learning rate,
weights relu(-dL_meta/dm) divided by their sum, then by their maximum. Flipping a switch changes the
weights (or, for the warm-up switches, whether the step updates at all).

For MS the weights scale S inside the exponents (`multipliers_in_loss`, with the prefactor 2), so the
weights' coefficients are the loss's pair gradients at S = 0 and the real update is the gradient of
L(m S); for contrastive, linear in its pair terms, that is the same as re-weighting dL/dS. The real
update's gradient and Adam step are checked too.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import real_datasets
from mmsi_jax import models, step
from mmsi_jax.data import transforms
from mmsi_jax.mining import memory as memory_lib

NUM_CLASSES = 100
BATCH_LABELS = np.repeat(np.arange(4), 3)  # 4 classes x 3 images.
VAL_LABELS = np.array([0, 1, 2, 3, 10, 20, 30, 40, 50, 60])  # 10 classes x 1 image.
PREFILLED = [c for c in range(NUM_CLASSES) if c not in (2, 3)]  # 98 classes before the batch.
IMAGE_SHAPE = (2, 2, 3)


class MLPEmbedding(nn.Module):
  """features = tanh(x / 128 W1 + b1) (optionally BatchNorm before tanh), e = normalise(features W2 +
  b2), x the images as the step normalises them."""
  hidden: int = 6
  embed_dim: int = 4
  batch_norm: bool = False

  def setup(self):
    self.backbone = nn.Dense(self.hidden, param_dtype=jnp.float64)
    self.head = nn.Dense(self.embed_dim, param_dtype=jnp.float64)
    if self.batch_norm:
      self.bn = nn.BatchNorm(momentum=0.9, param_dtype=jnp.float64)

  def features(self, images, train=False):
    x = self.backbone(images.reshape(images.shape[0], -1).astype(jnp.float64) / 128.0)
    if self.batch_norm:
      x = self.bn(x, use_running_average=not train)
    return jnp.tanh(x)

  def embed(self, features):
    return models.l2_normalize(self.head(features))

  def features_and_embeddings(self, images, train=False):
    features = self.features(images, train)
    return features, self.embed(features)

  def __call__(self, images, train=False):
    return self.embed(self.features(images, train))


def authors_config(variant, **mmsi):
  config = real_datasets.get_config("cub200", variant)  # Its input: BGR 0-255 minus the Caffe mean.
  config.miner.mmsi.update(mmsi)
  return config


def problem(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (len(BATCH_LABELS), *IMAGE_SHAPE), dtype=np.uint8)
  val_images = rng.integers(0, 256, (len(VAL_LABELS), *IMAGE_SHAPE), dtype=np.uint8)
  # Two validation images of different classes all but equal: an active contrastive negative, if
  # validation-vs-validation pairs are counted.
  val_images[5] = np.clip(val_images[4].astype(int) + rng.integers(-2, 3, IMAGE_SHAPE), 0, 255)
  dictionary = {c: [unit(rng.normal(size=4)) for _ in range(2)] for c in PREFILLED}
  return images, val_images, dictionary


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build(config, dictionary, model=None, num_classes=NUM_CLASSES):
  """The project's jitted step for `config`, its state with the dictionary filled, and the m it uses."""
  components = step.build(config, num_classes=num_classes, model=model or MLPEmbedding())
  state = step.create_train_state(jax.random.PRNGKey(0), components, IMAGE_SHAPE)
  state = filled(state, config, dictionary, num_classes)
  real_multipliers = components.miner.multipliers

  def recording(miner_state, inputs):
    mined = real_multipliers(miner_state, inputs)
    return mined._replace(metrics={**mined.metrics, "test/m": mined.multipliers})

  object.__setattr__(components.miner, "multipliers", recording)
  return components, state, step.make_train_step(components)


def filled(state, config, dictionary, num_classes=NUM_CLASSES):
  """The state with its MMSI dictionary holding `dictionary` ({class: rows, oldest first})."""
  mmsi = config.miner.mmsi
  memory = memory_lib.init(mmsi.memory_layout, mmsi.memory_size, 4, num_classes, dtype=jnp.float64)
  labels = [c for c, rows in dictionary.items() for _ in rows]
  rows = [row for rows in dictionary.values() for row in rows]
  memory = memory_lib.enqueue(memory, jnp.asarray(np.array(rows)), jnp.asarray(labels))
  return state.replace(miner=state.miner.replace(memory=memory))


def batch_of(images, val_images, val_labels=VAL_LABELS):
  return {"images": jnp.asarray(images), "labels": jnp.asarray(BATCH_LABELS),
          "extra": {"validation": {"images": jnp.asarray(val_images),
                                   "labels": jnp.asarray(val_labels)}}}


# ---------------------------------------------------------------------------------------------------
# The authors' step in NumPy.

def forward(p, x):
  h = np.tanh(x @ p["w1"] + p["b1"])
  z = h @ p["w2"] + p["b2"]
  return h, z, z / np.linalg.norm(z, axis=1, keepdims=True)


def contrastive_grad(sim, pos, neg, pos_margin=1.0, neg_margin=0.8):
  """dL/dS of L = 1/B sum [pos: relu(pos_margin - S)] + [neg: relu(S - neg_margin)]."""
  return (np.where(pos & (sim < pos_margin), -1.0, 0.0)
          + np.where(neg & (sim > neg_margin), 1.0, 0.0)) / sim.shape[0]


def ms_grad(sim, pos, neg, alpha, beta, base, epsilon, mine, prefactor=1.0, at=None):
  """dL/dX of the MS loss averaged over anchors, c/alpha log(1 + sum_p exp(-alpha (X_p - base))) + c/beta
  log(1 + sum_n exp(beta (X_n - base))), at X = `at` (default: S), its pairs mined on S with epsilon (or
  not); c the prefactor."""
  at = sim if at is None else at
  grad = np.zeros_like(sim)
  for i in range(sim.shape[0]):
    p, n = pos[i].copy(), neg[i].copy()
    if mine and p.any() and n.any():
      hardest_pos, hardest_neg = sim[i][pos[i]].min(), sim[i][neg[i]].max()
      p = pos[i] & (sim[i] - epsilon < hardest_neg)
      n = neg[i] & (sim[i] + epsilon > hardest_pos)
    if not (p.any() and n.any()):
      continue
    ep = np.where(p, np.exp(-alpha * (at[i] - base)), 0.0)
    en = np.where(n, np.exp(beta * (at[i] - base)), 0.0)
    grad[i] = -ep / (1 + ep.sum()) + en / (1 + en.sum())
  return prefactor * grad / sim.shape[0]


def backprop(params, x, h, z, e, g_e):
  """The MLP's parameter gradients for dL/de = g_e (the forward pass's h, z, e)."""
  norm = np.linalg.norm(z, axis=1, keepdims=True)
  g_z = (g_e - e * np.sum(e * g_e, axis=1, keepdims=True)) / norm
  g_a = (g_z @ params["w2"].T) * (1 - h ** 2)
  return {"w1": x.T @ g_a, "b1": g_a.sum(0), "w2": h.T @ g_z, "b2": g_z.sum(0)}


def authors_step(params, x, xv, dictionary, d_size, loss, hparams, lr):
  """The authors' l2rw weights [B, B] for one step (docs/METHODS.md, MMSI) and the real update's
  parameter gradients; for MS the weights scale S inside the exponents: L(m S)."""
  h, z, e = forward(params, x)
  # 1. Enqueue first: a per-class FIFO of the last d_size embeddings.
  dictionary = {c: list(rows)[-d_size:] for c, rows in dictionary.items()}
  for i, c in enumerate(BATCH_LABELS):
    dictionary[c] = (dictionary.get(c, []) + [e[i]])[-d_size:]
  assert len(dictionary) >= 98  # T classes: the step goes on.
  ref_labels = np.array([c for c, rows in dictionary.items() for _ in rows])
  refs = np.array([row for rows in dictionary.values() for row in rows])

  def pair_grad(sim, pos, neg, mine, at=None):
    if loss == "contrastive":  # Linear in the weights: m l(S) weights dL/dS by m.
      return contrastive_grad(sim, pos, neg, **hparams)
    return ms_grad(sim, pos, neg, **hparams, mine=mine, at=at)

  # 2. The batch's pairs and the weights' coefficients w_ij = d^2 L(m S) / dS_ij dm_ij at m = 0: the
  #    contrastive dL/dS_ij; for MS, dL/dX_ij at X = m S = 0 (the training loss, mined on S).
  same = BATCH_LABELS[:, None] == BATCH_LABELS[None, :]
  pos, neg = same & ~np.eye(len(x), dtype=bool), ~same
  sim = e @ e.T
  w = pair_grad(sim, pos, neg, mine=True, at=np.zeros_like(sim))
  # 3. g' = grad_theta L_val: the validation batch against the dictionary only, unmined.
  hv, zv, ev = forward(params, xv)
  val_same = VAL_LABELS[:, None] == ref_labels[None, :]
  g_sim = pair_grad(ev @ refs.T, val_same, ~val_same, mine=False)
  g = backprop(params, xv, hv, zv, ev, g_sim @ refs)
  # 4. dL_meta/dm_ij at m = 0 for theta'(m) = theta - lr grad sum_ij m_ij l_ij: -lr w_ij <grad S_ij, g'>,
  #    the directional derivative of S_ij along g' (forward mode).
  a_t = x @ g["w1"] + g["b1"]
  h_t = (1 - h ** 2) * a_t
  z_t = h_t @ params["w2"] + h @ g["w2"] + g["b2"]
  norm = np.linalg.norm(z, axis=1, keepdims=True)
  e_t = (z_t - e * np.sum(e * z_t, axis=1, keepdims=True)) / norm
  s_t = e_t @ e.T + e @ e_t.T
  meta_grad = -lr * w * s_t
  # 5. relu, divided by the sum, then by the maximum.
  m = np.maximum(-meta_grad, 0.0)
  m = m / m.sum()
  m = m / m.max()
  # 6. The real update's gradient: of sum_ij m_ij l_ij(S) (contrastive) or of L(m S) (MS).
  cotangent = m * pair_grad(sim, pos, neg, mine=True, at=m * sim)
  return m, backprop(params, x, h, z, e, (cotangent + cotangent.T) @ e)


def numpy_params(state):
  p = jax.tree.map(np.asarray, state.params[models.MODEL_PARAMS])
  return {"w1": p["backbone"]["kernel"], "b1": p["backbone"]["bias"], "w2": p["head"]["kernel"],
          "b2": p["head"]["bias"]}


def normalised(images):
  """The MLP's input: uint8 RGB -> BGR minus the Caffe mean (exact in float32), / 128."""
  bgr = images[..., ::-1].astype(np.float64) - np.array(transforms.CAFFE_MEAN_BGR)
  return bgr.reshape(len(images), -1) / 128.0


@pytest.mark.parametrize("variant", ["mmsi_contrastive", "mmsi_ms"])
def test_the_authors_setup_runs_the_authors_step(variant):
  images, val_images, dictionary = problem()
  with jax.enable_x64(True):
    config = authors_config(variant)
    components, state, train_step = build(config, dictionary)
    params = numpy_params(state)
    # Past embeddings of the validation classes near their validation images, as after some training:
    # then MS's pair mining drops negatives of the meta loss.
    rng = np.random.default_rng(2)
    near = unit(forward(params, normalised(val_images))[2] + 0.2 * rng.normal(size=(10, 4)))
    dictionary = {**dictionary, **{c: [near[k]] * 2 for k, c in enumerate(VAL_LABELS) if c >= 4}}
    components, state, train_step = build(config, dictionary)
    new_state, metrics = train_step(state, batch_of(images, val_images))
    got = np.asarray(metrics["test/m"])
    hparams = dict(config.loss.hparams)
    d_size = config.miner.mmsi.memory_size
    expected, real_grads = authors_step(params, normalised(images), normalised(val_images),
                                        dictionary, d_size, config.loss.name, hparams, 1e-5)
    assert float(components.schedule(0)) == 1e-5  # The full rate from the first step.
    assert metrics["mmsi/update"] == 1 and metrics["mmsi/fallback"] == 0
    assert 3 <= np.count_nonzero(got) < got.size
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)
    # The real update: the gradient of the weighted loss, then Adam's first step with L2 decay.
    np.testing.assert_allclose(metrics["train/grad_norm"],
                               np.sqrt(sum(np.sum(g ** 2) for g in real_grads.values())), rtol=1e-9)
    new_params = numpy_params(new_state)
    for name, grad in real_grads.items():
      grad = grad + config.optim.weight_decay * params[name]
      np.testing.assert_allclose(new_params[name] - params[name],
                                 -1e-5 * grad / (np.abs(grad) + config.optim.eps), rtol=1e-7,
                                 atol=1e-15, err_msg=name)

    if variant == "mmsi_contrastive":
      return
    # The authors' MS weighting: a negative's coefficient is exp(-beta / 2) ~ 2e-9 of a positive's.
    negatives = ~(BATCH_LABELS[:, None] == BATCH_LABELS[None, :])
    assert got[~negatives].max() == 1 and 0 < got[negatives].max() < 1e-7
    # Each switch flipped to the project's default changes the weights beyond the tolerance above (on
    # MS, where every one of them acts; on contrastive meta_mining has nothing to turn off).
    flips = {"enqueue": "after", "meta_references": "dictionary_and_validation", "meta_mining": True,
             "multipliers_in_loss": False}
    for key, value in flips.items():
      _, state, train_step = build(authors_config(variant, **{key: value}), dictionary)
      _, metrics = train_step(state, batch_of(images, val_images))
      assert np.abs(np.asarray(metrics["test/m"]) - got).max() > 1e-6, key  # 100x the tolerance.


def test_no_update_until_the_dictionary_holds_t_classes_nor_at_a_zero_meta_loss():
  images, val_images, dictionary = problem(1)
  model = MLPEmbedding(batch_norm=True)  # BatchNorm statistics that a training-mode pass changes.

  def one_step(config, dictionary, val_labels=VAL_LABELS, num_classes=NUM_CLASSES, built=None):
    _, state, train_step = built or build(config, dictionary, model, num_classes)
    state = filled(state, config, dictionary, num_classes)
    new_state, metrics = train_step(state, batch_of(images, val_images, val_labels))
    assert int(new_state.step) == 1
    kept = jax.tree.map(lambda a, b: bool(np.all(a == b)),
                        (new_state.params, new_state.opt_state, new_state.batch_stats),
                        (state.params, state.opt_state, state.batch_stats))
    return all(jax.tree.leaves(kept)), new_state, metrics

  with jax.enable_x64(True):
    config = authors_config("mmsi_contrastive")
    built = build(config, dictionary, model)
    # 94 classes after the batch is enqueued, T = 98: no update at all, the dictionary fills.
    few = {c: rows for c, rows in dictionary.items() if c < 94}
    kept, new_state, metrics = one_step(config, few, built=built)
    assert kept and metrics["mmsi/update"] == 0 and metrics["mmsi/ready"] == 0
    assert int(memory_lib.covered_classes(new_state.miner.memory, NUM_CLASSES)) == 94
    assert not one_step(authors_config("mmsi_contrastive", warmup_update="plain"), few)[0]
    assert not one_step(authors_config("mmsi_contrastive", min_classes=94), few)[0]
    # 96 classes before the batch, 98 after it: the count is taken after the enqueue.
    before = {c: rows for c, rows in dictionary.items() if c >= 4}
    kept, _, metrics = one_step(config, before, built=built)
    assert not kept and metrics["mmsi/update"] == 1
    assert one_step(authors_config("mmsi_contrastive", enqueue="after"), before)[0]
    # MS with no validation class in the dictionary: a meta loss of exactly 0 skips the step.
    config = authors_config("mmsi_ms")
    kept, _, metrics = one_step(config, dictionary, np.arange(110, 120), num_classes=120)
    assert kept and metrics["mmsi/ready"] == 1 and metrics["mmsi/meta_loss"] == 0
    assert metrics["mmsi/update"] == 0 and metrics["mmsi/fallbacks_total"] == 0
