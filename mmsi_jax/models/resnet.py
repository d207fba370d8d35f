"""ResNets (He et al., CVPR 2016) as embedding backbones: ResNet-18 (basic blocks) and ResNet-50
(bottlenecks), randomly initialised (no pretrained weights are fetched)."""

from typing import Sequence

import flax.linen as nn
import jax

from mmsi_jax.models.conv import Conv
from mmsi_jax.models.embedding import EmbeddingNet, global_pool


class ResidualBlock(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion) residual block."""
  width: int
  strides: int
  bottleneck: bool
  batch_norm: type

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.bottleneck:
      convs = [(self.width, (1, 1), 1), (self.width, (3, 3), self.strides), (4 * self.width, (1, 1), 1)]
    else:
      convs = [(self.width, (3, 3), self.strides), (self.width, (3, 3), 1)]
    y = x
    for i, (features, kernel, strides) in enumerate(convs):
      y = Conv(features, kernel, strides, padding="SAME", use_bias=False)(y)
      last = i == len(convs) - 1
      y = self.batch_norm(scale_init=nn.initializers.zeros if last else nn.initializers.ones)(y)
      if not last:
        y = nn.relu(y)
    out_features = convs[-1][0]
    if x.shape[-1] != out_features or self.strides != 1:
      x = Conv(out_features, (1, 1), self.strides, use_bias=False)(x)
      x = self.batch_norm()(x)
    return nn.relu(x + y)


class ResNetBackbone(nn.Module):
  """Stem (7x7/2 conv, 3x3/2 max pooling), four stages of residual blocks, global pooling.

  Attributes:
    stage_sizes: blocks per stage. bottleneck: block type. pooling: "max", "avg" or "max_avg".
    frozen_bn: BatchNorm always uses (and never updates) its running statistics; its scale and
      offset stay trained (as BN-Inception's frozen_bn with frozen_bn_affine=False).
  """
  stage_sizes: Sequence[int]
  bottleneck: bool
  pooling: str = "avg"
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    def batch_norm(**kwargs):
      return nn.BatchNorm(use_running_average=not train or self.frozen_bn, momentum=0.9, **kwargs)

    x = Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False)(images)
    x = nn.relu(batch_norm()(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(64 * 2**stage, strides, self.bottleneck, batch_norm)(x)
    return global_pool(x, self.pooling)


def resnet18(embed_dim: int = 512, pooling: str = "avg", frozen_bn: bool = False) -> EmbeddingNet:
  return EmbeddingNet(ResNetBackbone((2, 2, 2, 2), False, pooling, frozen_bn), embed_dim)


def resnet50(embed_dim: int = 512, pooling: str = "avg", frozen_bn: bool = False) -> EmbeddingNet:
  return EmbeddingNet(ResNetBackbone((3, 4, 6, 3), True, pooling, frozen_bn), embed_dim)
