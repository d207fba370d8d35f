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
