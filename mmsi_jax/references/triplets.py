"""A batch of triplets: each anchor is compared with its own positive and negative only.

Batch policies with layout "triplets" (batch_policies/smart_mining.py) deliver the batch as consecutive
(anchor, positive, negative) rows: rows 3t, 3t + 1, 3t + 2 are triplet t. S is the batch against itself
(differentiable in every row); the masks keep one positive pair (3t, 3t + 1) and one negative pair
(3t, 3t + 2) per triplet, so a pair loss sees exactly the batch's triplets (Harwood et al., ICCV 2017,
train on the mined triplets, not on every pair of the batch). A pair whose labels contradict its role
(a "positive" of another class) is dropped from the masks.
"""

import jax
import jax.numpy as jnp

from mmsi_jax import losses
from mmsi_jax.references.base import References
from mmsi_jax.search_space import tunable

TRIPLETS = "triplets"  # The batch layout this component reads (a batch policy's `layout`).
ACTIVE = "triplets/active"  # The metric: share of the batch's triplets with a non-zero loss.


def triplet_losses(loss_fn, hparams: dict, sim_ap: jax.Array, sim_an: jax.Array) -> jax.Array:
  """Each triplet's loss on its own [T]: loss_fn on the 1 x 3 problem (S_aa = 1, S_ap, S_an) of the
  anchor against itself, its positive and its negative, vectorised over the triplets."""
  def one(s_ap, s_an):
    sim = jnp.stack([jnp.ones_like(s_ap), s_ap, s_an])[None]
    return loss_fn(sim, jnp.array([[False, True, False]]), jnp.array([[False, False, True]]),
                   **hparams)
  return jax.vmap(one)(sim_ap, sim_an)


@tunable()  # Nothing to tune.
class TripletReferences(References):
  """S [B, B] of a triplet batch against itself; pos and neg hold one pair per triplet. No state."""
  kind = "pair"
  batch_layout = TRIPLETS

  def __init__(self, num_classes: int):
    del num_classes

  def pairs(self, state, params, embeddings: jax.Array, labels: jax.Array) -> losses.Pairs:
    del state, params
    batch = embeddings.shape[0]
    if batch % 3:
      raise ValueError(f"A triplet batch has a multiple of 3 rows, got {batch}: use a batch policy "
                       f"with layout {TRIPLETS!r} (data.batch_policy='smart_mining').")
    pairs = losses.build_pairs(embeddings, labels)
    rows = jnp.arange(batch)
    anchor = (rows % 3 == 0)[:, None]
    pos = pairs.pos & anchor & (rows[None, :] == rows[:, None] + 1)
    neg = pairs.neg & anchor & (rows[None, :] == rows[:, None] + 2)
    return pairs._replace(pos=pos, neg=neg)

  def objective(self, state, step: jax.Array, pairs: losses.Pairs, loss_fn, hparams: dict,
                multipliers=None):
    """(L over the batch's triplets, {ACTIVE: e}), e the share of triplets whose own loss is > 0."""
    loss, _ = super().objective(state, step, pairs, loss_fn, hparams, multipliers)
    sim = jax.lax.stop_gradient(pairs.sim)
    anchors = jnp.arange(0, sim.shape[0], 3)
    per_triplet = triplet_losses(loss_fn, hparams, sim[anchors, anchors + 1], sim[anchors, anchors + 2])
    return loss, {ACTIVE: jnp.mean((per_triplet > 0).astype(jnp.float32))}
