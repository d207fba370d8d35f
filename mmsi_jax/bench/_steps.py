"""Train steps of several configs, built as the trainer builds them (step.build), timed against each
other: the shared part of the step benchmarks (mmsi, xbm)."""

import functools
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from mmsi_jax import step
from mmsi_jax.bench import timing
from mmsi_jax.data.sampler import EXTRA


def random_batch(components: step.Components, image_size: int, classes: int, samples: int,
                 seed: int = 0) -> dict:
  """A PK batch of random uint8 images (classes x samples), with the extra batches the components ask
  for, shaped as the input pipeline's."""
  rng = np.random.default_rng(seed)

  def images(n):
    return rng.integers(0, 256, (n, image_size, image_size, 3), np.uint8)

  batch = {"images": images(classes * samples),
           "labels": np.repeat(np.arange(classes), samples).astype(np.int32)}
  for request in components.extra_batches:
    batch.setdefault(EXTRA, {})[request.name] = {
        "images": images(request.num_classes),
        "labels": np.arange(request.num_classes, dtype=np.int32)}
  return batch


def compare_steps(configs: dict[str, ml_collections.ConfigDict], *, image_size: int, classes: int,
                  samples: int, repeats: int, prefix: str,
                  prepare: Optional[Callable[[step.TrainState], step.TrainState]] = None) -> dict:
  """Per config: the compiled step's memory (arguments + outputs + temporaries, XLA's analysis), the
  same with the state donated as the training loop does (outputs that reuse an argument's buffer
  counted once), its median time (undonated: the same state is stepped again and again), and the time
  over the first config's, timed in turn round after round so that the machine's load affects all
  alike. `prepare` may change each initial state (e.g. fill a memory). Figures are keyed
  "<prefix>/<name>/<figure>"."""
  figures, calls = {}, {}
  for name, config in configs.items():
    components = step.build(config, num_classes=classes)
    batch = random_batch(components, image_size, classes, samples)
    state = step.create_train_state(jax.random.PRNGKey(0), components, batch["images"].shape[1:])
    if prepare is not None:
      state = prepare(state)
    compiled = step.make_train_step(components).lower(state, batch).compile()
    for figure, analysed in (
        ("memory_mb", compiled),
        ("memory_donated_mb", step.make_train_step(components, donate=True).lower(state, batch)
         .compile())):
      memory = analysed.memory_analysis()
      if memory is not None:
        figures[f"{prefix}/{name}/{figure}"] = (
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 2**20
    calls[name] = functools.partial(compiled, state, batch)
  times = timing.time_interleaved(calls, repeats=repeats)
  baseline = times[next(iter(configs))]
  for name, seconds in times.items():
    figures[f"{prefix}/{name}/step_ms"] = 1e3 * seconds
    figures[f"{prefix}/{name}/x_plain"] = seconds / baseline
  return figures
