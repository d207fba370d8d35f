"""ResNets (He et al., CVPR 2016) as embedding backbones, as torchvision defines them, so that
torchvision's ImageNet weights load by name (models/torch_weights.py): ResNet-18 (basic blocks) and
ResNet-50 (bottlenecks, the stride on the 3x3 convolution: torchvision's "ResNet v1.5").

torchvision's layers, under its names: `conv1` 7x7/2 (padding 3), `bn1`, ReLU, 3x3/2 max pooling
(padding 1 on each side), then `layer1` to `layer4` of blocks `layer<s>.<b>` with convolutions
`conv<i>` (3x3 ones padded 1 on each side, whatever their stride), BatchNorms `bn<i>` and, where the
block changes the shape, the projection `downsample.0` (1x1 convolution with the block's stride) and
`downsample.1` (BatchNorm); out = ReLU(block(x) + shortcut(x)). No convolution has a bias; BatchNorm
eps 1e-5, momentum 0.1 (torch's convention). The ImageNet classifier `fc` is not built. RGB input
normalised with the ImageNet mean and standard deviation (data.normalization="imagenet"), 224 px; 512
(ResNet-18) or 2048 (ResNet-50) features after global pooling (a 7x7 map at 224 px).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax

from mmsi_jax.models import torch_weights
from mmsi_jax.models.bn_inception import BatchNorm
from mmsi_jax.models.conv import Conv
from mmsi_jax.models.embedding import EmbeddingNet, compute_dtype, global_pool
from mmsi_jax.search_space import tunable

# torchvision's initialisation: kaiming_normal_(mode="fan_out", nonlinearity="relu"); BatchNorm 1, 0.
KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResNetBackbone(nn.Module):
  """The ResNet trunk and global pooling: images [N, H, W, 3] -> features [N, F].

  Attributes:
    stage_sizes: blocks per stage. bottleneck: block type.
    pooling: "max", "avg", "max_avg" (concatenated) or "max_plus_avg" (summed).
    frozen_bn: BatchNorm in inference mode: running statistics, never updated (bn_inception.BatchNorm).
    frozen_bn_affine: with frozen_bn, BatchNorm's scale/offset fixed too (True) or trained (False).
    pretrained: path of torchvision's state dict (.pth or .npz); "" for random initialisation.
    dtype: of the activations (parameters stay float32).
    last_stride: stride of the last stage (torchvision: 2; XBM's ResNet-50: 1, a 14x14 map at 224 px).
    stem_relu: ReLU after the stem's BatchNorm (torchvision: yes; XBM's ResNet code has none).
  """
  stage_sizes: Sequence[int]
  bottleneck: bool
  pooling: str = "avg"
  frozen_bn: bool = False
  frozen_bn_affine: bool = True
  pretrained: str = ""
  dtype: Any = None
  last_stride: int = 2
  stem_relu: bool = True

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    weights = torch_weights.Pretrained(self.pretrained if self.is_initializing() else "",
                                       ignored=("fc.",))

    def conv_bn(x, conv, bn, features, kernel, stride, relu=True):
      pad = kernel // 2
      x = Conv(features, (kernel, kernel), stride, padding=[(pad, pad), (pad, pad)], use_bias=False,
               dtype=self.dtype, kernel_init=weights.init(conv, "kernel", KERNEL_INIT), name=conv)(x)
      x = BatchNorm(train, self.frozen_bn, functools.partial(weights.init, bn),
                    frozen_affine=self.frozen_bn_affine, name=bn)(x)
      return nn.relu(x) if relu else x

    x = conv_bn(images, "conv1", "bn1", 64, 7, 2, relu=self.stem_relu)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
    for stage, num_blocks in enumerate(self.stage_sizes):
      width = 64 * 2**stage
      for block in range(num_blocks):
        name = f"layer{stage + 1}.{block}"
        stride = 1 if stage == 0 or block > 0 else (
            self.last_stride if stage == len(self.stage_sizes) - 1 else 2)
        if self.bottleneck:
          convs = [(width, 1, 1), (width, 3, stride), (4 * width, 1, 1)]
        else:
          convs = [(width, 3, stride), (width, 3, 1)]
        y = x
        for i, (features, kernel, conv_stride) in enumerate(convs, 1):
          y = conv_bn(y, f"{name}.conv{i}", f"{name}.bn{i}", features, kernel, conv_stride,
                      relu=i < len(convs))
        if stride != 1 or x.shape[-1] != y.shape[-1]:
          x = conv_bn(x, f"{name}.downsample.0", f"{name}.downsample.1", y.shape[-1], 1, stride,
                      relu=False)
        x = nn.relu(x + y)
    weights.check()
    return global_pool(x, self.pooling)


def _resnet(stage_sizes, bottleneck, weights_file, embed_dim, pooling, frozen_bn, frozen_bn_affine,
            pretrained, dtype, last_stride, stem_relu) -> EmbeddingNet:
  torch_weights.require_file(pretrained, f"torchvision's ImageNet weights ({weights_file})")
  if last_stride not in (1, 2):
    raise ValueError(f"model.last_stride={last_stride!r}: use 2 (torchvision) or 1 (XBM's ResNet-50).")
  dtype = compute_dtype(dtype)
  return EmbeddingNet(ResNetBackbone(stage_sizes, bottleneck, pooling, frozen_bn, frozen_bn_affine,
                                     pretrained, dtype, last_stride, stem_relu), embed_dim, dtype)


@tunable()  # A backbone is the protocol's: nothing to tune.
def resnet18(embed_dim: int = 512, pooling: str = "avg", frozen_bn: bool = False,
             frozen_bn_affine: bool = True, pretrained: str = "", dtype: str = "float32",
             last_stride: int = 2, stem_relu: bool = True) -> EmbeddingNet:
  """ResNet-18 -> linear -> L2 norm. `pretrained`: torchvision's state dict (resnet18-f37072fd.pth, or
  saved as .npz), "" for random initialisation. BatchNorm and dtype as bn_inception's; last_stride
  and stem_relu as ResNetBackbone's."""
  return _resnet((2, 2, 2, 2), False, "resnet18-f37072fd.pth", embed_dim, pooling, frozen_bn,
                 frozen_bn_affine, pretrained, dtype, last_stride, stem_relu)


@tunable()  # A backbone is the protocol's: nothing to tune.
def resnet50(embed_dim: int = 512, pooling: str = "avg", frozen_bn: bool = False,
             frozen_bn_affine: bool = True, pretrained: str = "", dtype: str = "float32",
             last_stride: int = 2, stem_relu: bool = True) -> EmbeddingNet:
  """ResNet-50 -> linear -> L2 norm. `pretrained`: torchvision's state dict (resnet50-0676ba61.pth,
  IMAGENET1K_V1, or resnet50-11ad3fa6.pth, IMAGENET1K_V2; or saved as .npz), "" for random
  initialisation. BatchNorm and dtype as bn_inception's; last_stride and stem_relu as
  ResNetBackbone's."""
  return _resnet((3, 4, 6, 3), True, "resnet50-0676ba61.pth", embed_dim, pooling, frozen_bn,
                 frozen_bn_affine, pretrained, dtype, last_stride, stem_relu)
