"""Loss + gradient time of every loss at B anchors x M references x D dims, as a ratio to the floor.

The floor is what every loss must do anyway: the similarity matmul and its backward pass for some pair
weights W, i.e. value_and_grad of sum(W * (e @ r.T)) with respect to the embeddings e [B, D], where
r = [e; memory] [M, D] for the pair losses (the batch against itself and a memory of M - B rows) and
r = proxies [C = M, D], differentiated with respect to e and the proxies, for the proxy losses. W is a
fixed random [B, M] array (with W = 1, XLA may specialise the backward pass for a constant cotangent).
A loss's figure is the time of value_and_grad of the embedding-level loss (`losses.get(name)`, pairs
built inside) over the floor's, the two timed in alternation (medians) so that other load on the
machine affects both alike.
Working memory is the compiled function's temporary buffers (XLA memory analysis).

With `--class_block b`, each proxy loss is also run over blocks of b classes (losses/class_blocks.py)
and timed in alternation with its whole form: `<loss>_blocked_x_whole`, and its working memory.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mmsi_jax import losses
from mmsi_jax.bench import timing

# Each benchmarked configuration: (label, loss name, hyperparameters).
CONFIGS = (
    [(name, name, {}) for name in losses.names() if name != "triplet"]
    + [(f"triplet_{mode}", "triplet", {"mining": mode}) for mode in ("all", "hard", "semihard")]
    + [(name, name, {}) for name in losses.proxy_names()])


def add_arguments(parser):
  parser.add_argument("--batch", type=int, default=128, help="anchors B")
  parser.add_argument("--refs", type=int, default=8192, help="references M (batch + memory; proxies)")
  parser.add_argument("--dim", type=int, default=512, help="embedding size D")
  parser.add_argument("--per_class", type=int, default=4, help="samples per class in the batch (K)")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure (median)")
  parser.add_argument("--class_block", type=int, default=0,
                      help="b > 0: also time each proxy loss over blocks of b classes against its whole "
                           "form")


def _unit_rows(rng, n, dim):
  x = rng.normal(size=(n, dim)).astype(np.float32)
  return jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def _inputs(args):
  rng = np.random.default_rng(0)
  num_classes = args.batch // args.per_class
  memory_size = args.refs - args.batch
  return dict(
      embeddings=_unit_rows(rng, args.batch, args.dim),
      labels=jnp.asarray(np.repeat(np.arange(num_classes), args.per_class)),
      memory=_unit_rows(rng, memory_size, args.dim),
      # The memory holds the batch's classes among many others; a tenth of its slots are unfilled.
      memory_labels=jnp.asarray(rng.integers(0, 4 * num_classes, memory_size)),
      memory_valid=jnp.asarray(np.arange(memory_size) < 0.9 * memory_size),
      proxies=_unit_rows(rng, args.refs, args.dim),
      floor_weights=jnp.asarray(rng.normal(size=(args.batch, args.refs)).astype(np.float32)))


def _loss_and_grad(name, hparams, data, class_block=0):
  """A jitted value_and_grad of the loss and its arguments."""
  loss_fn = losses.get(name)
  if name in losses.proxy_names():
    def objective(e, p):
      return loss_fn(e, data["labels"], proxies=p, class_block=class_block, **hparams)
    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1))), (data["embeddings"],
                                                                    data["proxies"])

  def objective(e):
    return loss_fn(e, data["labels"], ref_embeddings=data["memory"],
                   ref_labels=data["memory_labels"], ref_valid=data["memory_valid"], **hparams)
  return jax.jit(jax.value_and_grad(objective)), (data["embeddings"],)


def _floors(data):
  weights = data["floor_weights"]

  def pair_floor(e):
    return jnp.sum(weights * (e @ jnp.concatenate([e, data["memory"]], axis=0).T))

  def proxy_floor(e, p):
    return jnp.sum(weights * (e @ p.T))

  return {
      "pair": (jax.jit(jax.value_and_grad(pair_floor)), (data["embeddings"],)),
      "proxy": (jax.jit(jax.value_and_grad(proxy_floor, argnums=(0, 1))),
                (data["embeddings"], data["proxies"])),
  }


def _temp_megabytes(fn, fn_args) -> float:
  analysis = fn.lower(*fn_args).compile().memory_analysis()
  return analysis.temp_size_in_bytes / 2**20


def run(args) -> dict:
  data = _inputs(args)
  floors = _floors(data)
  figures = {"batch": args.batch, "refs": args.refs, "dim": args.dim}
  for kind, (fn, fn_args) in floors.items():
    figures[f"floor_{kind}_ms"] = 1e3 * timing.time_call(lambda: fn(*fn_args), repeats=args.repeats)
    figures[f"floor_{kind}_temp_mb"] = _temp_megabytes(fn, fn_args)
  rows = []
  for label, name, hparams in CONFIGS:
    kind = "proxy" if name in losses.proxy_names() else "pair"
    (loss_fn, loss_args), (floor_fn, floor_args) = _loss_and_grad(name, hparams, data), floors[kind]
    times = timing.time_interleaved(
        {"loss": lambda: loss_fn(*loss_args), "floor": lambda: floor_fn(*floor_args)},
        repeats=args.repeats)
    seconds, floor_seconds = times["loss"], times["floor"]
    row = {"ms": 1e3 * seconds, "ratio": seconds / floor_seconds,
           "temp_mb": _temp_megabytes(loss_fn, loss_args)}
    figures.update({f"{label}_{key}": value for key, value in row.items()})
    rows.append((label, kind, row))
  if args.class_block:
    _time_blocked(args, data, figures)
  print(f"{'loss':<20} {'floor':<6} {'ms':>9} {'x floor':>8} {'temp MB':>8}")
  for kind in floors:
    print(f"{'(floor)':<20} {kind:<6} {figures[f'floor_{kind}_ms']:>9.2f} {1.0:>8.2f} "
          f"{figures[f'floor_{kind}_temp_mb']:>8.1f}")
  for label, kind, row in rows:
    print(f"{label:<20} {kind:<6} {row['ms']:>9.2f} {row['ratio']:>8.2f} {row['temp_mb']:>8.1f}")
  return figures


def _time_blocked(args, data, figures: dict) -> None:
  """Each proxy loss over blocks of args.class_block classes against its whole form, in alternation."""
  print(f"{'proxy loss':<20} {'whole ms':>9} {'blocked ms':>11} {'x whole':>8} {'temp MB':>8}")
  for name in losses.proxy_names():
    whole_fn, fn_args = _loss_and_grad(name, {}, data)
    blocked_fn, _ = _loss_and_grad(name, {}, data, class_block=args.class_block)
    times = timing.time_interleaved({"whole": lambda: whole_fn(*fn_args),
                                     "blocked": lambda: blocked_fn(*fn_args)}, repeats=args.repeats)
    row = {"blocked_ms": 1e3 * times["blocked"], "blocked_x_whole": times["blocked"] / times["whole"],
           "blocked_temp_mb": _temp_megabytes(blocked_fn, fn_args)}
    figures.update({f"{name}_{key}": value for key, value in row.items()})
    print(f"{name:<20} {1e3 * times['whole']:>9.2f} {row['blocked_ms']:>11.2f} "
          f"{row['blocked_x_whole']:>8.2f} {row['blocked_temp_mb']:>8.1f}")
