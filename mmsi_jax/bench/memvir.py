"""MemVir's loss part against the same proxy loss without it, at the full curriculum.

  python -m mmsi_jax.bench memvir --json memvir.json

As `bench losses`: value_and_grad, with respect to the batch's embeddings e [B, D] and the proxies
W [C, D], of the proxy loss on the pairs its references component builds: the plain class proxies
(S [B, C]) against MemVir (S [(N + 1) B, (N + 1) C]) with full queues (k = N virtual steps, random unit
rows and labels), both through the components the trainer uses. Per class count and loss:
- memory_mb: XLA's analysis of the compiled function (arguments, the queues included, + outputs +
  temporaries); it needs only the shapes, so it is reported even where the call would not fit the
  machine;
- ms and x_plain: medians of the two timed in turn (only where MemVir's memory is under --max_run_gb).
MemVir runs twice: with S whole and over blocks of `--class_block` classes (losses/class_blocks.py);
`over_queues_mb` is each one's memory beyond the queues, `blocked_x_whole` the blocked form's time over
the whole one's (timed in turn with them where both fit).
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmsi_jax import loss_memory, losses
from mmsi_jax.bench import timing
from mmsi_jax.models import l2_normalize
from mmsi_jax.references import ClassProxies, MemoryVirtualClasses
from mmsi_jax.losses.class_blocks import stored_bits
from mmsi_jax.references.memvir import DTYPES, queue_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--classes", default="98,11318", help="C: Cars' and SOP's training classes")
  parser.add_argument("--losses", default="norm_softmax,proxy_nca,proxy_anchor")
  parser.add_argument("--batch", type=int, default=128, help="B")
  parser.add_argument("--dim", type=int, default=512, help="D")
  parser.add_argument("--num_steps", type=int, default=45, help="N, past steps used at once")
  parser.add_argument("--step_gap", type=int, default=10, help="M")
  parser.add_argument("--dtype", default="float32", help="what the queues store")
  parser.add_argument("--max_run_gb", type=float, default=4.0,
                      help="time only where MemVir's compiled call needs less than this")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure (median)")
  parser.add_argument("--class_block", type=int, default=2048, help="classes per block, blocked form")


def _full_queues(refs: MemoryVirtualClasses, shapes, seed: int = 1):
  """Queues of the shapes `shapes` with every slot written: random unit rows and labels."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  slots, batch, dim = shapes.embeddings.shape
  dtype = DTYPES[refs.dtype]
  return shapes.replace(
      embeddings=stored_bits(l2_normalize(jax.random.normal(keys[0], (slots, batch, dim))).astype(dtype)),
      labels=jax.random.randint(keys[1], (slots, batch), 0, refs.num_classes),
      proxies=stored_bits(jax.random.normal(keys[2], shapes.proxies.shape).astype(dtype)),
      pushed=jnp.asarray(slots, jnp.int32))


def run(args: argparse.Namespace) -> dict:
  figures = {"batch": args.batch, "dim": args.dim, "num_steps": args.num_steps,
             "step_gap": args.step_gap, "dtype": args.dtype}
  rng = np.random.default_rng(0)
  embeddings = jnp.asarray(rng.normal(size=(args.batch, args.dim)).astype(np.float32))
  for num_classes in (int(c) for c in args.classes.split(",")):
    labels = jnp.asarray(rng.integers(0, num_classes, args.batch))
    proxies = jnp.asarray(rng.normal(size=(num_classes, args.dim)).astype(np.float32))
    plain = ClassProxies(num_classes, init="normal", init_std=1.0)
    settings = dict(init="normal", init_std=1.0, num_steps=args.num_steps, step_gap=args.step_gap,
                    warmup_steps=0, batch_size=args.batch, dtype=args.dtype,
                    max_memory_gb=float("inf"))
    memvir = {"memvir": MemoryVirtualClasses(num_classes, **settings),
              "memvir_blocked": MemoryVirtualClasses(num_classes, **settings,
                                                     class_block=args.class_block)}
    queue_shapes = jax.eval_shape(lambda: memvir["memvir"].init(jax.random.PRNGKey(0), args.dim)[1])
    queues_mb = queue_bytes(num_classes=num_classes, embed_dim=args.dim, batch_size=args.batch,
                            num_steps=args.num_steps, step_gap=args.step_gap, dtype=args.dtype) / 2**20
    figures[f"C{num_classes}/queues_mb"] = queues_mb
    queues = None
    for loss_name in args.losses.split(","):
      prefix, loss_fn = f"C{num_classes}/{loss_name}", losses.get_proxy_loss(loss_name)
      calls = {"plain": (loss_memory.loss_part(plain, loss_fn, {}, labels), None)}
      calls.update({name: (loss_memory.loss_part(refs, loss_fn, {}, labels), queue_shapes)
                    for name, refs in memvir.items()})
      fits = {}
      for name, (fn, state) in calls.items():
        memory_mb = loss_memory.peak_bytes(fn, embeddings, proxies, state) / 2**20
        figures[f"{prefix}/{name}_memory_mb"] = memory_mb
        if name != "plain":
          figures[f"{prefix}/{name}_over_queues_mb"] = memory_mb - queues_mb
          figures[f"{prefix}/{name}_memory_x_plain"] = memory_mb / figures[f"{prefix}/plain_memory_mb"]
        fits[name] = memory_mb <= args.max_run_gb * 1024
      timed = [name for name in calls if fits[name]]
      if timed == ["plain"]:
        continue
      if queues is None:
        queues = _full_queues(memvir["memvir"], queue_shapes)
        assert int(jnp.sum(memvir["memvir"].available(queues))) == args.num_steps  # Full curriculum.
      times = timing.time_interleaved(
          {name: functools.partial(calls[name][0], embeddings, proxies,
                                   None if name == "plain" else queues) for name in timed},
          repeats=args.repeats)
      for name in timed:
        figures[f"{prefix}/{name}_ms"] = 1e3 * times[name]
        if name != "plain":
          figures[f"{prefix}/{name}_time_x_plain"] = times[name] / times["plain"]
      if len(timed) == 3:
        figures[f"{prefix}/blocked_x_whole"] = times["memvir_blocked"] / times["memvir"]
  return figures
