"""BN-Inception (Inception with Batch Normalization; Ioffe & Szegedy, ICML 2015, figure 5), the backbone
of the DML papers MMSI compares with: the Caffe model as ported to PyTorch by `pretrainedmodels`
("bninception"), layer for layer and under the same names, so that its ImageNet weights load by name
(models/torch_weights.py). BGR 0-255 minus the Caffe mean in (data.normalization="caffe_bgr"), 224 or
227 px; 1024 features [N, 1024] after global pooling (a 7x7 map at 224 px).

Every convolution has a bias and is followed by BatchNorm (eps 1e-5) and ReLU; pooling in the trunk uses
ceil mode (torch's `ceil_mode=True`), average pooling counts the padding. Parameters: 10,270,240 in the
trunk (convolutions and BatchNorm scale/offset), plus 1000 x 1025 in the ImageNet classifier (unused).
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsi_jax.models import torch_weights
from mmsi_jax.models.conv import Conv
from mmsi_jax.models.embedding import EmbeddingNet, compute_dtype, global_pool

# name, 1x1, (3x3 reduce, 3x3), (double 3x3 reduce, double 3x3), pool ("avg"/"max"), pool projection,
# stride. A stride-2 block has no 1x1 branch and passes its max pooling through unprojected (0).
BLOCKS = (
    ("inception_3a", 64, (64, 64), (64, 96), "avg", 32, 1),
    ("inception_3b", 64, (64, 96), (64, 96), "avg", 64, 1),
    ("inception_3c", 0, (128, 160), (64, 96), "max", 0, 2),
    ("inception_4a", 224, (64, 96), (96, 128), "avg", 128, 1),
    ("inception_4b", 192, (96, 128), (96, 128), "avg", 128, 1),
    ("inception_4c", 160, (128, 160), (128, 160), "avg", 128, 1),
    ("inception_4d", 96, (128, 192), (160, 192), "avg", 128, 1),
    ("inception_4e", 0, (128, 192), (192, 256), "max", 0, 2),
    ("inception_5a", 352, (192, 320), (160, 224), "avg", 128, 1),
    ("inception_5b", 352, (192, 320), (192, 224), "max", 128, 1),
)


def max_pool_ceil(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Max pooling [N, H, W, C] without padding, in ceil mode: a last, partial window is kept."""
  pads = []
  for size in x.shape[1:3]:
    out = -(-max(size - window, 0) // stride) + 1
    pads.append((0, max((out - 1) * stride + window - size, 0)))
  return nn.max_pool(x, (window, window), (stride, stride), padding=pads)


class BatchNorm(nn.Module):
  """Batch normalisation over the last axis (Ioffe & Szegedy 2015, algorithm 1), with initialisers for
  all four variables (so that pretrained statistics load too). Statistics are computed and kept in
  float32 whatever the input's dtype; the output has the input's dtype (mixed precision).

  Attributes:
    train: normalise with the batch's statistics and update the running ones (unless frozen).
    frozen: always use the running statistics, never updated (torch's BatchNorm in eval mode).
    init: (leaf name: "scale", "bias", "mean" or "var", default initializer) -> initializer, or None
      for the defaults (e.g. torch_weights.Pretrained's `init`, bound to the module's torch name).
    frozen_affine: with `frozen`, the scale/offset are constants too, kept in "batch_stats" (not in
      "params": neither trained nor weight-decayed), as e.g. MemVir's and Proxy-Anchor's frozen
      BatchNorm; False keeps them trainable parameters, as the MMSI authors fine-tune BN-Inception.
  """
  train: bool
  frozen: bool = False
  init: Optional[Callable] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  frozen_affine: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1],)
    defaults = {"scale": nn.initializers.ones, "bias": nn.initializers.zeros,
                "mean": nn.initializers.zeros, "var": nn.initializers.ones}
    init = {k: self.init(k, v) if self.init else v for k, v in defaults.items()}

    def constant(leaf):
      return self.variable("batch_stats", leaf, lambda: init[leaf](None, shape, jnp.float32))

    mean, var = constant("mean"), constant("var")
    if self.frozen and self.frozen_affine:
      scale, bias = constant("scale").value, constant("bias").value
    else:
      scale, bias = self.param("scale", init["scale"], shape), self.param("bias", init["bias"], shape)
    if self.train and not self.frozen:
      batch_mean = jnp.mean(x, axis=(0, 1, 2), dtype=jnp.float32)
      batch_var = jnp.maximum(
          jnp.mean(jnp.square(x.astype(jnp.float32)), axis=(0, 1, 2)) - batch_mean * batch_mean, 0.0)
      if not self.is_initializing():
        mean.value = self.momentum * mean.value + (1 - self.momentum) * batch_mean
        var.value = self.momentum * var.value + (1 - self.momentum) * batch_var
      mu, sigma2 = batch_mean, batch_var
    else:
      mu, sigma2 = mean.value, var.value
    return ((x - mu) * (scale * jax.lax.rsqrt(sigma2 + self.epsilon)) + bias).astype(x.dtype)


class BNInceptionBackbone(nn.Module):
  """The BN-Inception trunk and global pooling: images [N, H, W, 3] -> features [N, 1024] (2048 with
  pooling "max_avg").

  Attributes:
    pooling: "max", "avg", "max_avg" (concatenated) or "max_plus_avg" (summed, as the DML codes do).
    frozen_bn: BatchNorm in inference mode: running statistics, never updated (see BatchNorm).
    frozen_bn_affine: with frozen_bn, BatchNorm's scale/offset fixed too (True) or trained (False).
    pretrained: path of the torch state dict (.npz or .pth) whose values `init` returns; "" for random
      initialisation.
    dtype: of the activations (parameters stay float32).
  """
  pooling: str = "max"
  frozen_bn: bool = False
  pretrained: str = ""
  frozen_bn_affine: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    weights = torch_weights.Pretrained(self.pretrained if self.is_initializing() else "",
                                       ignored=("last_linear.",))

    def conv_bn(x, name, features, kernel, stride=1):
      x = Conv(features, (kernel, kernel), stride, padding=[(kernel // 2, kernel // 2)] * 2,
               dtype=self.dtype, kernel_init=weights.init(name, "kernel", nn.initializers.lecun_normal()),
               bias_init=weights.init(name, "bias", nn.initializers.zeros), name=name)(x)
      x = BatchNorm(train, self.frozen_bn, functools.partial(weights.init, f"{name}_bn"),
                    frozen_affine=self.frozen_bn_affine, name=f"{name}_bn")(x)
      return nn.relu(x)

    x = conv_bn(images, "conv1_7x7_s2", 64, 7, 2)
    x = max_pool_ceil(x)
    x = conv_bn(x, "conv2_3x3_reduce", 64, 1)
    x = conv_bn(x, "conv2_3x3", 192, 3)
    x = max_pool_ceil(x)
    for name, n1x1, (n3r, n3), (nd3r, nd3), pool, proj, stride in BLOCKS:
      branches = [conv_bn(x, f"{name}_1x1", n1x1, 1)] if n1x1 else []
      y = conv_bn(x, f"{name}_3x3_reduce", n3r, 1)
      branches.append(conv_bn(y, f"{name}_3x3", n3, 3, stride))
      y = conv_bn(x, f"{name}_double_3x3_reduce", nd3r, 1)
      y = conv_bn(y, f"{name}_double_3x3_1", nd3, 3)
      branches.append(conv_bn(y, f"{name}_double_3x3_2", nd3, 3, stride))
      if stride == 2:
        branches.append(max_pool_ceil(x))
      else:
        pooled = (nn.avg_pool if pool == "avg" else nn.max_pool)(
            x, (3, 3), (1, 1), padding=[(1, 1), (1, 1)])
        branches.append(conv_bn(pooled, f"{name}_pool_proj", proj, 1))
      x = jnp.concatenate(branches, axis=-1)
    weights.check()
    return global_pool(x, self.pooling)


def bn_inception(embed_dim: int = 512, pooling: str = "max", frozen_bn: bool = False,
                 pretrained: str = "", frozen_bn_affine: bool = True,
                 dtype: str = "float32") -> EmbeddingNet:
  """BN-Inception -> linear -> L2 norm. `pretrained`: torch state dict of the `pretrainedmodels`
  "bninception" ImageNet model (.npz or .pth; models/torch_weights.py), "" for random initialisation.
  BatchNorm: trained (frozen_bn False); running statistics with fixed scale and offset (frozen_bn);
  running statistics with trained scale and offset (frozen_bn and not frozen_bn_affine: the MMSI
  authors' fine-tuning, docs/METHODS.md). `dtype`: of the activations, "float32" or "bfloat16"
  (models/embedding.py)."""
  torch_weights.require_file(pretrained, "the ImageNet weights of the pretrainedmodels 'bninception' "
                                         "(bn_inception-52deb4733.pth)")
  dtype = compute_dtype(dtype)
  return EmbeddingNet(BNInceptionBackbone(pooling, frozen_bn, pretrained, frozen_bn_affine, dtype),
                      embed_dim, dtype)
