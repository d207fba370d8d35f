"""Training: check the config, prepare the data, build the step, train, evaluate, resume.

The step itself (TrainState, the optimizer, the jitted train step) is in step.py, one evaluation in
eval/evaluator.py; this module is the loop around them (docs/ARCHITECTURE.md).
"""

import functools
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from mmsi_jax import (batch_policies, checkpointing, loss_memory, mining, models, parallel, pretrain,
                      references, reporting, run_record, stopping)
from mmsi_jax.config_check import check_config
from mmsi_jax.data import pipeline, sampler as sampler_lib, transforms
from mmsi_jax.eval.evaluator import Evaluator, embed_split, make_embed_fn
from mmsi_jax.models import MODEL_PARAMS
from mmsi_jax.step import build, create_train_state, make_train_step, state_sharding


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


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


def method_name(config: ml_collections.ConfigDict) -> str:
  """The row name of a run in the final table: model + loss (+ references, + miner)."""
  parts = [config.model.name, config.loss.name]
  if config.references.name not in references.DEFAULTS:
    parts.append(config.references.name)
  if config.miner.name != mining.NONE:
    parts.append(config.miner.name)
  return " + ".join(parts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_evaluation: Optional[Callable[[int, dict], None]] = None,
                       stop: Optional[stopping.StopSignals] = None) -> dict:
  """Trains, evaluating every `train.eval_every` steps and at the end; resumes from <workdir>.

  The test split is evaluated, or the validation classes with data.validation.folds
  (pipeline.load_splits). Returns the final evaluation metrics and the references of step 0
  (reporting.REFERENCE_ROWS), keyed as in metrics.jsonl. `on_evaluation(step, metrics)` is called
  after each evaluation of the loop (a tuning study's pruner, which may stop the run by raising). In a
  multi-process run every process trains and evaluates; process 0 alone prints and writes reports.

  With `stop` (the command line's SIGTERM and SIGINT), a signal stops the loop after the step in
  flight, whose checkpoint is saved: `stopping.Stopped` is raised once it is complete. A step's
  collectives or a checkpoint that make no progress for distributed.hang_timeout_seconds end the
  process (stopping.Watchdog).
  """
  check_config(config)
  resumable_changes = run_record.check_resumable(workdir, config)
  _ensure_writable(workdir)
  primary = parallel.is_primary()
  say = functools.partial(print, flush=True) if primary else lambda *args: None

  # Built first: a missing weights file (model.pretrained, init_from) stops the run before any data work;
  # the demo's pretrained models are built here if they are missing (pretrain.py).
  pretrain.ensure_inputs(config)
  model = models.get(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})
  initial_weights = checkpointing.read_weights(config.init_from) if config.init_from else None
  data = config.data
  if primary:
    pipeline.prepare(data.name, data.data_dir, data.manual_dir or None)
  parallel.sync("dataset prepared")
  if not primary:  # Finds process 0's build where the filesystem is shared; builds its own elsewhere.
    pipeline.prepare(data.name, data.data_dir, data.manual_dir or None)
  splits = pipeline.load_splits(data)
  train_source, train_labels = splits.train, splits.train_labels
  if data.label_noise > 0:  # The sampler and the batches see the shuffled labels.
    train_labels = pipeline.shuffled_labels(train_labels, data.label_noise, data.label_noise_seed)
    train_source = pipeline.RelabeledSource(train_source, train_labels)
  components = build(config, num_classes=int(train_labels.max()) + 1, model=model)
  policy = batch_policies.build(
      data, train_labels, seed=config.seed,
      held_out_fraction=sampler_lib.held_out_fraction(components.extra_batches),
      loss_fn=components.loss_fn, hparams=components.hparams)
  image_shape = transforms.test_transform(data)(train_source[0]["image"]).shape
  state = create_train_state(jax.random.PRNGKey(config.seed), components, image_shape)
  state = state.replace(batches=policy.init_state())

  num_steps = config.train.num_steps
  ckpt = checkpointing.manager(workdir, config.train.keep_checkpoints)
  mesh = parallel.data_mesh()
  # Replicated, but for the class shards of the proxies (and their optimizer state and queues).
  sharding = state_sharding(components, state, mesh)
  state = jax.device_put(state, sharding)
  if components.references.kind == "proxy":  # What the class vectors and the loss part will take.
    say(loss_memory.report(components.references, components.loss_fn, components.hparams, state.params,
                           state.references, policy.sampler(state.batches).batch_size, mesh))
  # Restored with the state's sharding, whatever the device count that wrote the checkpoint.
  state, restored_step = checkpointing.restore_latest(ckpt, state)
  if restored_step is None and initial_weights is not None:  # A resumed run keeps its own weights.
    state = jax.device_put(checkpointing.init_from(state, initial_weights, config.init_from), sharding)
    say(f"Starting from the model weights of {config.init_from} (not its optimizer state or step).")
  start_step = int(state.step)
  if primary and restored_step is None:  # The run starts: the workdir is its own from here on.
    run_record.record(workdir, config)
  writer = (reporting.MetricsWriter(workdir, resume_step=restored_step) if primary
            else reporting.NullWriter())
  timing = (reporting.JsonLines(os.path.join(workdir, reporting.TIMING_FILE), restored_step) if primary
            else reporting.NullWriter())
  evaluator = Evaluator(config, splits.evaluation, os.path.join(workdir, "eval") if primary else None,
                        method=method_name(config), write_image=writer.write_image, split=splits.name)
  # The state is donated: each step writes the new state into the old one's buffers. A checkpoint
  # copies the state to the host before `save` returns (orbax's default transfer), so a later step
  # cannot change what it writes.
  train_step = make_train_step(components, mesh, donate=True, sharding=sharding)
  embed_fn = make_embed_fn(model, data.normalization)

  def embed(images):  # The current parameters: `state` is rebound every step.
    return embed_fn(state.params[MODEL_PARAMS], state.batch_stats, images)

  if restored_step is None:  # The references of the table: raw pixels, and the initial features.
    baseline = evaluator.raw_pixel_baseline()
    if config.eval.initial_features:
      features_fn = make_embed_fn(model, data.normalization, features=True)
      baseline.update(evaluator.evaluate(
          lambda images: features_fn(state.params[MODEL_PARAMS], state.batch_stats, images),
          "initial", 0, figures_name="initial", method="initial features"))
      say("  initial features: " + "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in baseline.items()
                                            if k.startswith("initial/")))
    writer.write(0, baseline)
    writer.write_hparams(run_record.flat_config(config),
                         [f"test/{k.split('/', 1)[1]}" for k in baseline if k.startswith("baseline/")])
  else:
    baseline = {k: v for r in reporting.read_metrics(workdir) for k, v in r.items()
                if k.split("/", 1)[0] in reporting.REFERENCE_ROWS}
    say(f"Resuming at step {start_step} of {num_steps} from {ckpt.directory}.")
  if resumable_changes:
    say(f"Changed since the run started (allowed on resume):\n{run_record.describe(resumable_changes)}")
  final = dict(baseline)

  def embed_train_split():  # For a batch policy's refresh, with the current parameters.
    return embed_split(embed, train_source, data.eval_batch_size, evaluator.transform)

  def period_batches(completed_steps):
    """The batches up to the end of the batch policy's current period (prefetching stops there)."""
    return pipeline.train_batches(
        train_source, policy.sampler(state.batches), transform=transforms.train_transform(data),
        start_step=completed_steps, num_steps=policy.period_end(completed_steps, num_steps),
        seed=config.seed, extra_batches=components.extra_batches, num_threads=data.num_threads,
        num_workers=data.num_workers, prefetch=data.prefetch, host_index=jax.process_index(),
        host_count=jax.process_count())

  progress = reporting.Progress(num_steps, start_step)
  batches, period_end = None, start_step
  # The interval's metrics so far, when the run stopped between two log lines.
  pending: list[tuple[int, Any]] = stopping.read_interval(workdir, restored_step)
  last_checkpoint = restored_step
  watchdog = stopping.Watchdog(config.distributed.hang_timeout_seconds, functools.partial(
      stopping.end_hung_process, workdir=workdir,
      latest_step=lambda: checkpointing.latest_step(workdir)))

  def save_checkpoint(step, state):
    with watchdog.waiting_for(f"the checkpoint of step {step} on every process"):
      checkpointing.save(ckpt, step, state)
  started = time.perf_counter()
  interval_start, interval_time = start_step, started  # The steps since the last log line.
  try:
    for step in range(start_step + 1, num_steps + 1):
      if batches is None or step > period_end:  # A new period of the batch policy, refreshed if due.
        if policy.due(step - 1):
          state = jax.block_until_ready(state)  # The steps dispatched so far, out of the timing.
          refresh_started = time.perf_counter()
          policy_state, policy_metrics = policy.refresh(jax.device_get(state.batches), step - 1,
                                                        embed_train_split)
          state = state.replace(batches=jax.device_put(policy_state, parallel.replicated(mesh)))
          writer.write(step, policy_metrics)
          say(f"  batches refreshed for steps {step}..{policy.period_end(step - 1, num_steps)} in "
              f"{time.perf_counter() - refresh_started:.1f} s: "
              + "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in policy_metrics.items()))
        period_end = policy.period_end(step - 1, num_steps)
        batches = period_batches(step - 1)
      with watchdog.waiting_for(f"step {step} on every process (its collectives)",
                                watch=step > start_step + 1):  # The first call compiles.
        state, metrics = train_step(state, parallel.global_batch(next(batches), mesh))
      pending.append((step, metrics))
      stop_here = stop is not None and step < num_steps and stop.reached(step)
      boundary = step % config.train.log_every == 0 or step == num_steps
      if not (boundary or stop_here):
        continue
      with watchdog.waiting_for(f"steps {interval_start + 1}..{step} to finish on every process"):
        host = jax.device_get(pending)
      pending = []
      if not boundary:  # Stopped between log lines: the interval's metrics so far go with the checkpoint.
        if primary:
          stopping.write_interval(workdir, step, host)
        save_checkpoint(step, state)
        raise stop.stopped(step, ckpt.directory)
      timing.write(step, {"steps": step - interval_start, "seconds": time.perf_counter() - interval_time,
                          "compiling": interval_start == start_step})
      bad = _first_non_finite([(s, m["train/loss"]) for s, m in host])
      if bad is not None:
        raise NonFiniteLossError(
            f"The training loss became non-finite at step {bad}; training stopped. The last good "
            f"checkpoint is step {last_checkpoint} in {ckpt.directory} (nothing later was saved). "
            f"Lower optim.learning_rate or check the data, then run again to resume.")
      means = {k: float(np.mean([m[k] for _, m in host])) for k in host[0][1]}
      means["train/learning_rate"] = float(components.schedule(step - 1))  # The last step's base rate.
      writer.write(step, means)
      say(progress.line(step, {"loss": means["train/loss"]}))
      if step % config.train.eval_every == 0 or step == num_steps:
        evaluation = evaluator.evaluate(embed, splits.prefix, step)
        writer.write(step, evaluation)
        final = {**baseline, **evaluation}
        say("  eval: " + "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in evaluation.items()))
        if on_evaluation is not None:
          on_evaluation(step, evaluation)
      if step % config.train.checkpoint_every == 0 or step == num_steps or stop_here:
        save_checkpoint(step, state)
        last_checkpoint = step
      if stop_here:
        raise stop.stopped(step, ckpt.directory)
      interval_start, interval_time = step, time.perf_counter()
  except KeyboardInterrupt:  # A checkpoint being written in the background is completed first.
    say(f"\nInterrupted during step {step}; completing any checkpoint being written (Ctrl-C again "
        f"stops at once).")
    raise
  finally:  # Whatever stops the loop: the checkpoints under way are complete, the reports closed.
    with watchdog.waiting_for("the checkpoints being written on every process"):
      ckpt.wait_until_finished()
    watchdog.close()
    writer.close()
    timing.close()

  if start_step < num_steps:
    say(f"Trained steps {start_step + 1}..{num_steps} in {time.perf_counter() - started:.1f} s.")
  evaluated = f"{splits.prefix}/"
  if not any(k.startswith(evaluated) for k in final):  # Resumed a finished run: evaluate once more.
    final.update(evaluator.evaluate(embed, splits.prefix, num_steps))
  columns = [k.split("/", 1)[1] for k in final if k.startswith(evaluated)]
  rows = {label: {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith(f"{prefix}/")}
          for prefix, label in {**reporting.REFERENCE_ROWS, splits.prefix: method_name(config)}.items()}
  rows = {label: row for label, row in rows.items() if row}
  say(f"\n{splits.prefix.capitalize()} split {splits.name} after {num_steps} steps:")
  say(reporting.format_table(rows, columns))
  return final
