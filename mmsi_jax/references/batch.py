"""The batch against itself: the references of a plain pair loss."""

import jax

from mmsi_jax import losses
from mmsi_jax.references.base import References
from mmsi_jax.search_space import tunable


@tunable()  # Nothing to tune.
class BatchReferences(References):
  """S [B, B] of the batch against itself (each anchor's own column masked); no state."""
  kind = "pair"

  def __init__(self, num_classes: int):
    del num_classes

  def pairs(self, state, params, embeddings: jax.Array, labels: jax.Array) -> losses.Pairs:
    del state, params
    return losses.build_pairs(embeddings, labels)
