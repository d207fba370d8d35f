"""A proxy loss at a million classes: per-device memory with the proxies whole, in blocks, and sharded.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m mmsi_jax.bench sharded_proxies

value_and_grad, in the batch's embeddings [B, D] and the proxies [C, D], of a proxy loss three ways:
S [B, C] whole on one device; over blocks of `--class_block` classes on one device
(losses/class_blocks.py); over blocks with the proxies sharded along the classes over every device
(`blocked_loss(..., class_axis)` inside shard_map, the batch replicated). Memory per device is XLA's
analysis of the compiled call (arguments, outputs, temporaries; for the sharded call, one device's
part), plus the optimizer's state for the proxies (Adam: two moments, sharded as the proxies). Only
shapes are needed: nothing runs.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmsi_jax import loss_memory, losses
from mmsi_jax.losses.class_blocks import ClassBlocks, blocked_loss

CLASS_AXIS = "classes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--classes", type=int, default=1_000_000, help="C")
  parser.add_argument("--batch", type=int, default=256, help="B")
  parser.add_argument("--dim", type=int, default=512, help="D")
  parser.add_argument("--loss", default="norm_softmax")
  parser.add_argument("--class_block", type=int, default=8192, help="classes per block")


def run(args: argparse.Namespace) -> dict:
  devices = jax.devices()
  if args.classes % len(devices):
    raise ValueError(f"--classes {args.classes} is not divisible by the {len(devices)} devices.")
  loss_fn = losses.get_proxy_loss(args.loss)
  labels = jnp.asarray(np.arange(args.batch) % args.classes, jnp.int32)
  valid = jnp.ones((args.batch,), bool)
  rows = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32)
  proxies = jax.ShapeDtypeStruct((args.classes, args.dim), jnp.float32)
  proxy_mb = args.classes * args.dim * 4 / 2**20
  mesh = Mesh(np.array(devices), (CLASS_AXIS,))

  def whole(r, w):
    return losses.get(args.loss)(r, labels, proxies=w)

  def blocked(r, w, class_axis=None):
    return blocked_loss(loss_fn, ClassBlocks((r, w), labels, valid, block=args.class_block), {},
                        class_axis)[0]

  def sharded(r, w):
    return jax.shard_map(lambda r, w: blocked(r, w, CLASS_AXIS), mesh=mesh,
                         in_specs=(PartitionSpec(), PartitionSpec(CLASS_AXIS)),
                         out_specs=PartitionSpec())(r, w)

  sharded_proxies = jax.ShapeDtypeStruct(proxies.shape, proxies.dtype,
                                         sharding=NamedSharding(mesh, PartitionSpec(CLASS_AXIS)))
  figures = {"classes": args.classes, "batch": args.batch, "dim": args.dim, "loss": args.loss,
             "class_block": args.class_block, "devices": len(devices), "proxies_mb": proxy_mb}
  for name, fn, shards, w in (("whole", whole, 1, proxies), ("blocked", blocked, 1, proxies),
                              ("sharded", sharded, len(devices), sharded_proxies)):
    loss_part = loss_memory.peak_bytes(jax.jit(jax.value_and_grad(fn, argnums=(0, 1))), rows, w)
    figures[f"{name}/loss_part_mb"] = loss_part / 2**20
    figures[f"{name}/per_device_mb"] = loss_part / 2**20 + 2 * proxy_mb / shards
  figures["sharded_x_whole"] = figures["sharded/per_device_mb"] / figures["whole/per_device_mb"]
  return figures
