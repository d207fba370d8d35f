"""The memory dictionary: a fixed-shape ring buffer of past embeddings inside the TrainState.

Two layouts (docs/METHODS.md):
  per_class  C classes x `size` slots each: every class keeps its `size` most recent embeddings,
             as the MMSI authors' dictionary (d_size per class).
  global     one FIFO of `size` slots shared by all classes, as XBM's cross-batch memory.
Both are pure `init`/`enqueue` functions over a pytree, so they live inside the jitted step and are
checkpointed with the state. Unfilled slots are marked invalid and take no part in any loss.
"""

from typing import Optional

import flax
import jax
import jax.numpy as jnp

LAYOUTS = ("per_class", "global")


@flax.struct.dataclass
class Memory:
  """Ring buffer state.

  Attributes:
    embeddings: [S, D] stored embeddings (S = C * size for per_class, size for global).
    labels: [S] int32 labels of the stored embeddings.
    valid: [S] bool, slot holds an embedding.
    heads: [C] int32 (per_class: next slot of each class, counted since the start) or [1] (global).
  """
  embeddings: jax.Array
  labels: jax.Array
  valid: jax.Array
  heads: jax.Array
  per_class: bool = flax.struct.field(pytree_node=False)


def init(layout: str, size: int, embed_dim: int, num_classes: Optional[int] = None,
         dtype=jnp.float32) -> Memory:
  """An empty memory of `size` slots (per class for `per_class`, in all for `global`)."""
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown memory layout {layout!r}; use one of {LAYOUTS}.")
  per_class = layout == "per_class"
  if per_class and not num_classes:
    raise ValueError("A per_class memory needs num_classes.")
  slots = size * num_classes if per_class else size
  return Memory(
      embeddings=jnp.zeros((slots, embed_dim), dtype),
      labels=jnp.full((slots,), -1, jnp.int32),
      valid=jnp.zeros((slots,), bool),
      heads=jnp.zeros((num_classes if per_class else 1,), jnp.int32),
      per_class=per_class,
  )


def enqueue(memory: Memory, embeddings: jax.Array, labels: jax.Array,
            write: jax.Array | bool = True) -> Memory:
  """Writes a batch [B, D] with labels [B] over the oldest slots (of its class, for per_class).

  Within a batch, later samples count as newer. When a batch holds more samples of a class than the
  class has slots (or more than `size` samples in all, for global), only the newest are kept.
  With `write` false (a traced bool may decide), the memory is returned unchanged: no copy is made.
  """
  embeddings = jax.lax.stop_gradient(embeddings).astype(memory.embeddings.dtype)
  labels = labels.astype(jnp.int32)
  batch = labels.shape[0]
  slots = memory.labels.shape[0]
  if memory.per_class:
    size = slots // memory.heads.shape[0]
    same = labels[None, :] == labels[:, None]
    earlier = jnp.arange(batch)[None, :] < jnp.arange(batch)[:, None]
    rank = jnp.sum(same & earlier, axis=1, dtype=jnp.int32)  # Earlier samples of the class in the batch.
    count = jnp.sum(same, axis=1, dtype=jnp.int32)
    keep = count - rank <= size  # The newest `size` samples of each class.
    slot = labels * size + (memory.heads[labels] + rank) % size
    heads = memory.heads.at[labels].add(jnp.where((rank == 0) & write, count, 0))
  else:
    size = slots
    keep = batch - jnp.arange(batch) <= size
    slot = (memory.heads[0] + jnp.arange(batch)) % size
    heads = memory.heads + jnp.where(write, batch, 0)
  slot = jnp.where(keep & write, slot, slots)  # Out of range: dropped by the scatter.
  return memory.replace(
      embeddings=memory.embeddings.at[slot].set(embeddings, mode="drop"),
      labels=memory.labels.at[slot].set(labels, mode="drop"),
      valid=memory.valid.at[slot].set(True, mode="drop"),
      heads=heads,
  )


def newest_slots(memory: Memory, count: int) -> tuple[jax.Array, jax.Array]:
  """Global layout: (slots [count], still_there [count]) of the last `count` rows written, oldest
  first; a row is no longer there when `size` or more rows were written after it."""
  if memory.per_class:
    raise ValueError("newest_slots needs a global memory.")
  size = memory.labels.shape[0]
  age = count - 1 - jnp.arange(count)  # Rows written after each one.
  written = memory.heads[0] - 1 - age
  return written % size, (age < size) & (written >= 0)


def covered_classes(memory: Memory, num_classes: int) -> jax.Array:
  """Number of classes with at least one stored embedding (scalar int32)."""
  present = jnp.zeros((num_classes,), bool).at[memory.labels].max(memory.valid, mode="drop")
  return jnp.sum(present.astype(jnp.int32))
