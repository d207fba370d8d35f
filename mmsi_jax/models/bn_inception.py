"""BN-Inception (Inception with Batch Normalization; Ioffe & Szegedy, ICML 2015, figure 5), the backbone
of the DML papers MMSI compares with: the Caffe model as ported to PyTorch by `pretrainedmodels`
("bninception"), layer for layer and under the same names, so that its ImageNet weights load by name
(models/torch_weights.py). BGR 0-255 minus the Caffe mean in (data.normalization="caffe_bgr"), 224 or
227 px; 1024 features [N, 1024] after global pooling (a 7x7 map at 224 px).

Every convolution has a bias and is followed by BatchNorm (eps 1e-5) and ReLU; pooling in the trunk uses
ceil mode (torch's `ceil_mode=True`), average pooling counts the padding. Parameters: 10,270,240 in the
trunk (convolutions and BatchNorm scale/offset), plus 1000 x 1025 in the ImageNet classifier (unused).

Layouts (`layout`):
  "pooled"   the features are the globally pooled inception_5b map, and the embedding a linear head over
             them (every method but OSM + CAA as its authors ran it).
  "osm_caa"  the OSM + CAA authors' network (Wang et al., AAAI 2019; docs/METHODS.md): two auxiliary
             branches (AuxiliaryBranch) read the inception_4e and inception_3c maps; the embedding is the
             inception_4e branch itself (D = embed_dim wide, L2-normalised, no linear head), and the
             features are three groups, [pool5 | inception_4e branch | inception_3c branch], one
             classifier each (mining/osm_caa.py); the first gives the class-aware attention.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsi_jax.models import torch_weights
from mmsi_jax.models.conv import Conv
from mmsi_jax.models.embedding import EmbeddingNet, compute_dtype, global_pool
from mmsi_jax.search_space import tunable

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


LAYOUTS = ("pooled", "osm_caa")
AUXILIARY_WIDTH = 1024  # The inception_3c branch's width (GoogLeNet's auxiliary classifiers' FC).
BRANCH_POINTS = ("inception_3c", "inception_4e")  # The blocks the "osm_caa" layout's branches read.


def pool_ceil(x: jax.Array, window: int = 3, stride: int = 2, kind: str = "max") -> jax.Array:
  """Max or average pooling [N, H, W, C] without padding, in ceil mode (Caffe; torch's ceil_mode): a
  last, partial window is kept, and its average is over the positions inside the map (as Caffe's)."""
  pads = []
  for size in x.shape[1:3]:
    out = -(-max(size - window, 0) // stride) + 1
    pads.append((0, max((out - 1) * stride + window - size, 0)))
  if kind == "max":
    return nn.max_pool(x, (window, window), (stride, stride), padding=pads)
  return nn.avg_pool(x, (window, window), (stride, stride), padding=pads, count_include_pad=False)


class BatchNorm(nn.Module):
  """Batch normalisation over the last axis (Ioffe & Szegedy 2015, algorithm 1), with initialisers for
  all four variables (so that pretrained statistics load too). Statistics are computed and kept in
  float32 at least (bfloat16 inputs: float32); the output has the input's dtype (mixed precision).

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
      statistics_dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 in tests.
      batch_mean = jnp.mean(x, axis=(0, 1, 2), dtype=statistics_dtype)
      batch_var = jnp.maximum(
          jnp.mean(jnp.square(x.astype(statistics_dtype)), axis=(0, 1, 2)) - batch_mean * batch_mean,
          0.0)
      if not self.is_initializing():
        mean.value = self.momentum * mean.value + (1 - self.momentum) * batch_mean
        var.value = self.momentum * var.value + (1 - self.momentum) * batch_var
      mu, sigma2 = batch_mean, batch_var
    else:
      mu, sigma2 = mean.value, var.value
    return ((x - mu) * (scale * jax.lax.rsqrt(sigma2 + self.epsilon)) + bias).astype(x.dtype)


class AuxiliaryBranch(nn.Module):
  """An intermediate map [N, H, W, C] -> [N, width]: average pooling 5/3 (ceil mode), 1x1 convolution to
  128 + BatchNorm + ReLU, flattened (H', W', 128 order), fully connected to `width` + BatchNorm + ReLU:
  the trunk of GoogLeNet's auxiliary classifiers (Szegedy et al., CVPR 2015), with BatchNorm as the OSM +
  CAA authors' branches (2x2 positions after inception_4e at 224 px, 4x4 after inception_3c). New layers:
  default initialisation, whatever the trunk's weights."""
  width: int
  frozen_bn: bool = False
  frozen_bn_affine: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    def batch_norm(y, name):
      return nn.relu(BatchNorm(train, self.frozen_bn, frozen_affine=self.frozen_bn_affine, name=name)(y))

    x = pool_ceil(x, 5, 3, "avg")
    x = batch_norm(Conv(128, (1, 1), dtype=self.dtype, name="conv")(x), "conv_bn")
    x = nn.Dense(self.width, dtype=self.dtype, name="fc")(x.reshape(x.shape[0], 1, 1, -1))
    return batch_norm(x, "fc_bn").reshape(x.shape[0], self.width)


def feature_groups(layout: str, pooling: str, embed_dim: int) -> tuple[tuple[str, int], ...]:
  """The named feature groups (name, width) of `layout`, in the features' order; () for "pooled" (one
  group)."""
  if layout not in LAYOUTS:
    raise ValueError(f"model.layout={layout!r}: use one of {LAYOUTS} (models/bn_inception.py).")
  if layout == "pooled":
    return ()
  return (("pool5", 2048 if pooling == "max_avg" else 1024), ("inception_4e", embed_dim),
          ("inception_3c", AUXILIARY_WIDTH))


class BNInceptionBackbone(nn.Module):
  """The BN-Inception trunk and global pooling: images [N, H, W, 3] -> features [N, 1024] (2048 with
  pooling "max_avg"); with layout "osm_caa", the pooled features and the two branches' outputs
  concatenated (module docstring).

  Attributes:
    pooling: "max", "avg", "max_avg" (concatenated) or "max_plus_avg" (summed, as the DML codes do).
    frozen_bn: BatchNorm in inference mode: running statistics, never updated (see BatchNorm).
    frozen_bn_affine: with frozen_bn, BatchNorm's scale/offset fixed too (True) or trained (False).
    pretrained: path of the torch state dict (.npz or .pth) whose values `init` returns; "" for random
      initialisation.
    dtype: of the activations (parameters stay float32).
    layout: "pooled" or "osm_caa" (module docstring); branch_width: the inception_4e branch's width.
  """
  pooling: str = "max"
  frozen_bn: bool = False
  pretrained: str = ""
  frozen_bn_affine: bool = True
  dtype: Any = None
  layout: str = "pooled"
  branch_width: int = AUXILIARY_WIDTH

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
    x = pool_ceil(x)
    x = conv_bn(x, "conv2_3x3_reduce", 64, 1)
    x = conv_bn(x, "conv2_3x3", 192, 3)
    x = pool_ceil(x)
    branch_inputs = {}
    for name, n1x1, (n3r, n3), (nd3r, nd3), pool, proj, stride in BLOCKS:
      branches = [conv_bn(x, f"{name}_1x1", n1x1, 1)] if n1x1 else []
      y = conv_bn(x, f"{name}_3x3_reduce", n3r, 1)
      branches.append(conv_bn(y, f"{name}_3x3", n3, 3, stride))
      y = conv_bn(x, f"{name}_double_3x3_reduce", nd3r, 1)
      y = conv_bn(y, f"{name}_double_3x3_1", nd3, 3)
      branches.append(conv_bn(y, f"{name}_double_3x3_2", nd3, 3, stride))
      if stride == 2:
        branches.append(pool_ceil(x))
      else:
        pooled = (nn.avg_pool if pool == "avg" else nn.max_pool)(
            x, (3, 3), (1, 1), padding=[(1, 1), (1, 1)])
        branches.append(conv_bn(pooled, f"{name}_pool_proj", proj, 1))
      x = jnp.concatenate(branches, axis=-1)
      if name in BRANCH_POINTS:
        branch_inputs[name] = x
    weights.check()
    pooled = global_pool(x, self.pooling)
    if self.layout == "pooled":
      return pooled
    branch = functools.partial(AuxiliaryBranch, frozen_bn=self.frozen_bn,
                               frozen_bn_affine=self.frozen_bn_affine, dtype=self.dtype)
    return jnp.concatenate(
        [pooled,
         branch(self.branch_width, name="inception_4e_branch")(branch_inputs["inception_4e"], train),
         branch(AUXILIARY_WIDTH, name="inception_3c_branch")(branch_inputs["inception_3c"], train)],
        axis=-1)


@tunable()  # A backbone is the protocol's: nothing to tune.
def bn_inception(embed_dim: int = 512, pooling: str = "max", frozen_bn: bool = False,
                 pretrained: str = "", frozen_bn_affine: bool = True,
                 dtype: str = "float32", layout: str = "pooled") -> EmbeddingNet:
  """BN-Inception -> linear -> L2 norm; with `layout` "osm_caa", the OSM + CAA authors' network (module
  docstring): the inception_4e branch (embed_dim wide) -> L2 norm. `pretrained`: torch state dict of the `pretrainedmodels`
  "bninception" ImageNet model (.npz or .pth; models/torch_weights.py), "" for random initialisation.
  BatchNorm: trained (frozen_bn False); running statistics with fixed scale and offset (frozen_bn);
  running statistics with trained scale and offset (frozen_bn and not frozen_bn_affine: the MMSI
  authors' fine-tuning, docs/METHODS.md). `dtype`: of the activations, "float32" or "bfloat16"
  (models/embedding.py)."""
  torch_weights.require_file(pretrained, "the ImageNet weights of the pretrainedmodels 'bninception' "
                                         "(bn_inception-52deb4733.pth)")
  groups = feature_groups(layout, pooling, embed_dim)
  dtype = compute_dtype(dtype)
  backbone = BNInceptionBackbone(pooling, frozen_bn, pretrained, frozen_bn_affine, dtype, layout,
                                 embed_dim)
  return EmbeddingNet(backbone, embed_dim, dtype, feature_groups=groups,
                      embedding_group="inception_4e" if groups else "")
