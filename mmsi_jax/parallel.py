"""Data parallelism with `jax.jit` and `jax.sharding`: one mesh axis "data" over every device of every
host. The TrainState is replicated; each training batch is split along its first axis, every host
contributing the rows it prepared (data.pipeline.train_batches with its host_index). XLA inserts the
collectives: the similarity matrix of a sharded batch against itself gathers the embeddings, and the
gradient is reduced over the devices. Validation batches (MMSI) are the same on every host: replicated.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
REPLICATED_KEYS = ("val_images", "val_labels")


def data_mesh() -> Mesh:
  """A one-axis mesh over all devices (of all processes)."""
  return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Global arrays from this process's part of a batch: rows split over the mesh's data axis, except
  the replicated keys, which every process holds whole."""
  return {
      key: jax.make_array_from_process_local_data(
          replicated(mesh) if key in REPLICATED_KEYS else batch_sharded(mesh), value)
      for key, value in local_batch.items()
  }
