"""A small convolutional embedding network for the built-in dataset and for tests."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of x [N, D] scaled to unit L2 norm."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class SmallCNN(nn.Module):
  """Conv-BN-ReLU stages, each followed by 2x2 max pooling, then global max + average pooling and a
  linear embedding head, L2-normalised.

  Attributes:
    embed_dim: D, the embedding dimension.
    widths: channels of the conv stages (two 3x3 convs per stage).
  """
  embed_dim: int = 64
  widths: Sequence[int] = (32, 64, 128)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: [N, H, W, 3] float, normalised. Returns embeddings [N, embed_dim], unit norm."""
    x = images
    for width in self.widths:
      for _ in range(2):
        x = nn.Conv(width, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    features = jnp.concatenate([jnp.max(x, axis=(1, 2)), jnp.mean(x, axis=(1, 2))], axis=-1)
    return l2_normalize(nn.Dense(self.embed_dim, name="head")(features))
