"""Data parallelism with `jax.jit` and `jax.sharding`: one mesh axis "data" over every device of every
host. The TrainState is replicated; each training batch is split along its first axis, every host
contributing the rows it prepared (data.pipeline.train_batches with its host_index). XLA inserts the
collectives: the similarity matrix of a sharded batch against itself gathers the embeddings, and the
gradient is reduced over the devices. Extra batches (e.g. MMSI's validation batch, under the batch's
"extra" key) are the same on every host: replicated.

On several hosts (a TPU pod, GPU nodes), one process runs per host, each joined with `initialize`;
process 0 alone writes metrics, events and figures, and every process takes part in checkpoints.
"""

from typing import Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmsi_jax.data.sampler import EXTRA

DATA_AXIS = "data"


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, heartbeat_timeout_seconds: int = 100) -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`).

  On Cloud TPU pods and under SLURM the arguments are detected and may be left out; elsewhere pass
  process 0's "host:port", the number of processes and this one's id (0 .. num_processes - 1).
  A process without a heartbeat for `heartbeat_timeout_seconds` is lost: JAX's coordination service
  then ends the others (mmsi_jax/stopping.py). JAX's preemption notifier takes over SIGTERM: a notice
  reaches every process, which agree on the step to save (stopping.StopSignals). CPU processes exchange
  their collectives through gloo.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def is_primary() -> bool:
  """Whether this is process 0, the one that writes reports."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process has reached the point called `name` (nothing to wait for alone)."""
  multihost_utils.sync_global_devices(name)


def data_mesh() -> Mesh:
  """A one-axis mesh over all devices (of all processes)."""
  return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Global arrays from this process's part of a batch: rows split over the mesh's data axis, except
  the extra batches, which every process holds whole (replicated)."""
  def put(sharding, tree):
    return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value), tree)
  return {key: put(replicated(mesh) if key == EXTRA else batch_sharded(mesh), value)
          for key, value in local_batch.items()}
