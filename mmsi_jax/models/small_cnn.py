"""A small convolutional embedding network for the built-in dataset and for tests."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of x [N, D] scaled to unit L2 norm."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class ConvBackbone(nn.Module):
  """Stages of two 3x3 Conv-BN-ReLU and a 2x2 max pooling, then global max + average pooling."""
  widths: Sequence[int]

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    x = images
    for width in self.widths:
      for _ in range(2):
        x = nn.Conv(width, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return jnp.concatenate([jnp.max(x, axis=(1, 2)), jnp.mean(x, axis=(1, 2))], axis=-1)


class SmallCNN(nn.Module):
  """A conv backbone and a linear embedding head, L2-normalised.

  Like every model of the registry it has `features(images, train)` -> [N, F] (the backbone) and
  `embed(features)` -> [N, D] (the head, parameters under "head"), so a miner can differentiate
  through the head alone.

  Attributes:
    embed_dim: D, the embedding dimension.
    widths: channels of the conv stages.
  """
  embed_dim: int = 64
  widths: Sequence[int] = (32, 64, 128)

  def setup(self):
    self.backbone = ConvBackbone(self.widths)
    self.head = nn.Dense(self.embed_dim)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: [N, H, W, 3] float, normalised. Returns backbone features [N, F]."""
    return self.backbone(images, train)

  def embed(self, features: jax.Array) -> jax.Array:
    """features [N, F] -> embeddings [N, embed_dim], unit norm."""
    return l2_normalize(self.head(features))

  def features_and_embeddings(self, images: jax.Array, train: bool = False):
    features = self.features(images, train)
    return features, self.embed(features)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.embed(self.features(images, train))
