"""Models of the registry: shapes, unit-norm embeddings, the features/embed split, frozen BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsi_jax import models


@pytest.mark.parametrize("name, kwargs, size", [
    ("small_cnn", dict(embed_dim=8, widths=(4, 8)), 16),
    ("resnet18", dict(embed_dim=8, pooling="max_avg"), 32),
])
def test_embeddings_are_unit_norm_and_split_into_features_and_head(name, kwargs, size):
  model = models.get(name, **kwargs)
  images = jax.random.normal(jax.random.PRNGKey(0), (3, size, size, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  embeddings = model.apply(variables, images)
  assert embeddings.shape == (3, 8)
  np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  features = model.apply(variables, images, method="features")
  np.testing.assert_allclose(model.apply(variables, features, method="embed"), embeddings, rtol=1e-5)
  assert set(variables["params"][models.HEAD]) == {"kernel", "bias"}
  (_, train_embeddings), updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                               method="features_and_embeddings")
  assert train_embeddings.shape == (3, 8)
  changed = updated_statistics(updates, variables)
  assert any(changed)  # Training mode updates the BatchNorm statistics.


def updated_statistics(updates, variables) -> list[bool]:
  """For each BatchNorm running statistic, whether a training-mode call changed it."""
  return jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                                      variables["batch_stats"]))


def test_frozen_batch_norm_keeps_its_statistics_in_training_mode():
  model = models.get("resnet18", embed_dim=4, frozen_bn=True)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  train_out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(train_out, model.apply(variables, images), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, b)


def test_batch_norm_with_frozen_statistics_trains_its_scale_and_offset():
  """BN-Inception's BatchNorm with frozen=True, frozen_affine=False (the MMSI authors' fine-tuning):
  running statistics in training mode, never updated; scale and offset are parameters that get a
  gradient and change with a step."""
  import flax.linen as nn
  from mmsi_jax.models.bn_inception import BatchNorm

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(5)(x)
      x = BatchNorm(train, frozen=True, frozen_affine=False)(x[:, None, None, :])
      return jnp.sum(jnp.tanh(x) ** 2)

  x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  variables = Net().init(jax.random.PRNGKey(1), x, train=False)
  stats = variables["batch_stats"]["BatchNorm_0"]
  assert set(stats) == {"mean", "var"} and set(variables["params"]["BatchNorm_0"]) == {"scale", "bias"}
  stats = {"mean": stats["mean"] + 0.3, "var": stats["var"] * 2.0}  # Not the batch's statistics.
  variables = {"params": variables["params"], "batch_stats": {"BatchNorm_0": stats}}

  def loss(params):
    out, updates = Net().apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"])
    return out, updates

  (train_out, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  np.testing.assert_allclose(train_out, Net().apply(variables, x, train=False), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, b)  # The statistics stay.
  for leaf in ("scale", "bias"):
    assert np.abs(np.asarray(grads["BatchNorm_0"][leaf])).min() > 0
    stepped = variables["params"]["BatchNorm_0"][leaf] - 0.1 * grads["BatchNorm_0"][leaf]
    assert np.all(stepped != variables["params"]["BatchNorm_0"][leaf])

  # BN-Inception passes the setting to every BatchNorm: scale and offset among the parameters.
  model = models.get("bn_inception", embed_dim=4, frozen_bn=True, frozen_bn_affine=False)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert set(shapes["params"]["backbone"]["conv1_7x7_s2_bn"]) == {"scale", "bias"}
  assert set(shapes["batch_stats"]["backbone"]["conv1_7x7_s2_bn"]) == {"mean", "var"}


def test_unknown_model_is_a_clear_error():
  with pytest.raises(KeyError, match="known models"):
    models.get("vgg")


@pytest.mark.parametrize("shape, kernel, strides, padding", [
    ((2, 2, 2, 8), 3, 1, "SAME"),  # ResNet's last stage at 64 px: 4 outputs, 9 taps.
    ((2, 4, 4, 8), 3, 2, "SAME"),  # Its strided first convolution (asymmetric SAME padding).
    ((2, 3, 3, 8), 7, 2, [(3, 3), (3, 3)]),
    ((2, 6, 6, 8), 3, 1, "SAME"),  # 36 outputs >= 9 taps: lax's convolution, unchanged.
])
def test_small_output_convolutions_are_exact_matrix_products(shape, kernel, strides, padding):
  """models.conv: patches x kernel equal lax's convolution, values and gradients, and compile to no
  convolution (whose operand-swapped form is XLA:CPU's slow path)."""
  from jax import lax
  from mmsi_jax.models import conv

  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, shape[-1], 5))
  dnums = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

  def loss(f):
    return jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(jnp.sin(f(x, w, (strides, strides), padding, dimension_numbers=dnums))),
        argnums=(0, 1)))

  expected, got = loss(lax.conv_general_dilated)(x, w), loss(conv.conv_general_dilated)(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  small = shape[1] < 6
  hlo = loss(conv.conv_general_dilated).lower(x, w).compile().as_text()
  assert ("convolution(" in hlo) != small
