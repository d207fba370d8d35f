"""What a proxy loss part holds: the class vectors, MemVir's queues, and the loss's peak memory.

The loss part is value_and_grad, with respect to the batch's embeddings [B, D] and the proxies [C, D],
of the proxy loss over the pairs its references component builds (whole, or over class blocks). Its
peak is XLA's memory analysis of the compiled function (arguments, the queues included, + outputs +
temporaries): it needs only shapes, so it is known before a step runs, at any size. The start of a run
prints it (train.py), and `bench memvir` measures it against the queues.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmsi_jax.models import l2_normalize
from mmsi_jax.references.proxies import PROXY_PARAMS


def loss_part(refs, loss_fn, hparams: dict, labels: jax.Array):
  """jit(value_and_grad) of the loss of `refs`'s pairs in (embeddings, proxies), given its state."""
  def objective(embeddings, proxies, state):
    pairs = refs.pairs(state, {PROXY_PARAMS: proxies}, l2_normalize(embeddings), labels)
    return refs.objective(state, jnp.zeros((), jnp.int32), pairs, loss_fn, hparams)[0]
  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))


def peak_bytes(fn, *args) -> int:
  """Arguments + outputs + temporaries of the compiled `fn(*args)` (arrays or shapes)."""
  analysis = fn.lower(*args).compile().memory_analysis()
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          + analysis.temp_size_in_bytes)


def _megabytes_per_device(tree) -> float:
  """MB of one device's share of the arrays of `tree` (the whole of each, unsharded)."""
  def shard_bytes(leaf):
    sharding = getattr(leaf, "sharding", None)
    shape = leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)
    return int(np.prod(shape)) * leaf.dtype.itemsize
  return sum(shard_bytes(leaf) for leaf in jax.tree.leaves(tree)) / 2**20


def report(refs, loss_fn, hparams: dict, params, references_state, batch_size: int,
           mesh=None) -> str:
  """One line: the proxies' and queues' MB per device and the loss part's expected peak per device.

  The arrays' shardings are read from them (global arrays of a run, over `mesh`, which the loss part
  is compiled over); host or unsharded arrays count whole.
  """
  proxies = params[PROXY_PARAMS]
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  embeddings = jax.ShapeDtypeStruct((batch_size, proxies.shape[1]), proxies.dtype, sharding=replicated)
  labels = jnp.zeros((batch_size,), jnp.int32)
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
    peak = peak_bytes(loss_part(refs, loss_fn, hparams, labels), embeddings, shape(proxies),
                      jax.tree.map(shape, references_state))
  block = getattr(refs, "class_block", 0)
  shards = getattr(refs, "class_shards", 0)
  form = (f"over blocks of {block} classes" if block
          else "over each device's classes at once" if shards else "with S whole")
  if shards:
    form += f", the classes padded to a multiple of {shards} and split over the devices"
  queues = (f", queues {_megabytes_per_device(references_state):.1f} MB"
            if references_state is not None else "")
  return (f"Proxies [{proxies.shape[0]}, {proxies.shape[1]}] {_megabytes_per_device(proxies):.1f} MB "
          f"per device (the optimizer's state for them on top){queues}; the loss part {form} peaks at "
          f"{peak / 2**20:.1f} MB per device (XLA's analysis, queues included).")
