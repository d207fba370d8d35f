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
S [B, C] whole: the same loss and gradient, in O(B b) memory instead of O(B C).
"""

import jax
import jax.numpy as jnp

from mmsi_jax import losses
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


def check_class_block(class_block: int, where: str) -> None:
  if class_block < 0:
    raise ValueError(f"{where}.class_block must be >= 0 (0: S whole; b > 0: b classes at a time), "
                     f"got {class_block}.")


@tunable()  # Nothing to tune.
class ClassProxies(References):
  """S [B, C] of the batch against the L2-normalised proxies, the proxy loss over it; no state.

  Args:
    num_classes: C, the training classes (labels 0 .. C - 1).
    init, init_std: how the proxies are drawn (module docstring).
    class_block: 0, S whole; b > 0, the loss over blocks of b classes (module docstring).
  """
  kind = "proxy"

  def __init__(self, num_classes: int, *, init: str = "kaiming_fan_out", init_std: float = 1.0,
               class_block: int = 0):
    if init not in INITS:
      raise ValueError(f"references.proxies.init={init!r} is not one of {INITS}.")
    check_class_block(class_block, "references.proxies")
    self.num_classes = num_classes
    self.init_name = init
    self.init_std = init_std
    self.class_block = class_block

  def init(self, rng: jax.Array, embed_dim: int):
    proxies = init_proxies(rng, self.num_classes, embed_dim, self.init_name, self.init_std)
    return {PROXY_PARAMS: proxies}, None

  def pairs(self, state, params, embeddings: jax.Array, labels: jax.Array):
    """Pairs [B, C], or with a class block their ClassBlocks (S never whole)."""
    del state
    if self.class_block:
      return losses.ClassBlocks((embeddings, params[PROXY_PARAMS]), labels,
                                jnp.ones(labels.shape, bool), block=self.class_block)
    return losses.build_proxy_pairs(embeddings, labels, params[PROXY_PARAMS])
