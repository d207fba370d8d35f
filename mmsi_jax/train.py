"""Training and evaluation: the state, the jitted train step, evaluation and the loop.

One step (DESIGN.md section 2): embed a PK batch, build the similarities of the batch against itself,
take the loss's pair weights W = dL/dS, and update the parameters with the gradient of the weighted pair
sum sum_ij m_ij * stop_gradient(W_ij) * S_ij (m = 1 without a miner), which equals the loss's gradient.
"""

import dataclasses
import functools
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
from PIL import Image

from mmsi_jax import checkpointing, losses, mining, models, parallel, reporting
from mmsi_jax.data import pipeline, transforms
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
    miner_state: the miner's state (e.g. MMSI's memory dictionary and weighting net), None without one.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  miner_state: Any = None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails with a message naming the key and the fix, before any work, when the config cannot run."""
  def require(ok, message):
    if not ok:
      raise ValueError(f"Invalid config: {message}")

  require(config.data.name in pipeline.names(),
          f"data.name={config.data.name!r} is not one of {pipeline.names()}.")
  require(config.data.normalization in transforms.NORMALIZATIONS,
          f"data.normalization={config.data.normalization!r} is not one of {transforms.NORMALIZATIONS}.")
  require(config.data.train_crop in ("pad", "random_resized"),
          f"data.train_crop={config.data.train_crop!r} is not 'pad' or 'random_resized'.")
  require(config.data.train_crop == "pad" or config.data.image_size > 0,
          "data.train_crop='random_resized' needs data.image_size > 0.")
  require(config.model.name in models.names(),
          f"model.name={config.model.name!r} is not one of {models.names()}.")
  if config.model.name in models.names():
    model_args = inspect.signature(models._MODELS[config.model.name]).parameters
    for key in config.model:
      require(key == "name" or key in model_args,
              f"model.{key} is not a setting of {config.model.name!r}; it takes {list(model_args)}.")
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
  require(config.miner.name in mining.names(),
          f"miner.name={config.miner.name!r} is not one of {mining.names()}.")
  mmsi = config.miner.mmsi
  require(mmsi.validation in ("train_classes", "held_out"),
          f"miner.mmsi.validation={mmsi.validation!r} is not 'train_classes' or 'held_out'.")
  require(mmsi.validation_classes >= 2,
          "miner.mmsi.validation_classes must be at least 2 (the meta loss needs negatives).")
  batch_size = config.data.classes_per_batch * config.data.samples_per_class
  require(batch_size % jax.device_count() == 0,
          f"The batch of {batch_size} images cannot be split over {jax.device_count()} devices: make "
          f"data.classes_per_batch * data.samples_per_class a multiple of the device count.")
  require(config.optim.name in ("adam", "adamw"),
          f"optim.name={config.optim.name!r} is not 'adam' or 'adamw'.")
  require(config.optim.schedule in ("constant", "cosine"),
          f"optim.schedule={config.optim.schedule!r} is not 'constant' or 'cosine'.")
  require(config.optim.learning_rate > 0, "optim.learning_rate must be positive.")
  require(0 <= config.optim.warmup_steps < train.num_steps,
          "optim.warmup_steps must be in [0, train.num_steps).")


def create_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Learning rate by step: linear warm-up from 0, then constant or cosine decay to 0."""
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate, max(optim.warmup_steps, 1), num_steps, end_value=0.0)
  return optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))


def create_optimizer(optim: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam with weight decay (L2 in the gradient, as torch's Adam, or decoupled: AdamW)."""
  if optim.name == "adamw":
    return optax.adamw(schedule, weight_decay=optim.weight_decay)
  return optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.adam(schedule))


def create_train_state(rng: jax.Array, model, tx: optax.GradientTransformation,
                       image_shape: tuple, miner=None) -> TrainState:
  init_rng, miner_rng, state_rng = jax.random.split(rng, 3)
  variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables["params"]
  miner_state = None
  if miner is not None:
    embed_dim = jax.eval_shape(
        lambda: model.apply(variables, jnp.zeros((1, *image_shape), jnp.float32))).shape[-1]
    miner_state = miner.init(miner_rng, embed_dim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=state_rng, miner_state=miner_state)


def batch_similarities(model, params, batch_stats, images: jax.Array, labels: jax.Array):
  """S(params) [B, B] of a training batch against itself and its VJP, in train mode.

  Returns (sim, sim_vjp, (pairs, features [B, F], embeddings [B, D], new batch_stats)); sim_vjp maps a
  cotangent [B, B] to (the gradient with respect to params,).
  """
  def sim_of(params):
    (features, embeddings), updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], method="features_and_embeddings")
    pairs = losses.build_pairs(embeddings, labels)
    return pairs.sim, (pairs, features, embeddings, updates.get("batch_stats", batch_stats))

  return jax.vjp(sim_of, params, has_aux=True)


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    pair_loss: Callable, hparams: dict, miner=None,
                    normalization: str = "symmetric", mesh=None) -> Callable:
  """The jitted step `(state, batch) -> (state, metrics)` for one PK batch of uint8 images, normalised
  on the device by `normalization` (transforms.normalize).

  The gradient is that of the weighted pair sum L_m = sum_ij m_ij stop_gradient(W_ij) S_ij, taken as
  the VJP of S(params) with the cotangent dL_m/dS; without a miner m = 1 and it is the loss's gradient.
  A miner receives the same VJP, so a virtual step (MMSI) reuses the forward pass.
  With a mesh, the new state and the metrics come out replicated over it (see parallel.py).
  """

  def train_step(state: TrainState, batch: dict):
    images = transforms.normalize(batch["images"], normalization)
    labels = batch["labels"]
    sim, sim_vjp, (pairs, features, embeddings, batch_stats) = batch_similarities(
        model, state.params, state.batch_stats, images, labels)
    loss, weights = losses.loss_and_pair_weights(pair_loss, pairs, **hparams)
    metrics = {
        "train/loss": loss,
        "train/active_pairs": jnp.mean((weights != 0).astype(jnp.float32)),
        "train/pos_sim": jnp.sum(jnp.where(pairs.pos, sim, 0.0)) / jnp.maximum(pairs.pos.sum(), 1),
        "train/neg_sim": jnp.sum(jnp.where(pairs.neg, sim, 0.0)) / jnp.maximum(pairs.neg.sum(), 1),
    }
    multipliers, miner_state = None, state.miner_state
    if miner is not None:
      inputs = mining.StepInputs(
          step=state.step, params=state.params, batch_stats=state.batch_stats, labels=labels,
          features=features, embeddings=embeddings, pairs=pairs, weights=weights,
          sim_vjp=sim_vjp, val_images=transforms.normalize(batch["val_images"], normalization),
          val_labels=batch["val_labels"], learning_rate=schedule(state.step))
      multipliers, miner_state, miner_metrics = miner.multipliers(state.miner_state, inputs)
      metrics.update(miner_metrics)
    (grads,) = sim_vjp(jax.grad(losses.weighted_pair_loss)(sim, weights, multipliers))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    rng, _ = jax.random.split(state.rng)
    return dataclasses.replace(state, step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state, rng=rng, miner_state=miner_state), metrics

  return jax.jit(train_step, out_shardings=None if mesh is None else parallel.replicated(mesh))


def make_embed_fn(model, normalization: str = "symmetric") -> Callable:
  """Jitted `(params, batch_stats, images uint8) -> embeddings [N, D]` in inference mode."""
  @jax.jit
  def embed(params, batch_stats, images):
    return model.apply({"params": params, "batch_stats": batch_stats},
                       transforms.normalize(images, normalization), train=False)
  return embed


def embed_split(embed: Callable, source, batch_size: int,
                transform: Callable = transforms.decode_image) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings [N, D] and labels [N] of a whole split, in order; `embed(images) -> [B, D]`;
  `transform(encoded image) -> [H, W, 3] uint8` is the test transform."""
  outputs, labels = [], []
  for batch in pipeline.eval_batches(source, batch_size, transform):
    mask = batch["mask"]
    outputs.append(np.asarray(embed(batch["images"]))[mask])
    labels.append(batch["labels"][mask])
  return np.concatenate(outputs), np.concatenate(labels)


def raw_pixels(images, max_side: int) -> np.ndarray:
  """The raw-pixel baseline's embedding: pixels of images [N, H, W, 3] box-downsampled to at most
  max_side x max_side (so that it fits in memory on large test sets), flattened, L2-normalised."""
  images = np.asarray(images)
  if max(images.shape[1:3]) > max_side:
    images = np.stack([np.asarray(Image.fromarray(image).resize((max_side, max_side), Image.BOX))
                       for image in images])
  flat = images.astype(np.float32).reshape(len(images), -1)
  return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def evaluate(config: ml_collections.ConfigDict, embed: Callable, source, prefix: str,
             figures_prefix: Optional[str] = None) -> dict:
  """Metrics of the split queried against itself, keyed "<prefix>/<metric>": retrieval metrics, and NMI
  when config.eval.nmi. With figures_prefix, also writes <figures_prefix>_grid.png (queries and their
  nearest results) and <figures_prefix>_recall.png (the Recall@K curve)."""
  embeddings, labels = embed_split(embed, source, config.data.eval_batch_size,
                                   transforms.test_transform(config.data))
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

  test_transform = transforms.test_transform(config.data)

  def images(indices):
    return np.stack([test_transform(source[int(i)]["image"]) for i in indices])

  return figures.retrieval_grid(images(queries), np.stack([images(row) for row in neighbors]),
                                labels[neighbors] == labels[queries, None])


def figures_path_prefix(workdir: str, name: str) -> str:
  """Where an evaluation's figures go: <workdir>/eval/<name>_grid.png and <name>_recall.png."""
  return os.path.join(workdir, "eval", name)


def _ensure_writable(workdir: str) -> None:
  probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
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

  Returns the final evaluation metrics and the raw-pixel baseline, keyed as in metrics.jsonl. In a
  multi-process run every process trains and evaluates; process 0 alone prints and writes reports.
  """
  check_config(config)
  _ensure_writable(workdir)
  primary = parallel.is_primary()
  say = functools.partial(print, flush=True) if primary else lambda *args: None
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # Built first: a missing weights file (model.pretrained) stops the run before any data work.
  model = models.get(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})
  data = config.data
  if primary:
    pipeline.prepare(data.name, data.data_dir, data.manual_dir or None)
  parallel.sync("dataset prepared")
  if not primary:  # Finds process 0's build where the filesystem is shared; builds its own elsewhere.
    pipeline.prepare(data.name, data.data_dir, data.manual_dir or None)
  train_source = pipeline.load_split(data.name, data.train_split, data.data_dir, decode_images=False)
  test_source = pipeline.load_split(data.name, data.test_split, data.data_dir, decode_images=False)
  mmsi = config.miner.mmsi
  uses_validation = config.miner.name == "mmsi"
  held_out = mmsi.held_out_fraction if uses_validation and mmsi.validation == "held_out" else 0.0
  train_labels = pipeline.split_labels(train_source)
  sampler = PKSampler(train_labels, data.classes_per_batch, data.samples_per_class,
                      seed=config.seed, held_out_fraction=held_out)
  image_shape = transforms.test_transform(data)(train_source[0]["image"]).shape

  num_steps = config.train.num_steps
  schedule = create_schedule(config.optim, num_steps)
  tx = create_optimizer(config.optim, schedule)
  pair_loss = losses.get_pair_loss(config.loss.name)
  hparams = dict(config.loss.hparams)
  miner = mining.get(config.miner, model, pair_loss, hparams, num_classes=int(train_labels.max()) + 1)
  state = create_train_state(jax.random.PRNGKey(config.seed), model, tx, image_shape, miner)

  ckpt = checkpointing.manager(workdir, config.train.keep_checkpoints)
  mesh = parallel.data_mesh()
  state = jax.device_put(state, parallel.replicated(mesh))
  state, restored_step = checkpointing.restore_latest(ckpt, state)
  start_step = int(state.step)
  writer = reporting.MetricsWriter(workdir, resume_step=start_step) if primary else reporting.NullWriter()

  def figures_at(name):
    return figures_path_prefix(workdir, name) if primary else None
  train_step = make_train_step(model, tx, schedule, pair_loss, hparams, miner, data.normalization,
                               mesh)
  embed_fn = make_embed_fn(model, data.normalization)

  def embed(images):  # The current parameters: `state` is rebound every step.
    return embed_fn(state.params, state.batch_stats, images)

  final = {}
  if restored_step is None:
    baseline = evaluate(config, functools.partial(raw_pixels, max_side=config.eval.baseline_side),
                        test_source, "baseline", figures_at("baseline"))
    writer.write(0, baseline)
  else:
    baseline = {k: v for r in reporting.read_metrics(workdir) for k, v in r.items()
                if k.startswith("baseline/")}
    say(f"Resuming at step {start_step} of {num_steps} from {ckpt.directory}.")
  final.update(baseline)

  progress = reporting.Progress(num_steps, start_step)
  batches = pipeline.train_batches(
      train_source, sampler, transform=transforms.train_transform(data), start_step=start_step,
      num_steps=num_steps, seed=config.seed,
      validation_classes=mmsi.validation_classes if uses_validation else 0,
      num_threads=data.num_threads, num_workers=data.num_workers, prefetch=data.prefetch,
      host_index=jax.process_index(), host_count=jax.process_count())
  pending: list[tuple[int, dict]] = []
  last_checkpoint = restored_step
  started = time.perf_counter()
  for step in range(start_step + 1, num_steps + 1):
    state, metrics = train_step(state, parallel.global_batch(next(batches), mesh))
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
    say(progress.line(step, {"loss": means["train/loss"]}))
    if step % config.train.eval_every == 0 or step == num_steps:
      evaluation = evaluate(config, embed, test_source, "test",
                            figures_at(f"step_{step:06d}"))
      writer.write(step, evaluation)
      final = {**baseline, **evaluation}
      say("  eval: " + "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in evaluation.items()))
    if step % config.train.checkpoint_every == 0 or step == num_steps:
      checkpointing.save(ckpt, step, state)
      last_checkpoint = step
  ckpt.wait_until_finished()
  writer.close()

  if start_step < num_steps:
    say(f"Trained steps {start_step + 1}..{num_steps} in {time.perf_counter() - started:.1f} s.")
  if not any(k.startswith("test/") for k in final):  # Resumed a finished run: evaluate once more.
    final.update(evaluate(config, embed, test_source, "test",
                          figures_at(f"step_{num_steps:06d}")))
  columns = [k.split("/", 1)[1] for k in final if k.startswith("test/")]
  rows = {
      "raw pixels": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("baseline/")},
      f"{config.model.name} + {config.loss.name}":
          {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("test/")},
  }
  say(f"\nTest split {data.name}/{data.test_split} after {num_steps} steps:")
  say(reporting.format_table(rows, columns))
  return final
