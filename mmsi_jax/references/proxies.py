"""Class proxies: C learnable vectors, one per training class, the columns of a proxy loss.

The proxies [C, D] are a parameter group of their own, `params["proxies"]`, trained by the model
optimizer with the learning-rate multiplier `optim.lr_mults.proxies` (Proxy-Anchor and MemVir train
them at 100x the model's rate). The losses L2-normalise them (`losses.build_proxy_pairs`), so only their
directions matter; their initial scale sets how fast Adam turns them. Initialisations, as in the
authors' code (docs/METHODS.md):

  normal            N(0, std^2) entries, std = `init_std` (ProxyNCA++: 1/8; insightface's ArcFace and
                    CosFace: 0.01; MemVir's ProxyNCA: sqrt(2 / D))
  kaiming_fan_out   N(0, 2 / C): torch's kaiming_normal_(mode="fan_out") of a [C, D] tensor, as
                    Proxy-Anchor (Kim et al., CVPR 2020) initialises its proxies
  uniform           U(-1/sqrt(C), 1/sqrt(C)), as MemVir's NormSoftmax (kaiming_uniform_ of its [D, C]
                    weight)

With `class_block` b > 0 the loss runs over blocks of b classes (losses/class_blocks.py) instead of
S [B, C] whole: the same loss and gradient, in O(B b) memory instead of O(B C). With `class_shards`
k > 0 the proxies are padded to C' = k ceil(C / k) rows (zeros, nobody's classes) and are split along
the class axis over the devices of the mesh (step.state_sharding: their optimizer state too), each
device computing the loss over its own classes and the statistics merged across the devices.
"""

import jax
import jax.numpy as jnp

from mmsi_jax import losses, parallel
from mmsi_jax.references.base import References
from mmsi_jax.search_space import tunable

PROXY_PARAMS = "proxies"  # The proxies' parameter group in TrainState.params (and in optim.lr_mults).
INITS = ("normal", "kaiming_fan_out", "uniform")


def init_proxies(rng: jax.Array, num_classes: int, embed_dim: int, init: str,
                 init_std: float = 1.0) -> jax.Array:
  """Proxies [C, D] drawn as `init` says (see the module docstring)."""
  shape = (num_classes, embed_dim)
  if init == "normal":
    return init_std * jax.random.normal(rng, shape)
  if init == "kaiming_fan_out":
    return jnp.sqrt(2.0 / num_classes) * jax.random.normal(rng, shape)
  if init == "uniform":
    limit = 1.0 / jnp.sqrt(num_classes)
    return jax.random.uniform(rng, shape, minval=-limit, maxval=limit)
  raise ValueError(f"references.proxies.init={init!r} is not one of {INITS}.")


def check_class_block(class_block: int, class_shards: int, where: str) -> None:
  if class_block < 0:
    raise ValueError(f"{where}.class_block must be >= 0 (0: S whole; b > 0: b classes at a time), "
                     f"got {class_block}.")
  if class_shards < 0:
    raise ValueError(f"{where}.class_shards must be >= 0 (0: the proxies whole on every device; k > 0: "
                     f"split over the devices, k a multiple of their number), got {class_shards}.")


def padded_classes(num_classes: int, class_shards: int) -> int:
  """C' = k ceil(C / k) with k class shards: rows of the proxies (C without shards)."""
  return -(-num_classes // class_shards) * class_shards if class_shards else num_classes


def class_blocks(rows: jax.Array, proxies: jax.Array, labels: jax.Array, row_valid: jax.Array, *,
                 num_classes: int, class_block: int, class_shards: int,
                 **more) -> losses.ClassBlocks:
  """The ClassBlocks of a proxies component: blocks of `class_block` classes (0: all of a device's
  classes at once), the proxies' first `num_classes` rows real, split over the mesh's data axis with
  class shards; `more` as ClassBlocks takes it (further groups, trained rows)."""
  return losses.ClassBlocks((rows, proxies), labels, row_valid, block=class_block or proxies.shape[0],
                            num_classes=num_classes,
                            shard_axis=parallel.DATA_AXIS if class_shards else None, **more)


@tunable()  # Nothing to tune.
class ClassProxies(References):
  """S [B, C] of the batch against the L2-normalised proxies, the proxy loss over it; no state.

  Args:
    num_classes: C, the training classes (labels 0 .. C - 1).
    init, init_std: how the proxies are drawn (module docstring).
    class_block: 0, S whole; b > 0, the loss over blocks of b classes (module docstring).
    class_shards: 0, the proxies whole on every device; k > 0, padded to a multiple of k and split
      over the devices (module docstring).
  """
  kind = "proxy"

  def __init__(self, num_classes: int, *, init: str = "kaiming_fan_out", init_std: float = 1.0,
               class_block: int = 0, class_shards: int = 0):
    if init not in INITS:
      raise ValueError(f"references.proxies.init={init!r} is not one of {INITS}.")
    check_class_block(class_block, class_shards, "references.proxies")
    self.num_classes = num_classes
    self.init_name = init
    self.init_std = init_std
    self.class_block = class_block
    self.class_shards = class_shards

  def init(self, rng: jax.Array, embed_dim: int):
    """{"proxies": [C', D]}: C drawn as `init` says, then the padding's zero rows."""
    proxies = init_proxies(rng, self.num_classes, embed_dim, self.init_name, self.init_std)
    padding = padded_classes(self.num_classes, self.class_shards) - self.num_classes
    return {PROXY_PARAMS: jnp.pad(proxies, ((0, padding), (0, 0)))}, None

  def pairs(self, state, params, embeddings: jax.Array, labels: jax.Array):
    """Pairs [B, C], or with a class block or class shards their ClassBlocks (S never whole)."""
    del state
    if self.class_block or self.class_shards:
      return class_blocks(embeddings, params[PROXY_PARAMS], labels, jnp.ones(labels.shape, bool),
                          num_classes=self.num_classes, class_block=self.class_block,
                          class_shards=self.class_shards)
    return losses.build_proxy_pairs(embeddings, labels, params[PROXY_PARAMS])
