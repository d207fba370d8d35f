"""What every references component inherits: no parameters, no state, one loss over all of S."""

import jax

from mmsi_jax import losses


class References:
  """The defaults of the interface (see mmsi_jax/references/__init__.py); subclasses set `kind` and
  `pairs`, and override what they own."""
  kind: str

  def init(self, rng: jax.Array, embed_dim: int):
    del rng, embed_dim
    return {}, None

  def update(self, state, params, embeddings: jax.Array, labels: jax.Array, step: jax.Array):
    del params, embeddings, labels, step
    return state

  def pairs(self, state, params, embeddings: jax.Array, labels: jax.Array) -> losses.Pairs:
    raise NotImplementedError

  def objective(self, state, step: jax.Array, pairs: losses.Pairs, loss_fn, hparams: dict,
                multipliers=None):
    """(L, metrics): the loss over all of S; per-pair `multipliers` [B, M], if given, go inside the
    loss (losses.pair_loss_on). Over ClassBlocks, the loss block by block, with the similarities'
    means as metrics (losses.blocked_loss; no miner serves proxy losses, so no multipliers)."""
    del state, step
    if isinstance(pairs, losses.ClassBlocks):
      return losses.blocked_loss(loss_fn, pairs, hparams)
    return losses.pair_loss_on(loss_fn, pairs, hparams, multipliers), {}
