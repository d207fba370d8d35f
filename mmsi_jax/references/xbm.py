"""XBM: cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

    L = L(batch, batch) + weight * [step >= start_step] * L(batch, memory)

The memory is one global ring buffer of the last `size` detached embeddings and their labels
(mining/memory.py), part of the TrainState. From `start_step` on, each step first enqueues its batch,
then compares the batch with the whole memory; an anchor's own copy in the memory is masked out (its
other copies, the same-class samples of the batch, are positives). Before `start_step` nothing is
enqueued, so the memory fills over size / B steps after it, as in the authors' code. The two terms are
two blocks of one S = [batch | memory] [B, B + size], so a miner's multipliers cover both.

Where this differs from the official code (docs/METHODS.md): the buffer is an exact FIFO, also when a
batch wraps around its end (when a batch does not fit before the end, the official one writes the whole
batch into the last B slots, over the newest rows, and restarts at slot 0), and "is the memory full" is
the count of written rows (the official test reads label 0 as an empty slot).
"""

import jax
import jax.numpy as jnp

from mmsi_jax import losses
from mmsi_jax.mining import memory as memory_lib
from mmsi_jax.references.base import References
from mmsi_jax.search_space import Int, ShareOfRun, tunable


@tunable(size=Int(256, 65536, log=True), start_step=ShareOfRun(0.0, 0.75))
class CrossBatchMemory(References):
  """The batch against itself and against a memory of `size` past embeddings.

  Args:
    num_classes: unused (the memory holds any labels).
    size: K, the memory's slots (XBM: 55,000 on SOP; 8,192 by default).
    weight: lambda, the memory term's weight (XBM: 1).
    start_step: first step (0-based count of completed steps) that enqueues and has the memory term.
  """
  kind = "pair"

  def __init__(self, num_classes: int, *, size: int = 8192, weight: float = 1.0,
               start_step: int = 0):
    del num_classes
    if size < 1:
      raise ValueError(f"references.xbm.size must be positive, got {size}.")
    if start_step < 0:
      raise ValueError(f"references.xbm.start_step must be >= 0, got {start_step}.")
    self.size = size
    self.weight = weight
    self.start_step = start_step

  def init(self, rng: jax.Array, embed_dim: int):
    del rng
    return {}, memory_lib.init("global", self.size, embed_dim)

  def update(self, state: memory_lib.Memory, params, embeddings: jax.Array, labels: jax.Array,
             step: jax.Array) -> memory_lib.Memory:
    del params
    return memory_lib.enqueue(state, embeddings, labels, write=step >= self.start_step)

  def pairs(self, state: memory_lib.Memory, params, embeddings: jax.Array,
            labels: jax.Array) -> losses.Pairs:
    """Pairs [B, B + size]: the batch block, then the memory block without the anchors' own copies."""
    del params
    batch = embeddings.shape[0]
    pairs = losses.build_pairs(embeddings, labels, ref_embeddings=state.embeddings,
                               ref_labels=state.labels, ref_valid=state.valid)
    # After update, the newest `batch` rows are this batch (or the memory is still empty).
    slots, there = memory_lib.newest_slots(state, batch)
    own_copy = jnp.where(there, batch + slots, pairs.sim.shape[1])  # Out of range: no copy.
    pos = pairs.pos.at[jnp.arange(batch), own_copy].set(False, mode="drop")
    return pairs._replace(pos=pos)

  def objective(self, state: memory_lib.Memory, step: jax.Array, pairs: losses.Pairs, loss_fn,
                hparams: dict, multipliers=None):
    batch = pairs.sim.shape[0]
    on = step >= self.start_step

    def block_loss(columns):
      block = jax.tree.map(lambda x: x[:, columns], pairs)
      return losses.pair_loss_on(loss_fn, block, hparams,
                                 None if multipliers is None else multipliers[:, columns])

    batch_loss = block_loss(slice(None, batch))
    memory_loss = jnp.where(on, block_loss(slice(batch, None)), 0.0)
    metrics = {"xbm/batch_loss": batch_loss, "xbm/memory_loss": memory_loss,
               "xbm/filled": jnp.mean(state.valid.astype(jnp.float32))}
    return batch_loss + self.weight * memory_loss, metrics
