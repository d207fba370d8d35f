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
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                         updates["batch_stats"], variables["batch_stats"]))
  assert any(changed)  # Training mode updates the BatchNorm statistics.


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
