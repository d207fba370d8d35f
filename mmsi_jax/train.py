"""Training and evaluation: the state, the jitted train step, evaluation and the loop.

One step (DESIGN.md section 2): embed a PK batch, build the similarities of the batch against itself,
take the loss's pair weights W = dL/dS, and update the parameters with the gradient of the weighted pair
sum sum_ij m_ij * stop_gradient(W_ij) * S_ij (m = 1 without a miner), which equals the loss's gradient.
"""

import dataclasses
import inspect
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmsi_jax import checkpointing, losses, models, reporting
from mmsi_jax.data import pipeline
from mmsi_jax.data.sampler import PKSampler
from mmsi_jax.eval import figures, nearest_neighbors, nmi, retrieval_metrics


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  Attributes:
    step: number of completed steps.
    params: model parameters.
    batch_stats: BatchNorm running statistics.
    opt_state: optax state of the model optimizer.
    rng: PRNG key, advanced every step.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails with a message naming the key and the fix, before any work, when the config cannot run."""
  def require(ok, message):
    if not ok:
      raise ValueError(f"Invalid config: {message}")

  require(config.data.name in pipeline.names(),
          f"data.name={config.data.name!r} is not one of {pipeline.names()}.")
  require(config.model.name in models.names(),
          f"model.name={config.model.name!r} is not one of {models.names()}.")
  require(config.loss.name in losses.names(),
          f"loss.name={config.loss.name!r} is not one of {losses.names()}.")
  accepted = inspect.signature(losses.get_pair_loss(config.loss.name)).parameters
  for key in config.loss.hparams:
    require(key in accepted and accepted[key].kind == inspect.Parameter.KEYWORD_ONLY,
            f"loss.hparams.{key} is not a hyperparameter of {config.loss.name!r}; it takes "
            f"{[k for k, p in accepted.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]}.")
  train = config.train
  for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    require(train[key] > 0, f"train.{key} must be positive, got {train[key]}.")
  require(train.checkpoint_every % train.log_every == 0,
          f"train.checkpoint_every ({train.checkpoint_every}) must be a multiple of train.log_every "
          f"({train.log_every}) so that a resumed run logs exactly what an uninterrupted one does.")
  require(config.optim.name in ("adam", "adamw"),
          f"optim.name={config.optim.name!r} is not 'adam' or 'adamw'.")
  require(config.optim.schedule in ("constant", "cosine"),
          f"optim.schedule={config.optim.schedule!r} is not 'constant' or 'cosine'.")
  require(config.optim.learning_rate > 0, "optim.learning_rate must be positive.")
  require(0 <= config.optim.warmup_steps < train.num_steps,
          "optim.warmup_steps must be in [0, train.num_steps).")


def create_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """Adam with weight decay (L2 in the gradient, as torch's Adam, or decoupled: AdamW) and a schedule."""
  if optim.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate, max(optim.warmup_steps, 1), num_steps, end_value=0.0)
  else:
    schedule = optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))
  if optim.name == "adamw":
    return optax.adamw(schedule, weight_decay=optim.weight_decay)
  return optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.adam(schedule))


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def create_train_state(rng: jax.Array, model, tx: optax.GradientTransformation,
                       image_shape: tuple) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=state_rng)


def make_train_step(model, tx: optax.GradientTransformation, pair_loss: Callable,
                    hparams: dict) -> Callable:
  """The jitted step `(state, batch) -> (state, metrics)` for one PK batch."""

  def loss_and_aux(params, state, batch):
    embeddings, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, normalize_images(batch["images"]),
        train=True, mutable=["batch_stats"])
    pairs = losses.build_pairs(embeddings, batch["labels"])
    weights = losses.pair_weights(pair_loss, pairs, **hparams)
    loss = pair_loss(jax.lax.stop_gradient(pairs.sim), pairs.pos, pairs.neg, **hparams)
    objective = losses.weighted_pair_loss(pairs.sim, weights)
    metrics = {
        "train/loss": loss,
        "train/active_pairs": jnp.mean((weights != 0).astype(jnp.float32)),
        "train/pos_sim": jnp.sum(jnp.where(pairs.pos, pairs.sim, 0.0)) / jnp.maximum(pairs.pos.sum(), 1),
        "train/neg_sim": jnp.sum(jnp.where(pairs.neg, pairs.sim, 0.0)) / jnp.maximum(pairs.neg.sum(), 1),
    }
    return objective, (updates["batch_stats"], metrics)

  @jax.jit
  def train_step(state: TrainState, batch: dict):
    grads, (batch_stats, metrics) = jax.grad(loss_and_aux, has_aux=True)(state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["train/grad_norm"] = optax.global_norm(grads)
    rng, _ = jax.random.split(state.rng)
    return dataclasses.replace(state, step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state, rng=rng), metrics

  return train_step


def make_embed_fn(model) -> Callable:
  """Jitted `(params, batch_stats, images uint8) -> embeddings [N, D]` in inference mode."""
  @jax.jit
  def embed(params, batch_stats, images):
    return model.apply({"params": params, "batch_stats": batch_stats}, normalize_images(images),
                       train=False)
  return embed


def embed_split(embed: Callable, source, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings [N, D] and labels [N] of a whole split, in order; `embed(images) -> [B, D]`."""
  outputs, labels = [], []
  for batch in pipeline.eval_batches(source, batch_size):
    mask = batch["mask"]
    outputs.append(np.asarray(embed(batch["images"]))[mask])
    labels.append(batch["labels"][mask])
  return np.concatenate(outputs), np.concatenate(labels)


def raw_pixels(images) -> np.ndarray:
  """The raw-pixel baseline's embedding: flattened pixels, L2-normalised."""
  flat = np.asarray(images, np.float32).reshape(len(images), -1)
  return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def evaluate(config: ml_collections.ConfigDict, embed: Callable, source, prefix: str,
             figures_prefix: Optional[str] = None) -> dict:
  """Metrics of the split queried against itself, keyed "<prefix>/<metric>": retrieval metrics, and NMI
  when config.eval.nmi. With figures_prefix, also writes <figures_prefix>_grid.png (queries and their
  nearest results) and <figures_prefix>_recall.png (the Recall@K curve)."""
  embeddings, labels = embed_split(embed, source, config.data.eval_batch_size)
  ks = tuple(config.eval.ks)
  metrics = retrieval_metrics(embeddings, labels, ks=ks, chunk_size=config.eval.chunk_size)
  if config.eval.nmi:
    metrics["nmi"] = nmi(embeddings, labels, seed=config.seed)
  if figures_prefix:
    os.makedirs(os.path.dirname(figures_prefix), exist_ok=True)
    figures.recall_curve(ks, [metrics[f"recall@{k}"] for k in ks], title=f"{prefix}: Recall@K").save(
        f"{figures_prefix}_recall.png")
    draw_retrieval_grid(config, embeddings, labels, source).save(f"{figures_prefix}_grid.png")
  return {f"{prefix}/{k}": v for k, v in metrics.items() if not k.startswith("num_")}


def draw_retrieval_grid(config: ml_collections.ConfigDict, embeddings: np.ndarray, labels: np.ndarray,
                        source):
  """The grid of config.eval.grid_queries queries spread over the split, each with its
  config.eval.grid_results nearest other images, right (same label) or wrong."""
  queries = np.linspace(0, len(labels) - 1, config.eval.grid_queries).astype(np.int64)
  _, neighbors = nearest_neighbors(embeddings[queries], embeddings, config.eval.grid_results,
                                   query_ids=queries)

  def images(indices):
    return np.stack([pipeline.decode_image(source[int(i)]["image"]) for i in indices])

  return figures.retrieval_grid(images(queries), np.stack([images(row) for row in neighbors]),
                                labels[neighbors] == labels[queries, None])


def figures_path_prefix(workdir: str, name: str) -> str:
  """Where an evaluation's figures go: <workdir>/eval/<name>_grid.png and <name>_recall.png."""
  return os.path.join(workdir, "eval", name)


def _ensure_writable(workdir: str) -> None:
  probe = os.path.join(workdir, ".write_probe")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(
        f"Cannot write to workdir {workdir!r} ({e.strerror}): pass a writable --workdir.") from e


def _first_non_finite(losses_by_step: list[tuple[int, Any]]) -> Optional[int]:
  for step, loss in losses_by_step:
    if not np.isfinite(loss):
      return step
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluating every `train.eval_every` steps and at the end; resumes from <workdir>.

  Returns the final evaluation metrics and the raw-pixel baseline, keyed as in metrics.jsonl.
  """
  check_config(config)
  _ensure_writable(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  data = config.data
  pipeline.prepare(data.name, data.data_dir, data.manual_dir or None)
  train_source = pipeline.load_split(data.name, data.train_split, data.data_dir, decode_images=False)
  test_source = pipeline.load_split(data.name, data.test_split, data.data_dir, decode_images=False)
  sampler = PKSampler(pipeline.split_labels(train_source), data.classes_per_batch,
                      data.samples_per_class, seed=config.seed)
  image_shape = pipeline.decode_image(train_source[0]["image"]).shape

  model_kwargs = {k: v for k, v in config.model.items() if k != "name"}
  model = models.get(config.model.name, **model_kwargs)
  num_steps = config.train.num_steps
  tx = create_optimizer(config.optim, num_steps)
  pair_loss = losses.get_pair_loss(config.loss.name)
  hparams = dict(config.loss.hparams)
  state = create_train_state(jax.random.PRNGKey(config.seed), model, tx, image_shape)

  ckpt = checkpointing.manager(workdir, config.train.keep_checkpoints)
  state, restored_step = checkpointing.restore_latest(ckpt, state)
  start_step = int(state.step)
  writer = reporting.MetricsWriter(workdir, resume_step=start_step)
  train_step = make_train_step(model, tx, pair_loss, hparams)
  embed_fn = make_embed_fn(model)

  def embed(images):  # The current parameters: `state` is rebound every step.
    return embed_fn(state.params, state.batch_stats, images)

  final = {}
  if restored_step is None:
    baseline = evaluate(config, raw_pixels, test_source, "baseline",
                        figures_path_prefix(workdir, "baseline"))
    writer.write(0, baseline)
  else:
    baseline = {k: v for r in reporting.read_metrics(workdir) for k, v in r.items()
                if k.startswith("baseline/")}
    print(f"Resuming at step {start_step} of {num_steps} from {ckpt.directory}.", flush=True)
  final.update(baseline)

  progress = reporting.Progress(num_steps, start_step)
  batches = pipeline.train_batches(
      train_source, sampler, start_step=start_step, num_steps=num_steps, seed=config.seed,
      crop_padding=data.crop_padding, flip=data.flip, num_threads=data.num_threads,
      prefetch=data.prefetch)
  pending: list[tuple[int, dict]] = []
  last_checkpoint = restored_step
  started = time.perf_counter()
  for step in range(start_step + 1, num_steps + 1):
    state, metrics = train_step(state, next(batches))
    pending.append((step, metrics))
    boundary = step % config.train.log_every == 0 or step == num_steps
    if not boundary:
      continue
    host = jax.device_get(pending)
    pending = []
    bad = _first_non_finite([(s, m["train/loss"]) for s, m in host])
    if bad is not None:
      writer.close()
      ckpt.wait_until_finished()
      raise NonFiniteLossError(
          f"The training loss became non-finite at step {bad}; training stopped. The last good "
          f"checkpoint is step {last_checkpoint} in {ckpt.directory} (nothing later was saved). "
          f"Lower optim.learning_rate or check the data, then run again to resume.")
    means = {k: float(np.mean([m[k] for _, m in host])) for k in host[0][1]}
    writer.write(step, means)
    print(progress.line(step, {"loss": means["train/loss"]}), flush=True)
    if step % config.train.eval_every == 0 or step == num_steps:
      evaluation = evaluate(config, embed, test_source, "test",
                            figures_path_prefix(workdir, f"step_{step:06d}"))
      writer.write(step, evaluation)
      final = {**baseline, **evaluation}
      print("  eval: " + "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in evaluation.items()),
            flush=True)
    if step % config.train.checkpoint_every == 0 or step == num_steps:
      checkpointing.save(ckpt, step, state)
      last_checkpoint = step
  ckpt.wait_until_finished()
  writer.close()

  if start_step < num_steps:
    print(f"Trained steps {start_step + 1}..{num_steps} in {time.perf_counter() - started:.1f} s.",
          flush=True)
  if not any(k.startswith("test/") for k in final):  # Resumed a finished run: evaluate once more.
    final.update(evaluate(config, embed, test_source, "test",
                          figures_path_prefix(workdir, f"step_{num_steps:06d}")))
  columns = [k.split("/", 1)[1] for k in final if k.startswith("test/")]
  rows = {
      "raw pixels": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("baseline/")},
      f"{config.model.name} + {config.loss.name}":
          {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("test/")},
  }
  print(f"\nTest split {data.name}/{data.test_split} after {num_steps} steps:")
  print(reporting.format_table(rows, columns), flush=True)
  return final
