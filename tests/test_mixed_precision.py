"""model.dtype = "bfloat16": bf16 activations with float32 parameters, BatchNorm statistics, embeddings,
similarities and losses; embeddings close to float32's and finite training steps (on the CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsi_jax import models, step
from mmsi_jax.models.embedding import EmbeddingNet
from mmsi_jax.models.resnet import ResNetBackbone
from tests.test_step import tiny_demo_config


def tiny_resnet(dtype):
  """A ResNet of one basic block a stage, in `dtype` (resnet18's modules, BatchNorm included)."""
  return EmbeddingNet(ResNetBackbone((1, 1, 1, 1), False, dtype=dtype), 16, dtype)


@pytest.mark.parametrize("name", ["small_cnn", "resnet"])
def test_bfloat16_activations_give_float32_embeddings_close_to_float32s(name):
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  if name == "resnet":
    full, half = tiny_resnet(jnp.float32), tiny_resnet(jnp.bfloat16)
  else:
    full, half = (models.get(name, embed_dim=16, widths=(4, 8), dtype=dtype)
                  for dtype in ("float32", "bfloat16"))
  variables = jax.jit(full.init)(jax.random.PRNGKey(1), images)
  assert jax.eval_shape(half.init, jax.random.PRNGKey(1), images) == jax.eval_shape(
      lambda: variables)  # The same float32 parameters and statistics.

  @jax.jit
  def run(variables, images):
    return (full.apply(variables, images), half.apply(variables, images),
            half.apply(variables, images, method="features"),
            half.apply(variables, images, train=True, mutable=["batch_stats"]))

  expected, got, features, (train_embeddings, updates) = run(variables, images)
  assert got.dtype == features.dtype == train_embeddings.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  assert np.all(np.isfinite(train_embeddings))
  # bf16 keeps 8 bits of mantissa: unit embeddings agree to about 1e-2, and point the same way.
  np.testing.assert_allclose(got, expected, atol=3e-2)
  assert np.min(np.sum(np.asarray(got) * np.asarray(expected), axis=1)) > 0.999


def test_bfloat16_training_steps_are_finite_with_float32_parameters_and_losses():
  config = tiny_demo_config("contrastive")
  config.model.dtype = "bfloat16"
  rng = np.random.default_rng(0)
  batch = {"images": rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8),
           "labels": np.repeat(np.arange(4, dtype=np.int32), 3)}
  components = step.build(config, num_classes=10)
  state = step.create_train_state(jax.random.PRNGKey(0), components, (16, 16, 3))
  train_step = step.make_train_step(components)
  for _ in range(2):
    state, metrics = train_step(state, batch)
    assert metrics["train/loss"].dtype == jnp.float32 and np.isfinite(metrics["train/loss"])
    assert metrics["train/loss"] > 0 and np.isfinite(metrics["train/grad_norm"])
  assert {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats))} == {
      jnp.dtype(jnp.float32)}


def test_an_unknown_dtype_is_a_clear_error():
  with pytest.raises(ValueError, match=r"model.dtype='float16': use 'float32', or 'bfloat16'"):
    models.get("small_cnn", dtype="float16")
