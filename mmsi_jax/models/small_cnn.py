"""A small convolutional embedding network for the built-in dataset and for tests."""

from typing import Any, Sequence

import flax.linen as nn
import jax

from mmsi_jax.models.conv import Conv
from mmsi_jax.models.embedding import EmbeddingNet, compute_dtype, global_pool
from mmsi_jax.search_space import tunable


class ConvBackbone(nn.Module):
  """Stages of two 3x3 Conv-BN-ReLU and a 2x2 max pooling, then global max + average pooling;
  activations in `dtype`."""
  widths: Sequence[int]
  dtype: Any = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    x = images
    for width in self.widths:
      for _ in range(2):
        x = Conv(width, (3, 3), use_bias=False, dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return global_pool(x, "max_avg")


@tunable()  # A backbone is the protocol's: nothing to tune.
def small_cnn(embed_dim: int = 64, widths: Sequence[int] = (32, 64, 128),
              dtype: str = "float32") -> EmbeddingNet:
  """The small CNN: conv stages of the given widths, embedding of dimension embed_dim; activations in
  `dtype` (models/embedding.py)."""
  dtype = compute_dtype(dtype)
  return EmbeddingNet(ConvBackbone(tuple(widths), dtype), embed_dim, dtype)
