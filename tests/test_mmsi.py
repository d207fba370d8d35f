"""MMSI: meta-gradients against finite differences and a closed form, and the memory dictionary."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import ml_collections
import numpy as np
import pytest

from configs import default
from mmsi_jax import losses, mining, models, references, step
from mmsi_jax.mining import memory as memory_lib
from mmsi_jax.mining.mmsi import VALIDATION

HPARAMS = dict(alpha=2.0, beta=10.0, base=0.5, epsilon=0.1)


def mmsi_config(**overrides) -> ml_collections.ConfigDict:
  config = default.get_config().miner
  config.name = "mmsi"
  config.mmsi.wait_for_coverage = False
  config.mmsi.virtual_lr = 0.5
  for key, value in overrides.items():
    config.mmsi[key] = value
  return config


class LinearEmbedding(nn.Module):
  """e = x K: no backbone parameters, a linear head, no normalisation (for the closed form)."""
  embed_dim: int = 3

  def setup(self):
    self.head = nn.Dense(self.embed_dim, use_bias=False)

  def features(self, images, train=False):
    del train
    return images.reshape(images.shape[0], -1)

  def embed(self, features):
    return self.head(features)

  def features_and_embeddings(self, images, train=False):
    features = self.features(images, train)
    return features, self.embed(features)

  def __call__(self, images, train=False):
    return self.embed(self.features(images, train))


def step_inputs(model, variables, rng, *, batch=12, classes=4, val=4, memory_rows=10,
                multipliers_in_loss=False):
  """StepInputs of a random problem, built by the train step's own forward pass, and a filled memory;
  the update's multipliers re-weight dL/dS or, with `multipliers_in_loss`, go inside the loss."""
  keys = jax.random.split(rng, 4)
  images = jax.random.normal(keys[0], (batch, 4, 4, 3), jnp.float64)
  labels = jnp.arange(batch) % classes
  val_images = jax.random.normal(keys[1], (val, 4, 4, 3), jnp.float64)
  val_labels = jnp.arange(val) % classes
  refs = references.BatchReferences(classes)
  components = step.Components(
      model=model, loss_fn=losses.get_pair_loss("multi_similarity"), hparams=HPARAMS,
      references=refs, miner=None, schedule=None, tx=None, lr_mults={}, normalization="symmetric")
  state = step.TrainState(step=jnp.array(0), params={models.MODEL_PARAMS: variables["params"]},
                          batch_stats=variables.get("batch_stats", {}), opt_state=None, rng=None)
  sim, sim_vjp, (pairs, features, embeddings, _, _) = step.similarities(components, state, images,
                                                                       labels)
  weights = losses.pair_weights(components.loss_fn, pairs, **HPARAMS)

  inputs = mining.StepInputs(
      step=state.step, params=state.params, batch_stats=state.batch_stats, labels=labels,
      features=features, embeddings=embeddings, pairs=pairs, weights=weights,
      cotangent_of=step.multiplied_cotangent(step.objective_of(components, None, state.step, pairs),
                                             sim, weights, multipliers_in_loss),
      sim_vjp=sim_vjp,
      pairs_of=jax.tree_util.Partial(refs.pairs, None),
      extras={VALIDATION: {"images": val_images, "labels": val_labels}},
      learning_rate=jnp.array(0.1))
  memory = memory_lib.init("global", memory_rows, embeddings.shape[-1], dtype=jnp.float64)
  mem = jax.random.normal(keys[2], (memory_rows, embeddings.shape[-1]), jnp.float64)
  memory = memory_lib.enqueue(memory, models.l2_normalize(mem), jnp.arange(memory_rows) % classes)
  return inputs, memory


def tiny_cnn():
  return models.get("small_cnn", embed_dim=6, widths=(3,))


@pytest.mark.parametrize("scope", ["all", "head"])
def test_meta_gradients_match_finite_differences(scope):
  with jax.enable_x64(True):
    model = tiny_cnn()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3), jnp.float64))
    variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)
    inputs, memory = step_inputs(model, variables, jax.random.PRNGKey(1))
    miner = mining.build(mmsi_config(scope=scope), model, losses.get_pair_loss("multi_similarity"),
                         HPARAMS, num_classes=4)
    meta_loss = miner.meta_loss_fn(memory, inputs)
    assert np.count_nonzero(inputs.weights) > 10

    # d L_meta / d m, at m = 0 (l2rw) and at a generic m (theta' != theta).
    at = jax.random.uniform(jax.random.PRNGKey(2), inputs.weights.shape, jnp.float64)
    for m in (jnp.zeros_like(at), at):
      check_grads(jax.jit(meta_loss), (m,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)
    assert np.any(jax.jit(jax.grad(meta_loss))(at) != 0)

    # d L_meta / d phi through m = phi(pair features).
    _, state = miner.init(jax.random.PRNGKey(3), embed_dim=6, feature_dim=48)
    net_params = jax.tree.map(lambda x: x.astype(jnp.float64), state.net_params)
    objective = jax.jit(lambda phi: meta_loss(miner.net_multipliers(phi, inputs.pairs, inputs.weights)))
    m = miner.net_multipliers(net_params, inputs.pairs, inputs.weights)
    magnitude = np.abs(np.asarray(inputs.weights))
    for group in (np.asarray(inputs.pairs.pos), np.asarray(inputs.pairs.neg)):
      # phi redistributes the pull (push) among the positives (negatives) without changing its total.
      np.testing.assert_allclose(np.sum((np.asarray(m) * magnitude)[group]), magnitude[group].sum(),
                                 rtol=1e-10)
    check_grads(objective, (net_params,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)

    # l2rw's closed form at m = 0 (-alpha W * J grad L_val(theta), J by transposing the VJP, no
    # virtual step) equals the autodiff meta-gradient checked above.
    loss, grad = jax.jit(miner.meta_grad_at_zero)(memory, inputs)
    expected_loss, expected_grad = jax.jit(jax.value_and_grad(meta_loss))(jnp.zeros_like(at))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-13)


def test_meta_gradients_with_the_multipliers_inside_the_loss():
  """The authors' MS weighting, L(S; m) with m S in the exponents: the meta-gradient through the
  virtual step matches finite differences, and l2rw's closed form at m = 0 matches autodiff."""
  with jax.enable_x64(True):
    model = tiny_cnn()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3), jnp.float64))
    variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)
    inputs, memory = step_inputs(model, variables, jax.random.PRNGKey(1), multipliers_in_loss=True)
    miner = mining.build(mmsi_config(mode="l2rw", multipliers_in_loss=True), model,
                         losses.get_pair_loss("multi_similarity"), HPARAMS, num_classes=4)
    meta_loss = miner.meta_loss_fn(memory, inputs)
    at = jax.random.uniform(jax.random.PRNGKey(2), inputs.weights.shape, jnp.float64)
    for m in (jnp.zeros_like(at), at):
      check_grads(jax.jit(meta_loss), (m,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)
    loss, grad = jax.jit(miner.meta_grad_at_zero)(memory, inputs)
    expected_loss, expected_grad = jax.jit(jax.value_and_grad(meta_loss))(jnp.zeros_like(at))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-13)
    # Unlike m * W, the weights at m = 0 are the same for every mined positive of an anchor.
    positives = np.asarray(inputs.pairs.pos[0] & (inputs.weights[0] != 0))
    at_zero = np.asarray(jax.jvp(inputs.cotangent_of, (jnp.zeros_like(at),),
                                 (jnp.ones_like(at),))[1])[0][positives]
    assert positives.sum() >= 2 and np.ptp(at_zero) < 1e-12 * np.abs(at_zero).max()
    with pytest.raises(ValueError, match="multipliers_in_loss"):
      mining.build(mmsi_config(mode="l2rw", multipliers_in_loss=True), model,
                   losses.get_pair_loss("contrastive"), {}, num_classes=4)


def test_l2rw_weights_equal_the_closed_form_for_a_linear_embedding():
  alpha = 0.5
  with jax.enable_x64(True):
    model = LinearEmbedding()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3), jnp.float64))
    variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)
    inputs, memory = step_inputs(model, variables, jax.random.PRNGKey(5))
    miner = mining.build(mmsi_config(mode="l2rw", virtual_lr=alpha), model,
                       losses.get_pair_loss("multi_similarity"), HPARAMS, num_classes=4)
    state = miner.init(jax.random.PRNGKey(0), embed_dim=3, feature_dim=48)[1].replace(memory=memory)
    got, _, _, fallback = jax.jit(miner._meta_step)(state, inputs)

    # Independently: dL_meta/dm_ij = -alpha <grad L_val(theta), W_ij grad S_ij(theta)> at m = 0,
    # with S_ij = x_i K K^T x_j, so grad_K S_ij = x_i e_j^T + x_j e_i^T.
    kernel = np.asarray(variables["params"]["head"]["kernel"])
    x = np.asarray(inputs.features)
    e = x @ kernel
    validation = inputs.extras[VALIDATION]
    val_x = np.asarray(validation["images"]).reshape(len(validation["images"]), -1)

    def val_loss(k):
      val = losses.build_pairs(jnp.asarray(val_x) @ k, validation["labels"],
                               ref_embeddings=memory.embeddings, ref_labels=memory.labels,
                               ref_valid=memory.valid)
      return losses.get_pair_loss("multi_similarity")(val.sim, val.pos, val.neg, **HPARAMS)

    g_val = np.asarray(jax.grad(val_loss)(jnp.asarray(kernel)))
    w = np.asarray(inputs.weights)
    inner = (np.einsum("if,fd,jd->ij", x, g_val, e) + np.einsum("jf,fd,id->ij", x, g_val, e))
    meta_grad = -alpha * w * inner
    expected = np.maximum(-meta_grad, 0)
    expected /= expected.max()
  assert not fallback
  np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
  assert 0 < np.count_nonzero(got) < np.count_nonzero(w)


def test_l2rw_falls_back_to_uniform_weights_when_no_pair_helps():
  with jax.enable_x64(True):
    model = LinearEmbedding()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3), jnp.float64))
    inputs, memory = step_inputs(model, variables, jax.random.PRNGKey(5))
    # Every validation sample alone in its class and memory of other classes only: no positive, so the
    # meta loss is 0 and every meta-gradient is 0.
    validation = {**inputs.extras[VALIDATION], "labels": jnp.arange(4) + 100}
    inputs = inputs._replace(extras={VALIDATION: validation})
    miner = mining.build(mmsi_config(mode="l2rw"), model, losses.get_pair_loss("multi_similarity"),
                       HPARAMS, num_classes=4)
    state = miner.init(jax.random.PRNGKey(0), embed_dim=3, feature_dim=48)[1].replace(memory=memory)
    m, state, _, fallback = jax.jit(miner._meta_step)(state, inputs)
  assert fallback and int(state.fallbacks) == 1
  np.testing.assert_array_equal(m, np.ones_like(m))


def test_warm_up_uses_plain_weights_until_the_memory_covers_every_class():
  with jax.enable_x64(True):
    model = LinearEmbedding()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3), jnp.float64))
    inputs, _ = step_inputs(model, variables, jax.random.PRNGKey(5))
    miner = mining.build(mmsi_config(mode="l2rw", wait_for_coverage=True, memory_size=2), model,
                       losses.get_pair_loss("multi_similarity"), HPARAMS, num_classes=6)
    _, state = miner.init(jax.random.PRNGKey(0), embed_dim=3, feature_dim=48)
    multipliers = jax.jit(miner.multipliers)
    m, state, metrics, _ = multipliers(state, inputs)  # The batch holds classes 0-3 of 6.
    assert metrics["mmsi/ready"] == 0 and np.all(m == 1)
    assert int(metrics["mmsi/covered_classes"]) == 0
    assert int(memory_lib.covered_classes(state.memory, 6)) == 4
    m, state, metrics, _ = multipliers(state, inputs._replace(labels=inputs.labels + 2))
    assert metrics["mmsi/ready"] == 0  # Coverage is checked before this batch is enqueued.
    m, state, metrics, _ = multipliers(state, inputs)
    assert metrics["mmsi/ready"] == 1 and not np.all(m == 1)


def test_global_memory_wraps_around_in_fifo_order():
  memory = memory_lib.init("global", 5, 2)
  for start in (0, 2, 4):
    rows = jnp.arange(start, start + 2, dtype=jnp.float32)
    memory = memory_lib.enqueue(memory, jnp.stack([rows, rows], 1), jnp.arange(start, start + 2))
  # Six rows into five slots: row 5 overwrote row 0 in slot 0.
  np.testing.assert_array_equal(memory.labels, [5, 1, 2, 3, 4])
  np.testing.assert_array_equal(memory.embeddings[:, 0], [5, 1, 2, 3, 4])
  assert memory.valid.all() and int(memory.heads[0]) == 6
  # A batch larger than the memory keeps its newest rows.
  big = memory_lib.enqueue(memory_lib.init("global", 3, 1), jnp.arange(7.0)[:, None], jnp.arange(7))
  assert sorted(np.asarray(big.labels).tolist()) == [4, 5, 6]


def test_per_class_memory_keeps_the_newest_per_class():
  memory = memory_lib.init("per_class", 2, 1, num_classes=3)
  assert memory.embeddings.shape == (6, 1) and not memory.valid.any()
  # Three samples of class 0 in one batch (only the newest two kept) and one of class 2.
  memory = memory_lib.enqueue(memory, jnp.array([[1.0], [2.0], [9.0], [3.0]]), jnp.array([0, 0, 2, 0]))
  assert sorted(np.asarray(memory.embeddings[0:2, 0]).tolist()) == [2.0, 3.0]
  np.testing.assert_array_equal(memory.valid, [True, True, False, False, True, False])
  np.testing.assert_array_equal(memory.heads, [3, 0, 1])
  # The next sample of class 0 overwrites its oldest (2.0); class 2 fills its second slot.
  memory = memory_lib.enqueue(memory, jnp.array([[4.0], [8.0]]), jnp.array([0, 2]))
  assert sorted(np.asarray(memory.embeddings[0:2, 0]).tolist()) == [3.0, 4.0]
  assert sorted(np.asarray(memory.embeddings[4:6, 0]).tolist()) == [8.0, 9.0]
  assert int(memory_lib.covered_classes(memory, 3)) == 2
  np.testing.assert_array_equal(memory.labels[memory.valid], [0, 0, 2, 2])
