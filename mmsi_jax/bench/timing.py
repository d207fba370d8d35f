"""Timing helpers shared by the benchmarks."""

import time
from typing import Any, Callable

import jax
import numpy as np


def time_call(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time in seconds of `fn()` (its outputs blocked on), after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def time_interleaved(calls: dict[str, Callable[[], Any]], *, repeats: int = 10,
                     warmup: int = 2) -> dict[str, float]:
  """Median wall time in seconds of each call, timed in turn round after round, so that a change in the
  machine's load affects every call alike."""
  for fn in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def device_description() -> str:
  device = jax.devices()[0]
  return f"{jax.device_count()} x {device.device_kind} ({device.platform})"
