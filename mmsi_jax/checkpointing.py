"""Checkpoints of the whole TrainState with orbax.

orbax writes each checkpoint into a temporary directory and renames it when it is complete, so a run
killed mid-save leaves at worst an unfinished temporary directory, which is ignored (and removed): the
latest finished checkpoint is the one restored.
"""

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmsi_jax.models import MODEL_PARAMS


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A manager of <workdir>/checkpoints keeping the `keep` most recent checkpoints."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True))


def restore_latest(mngr: ocp.CheckpointManager, target: Any) -> tuple[Any, Optional[int]]:
  """(state, step) of the latest finished checkpoint, or (target, None) when there is none.

  `target` is a state of the right structure (e.g. freshly initialised); its arrays give shapes and
  dtypes and are not read.
  """
  step = mngr.latest_step()
  if step is None:
    return target, None
  logging.info("Restoring checkpoint of step %d from %s.", step, mngr.directory)
  state = mngr.restore(step, args=ocp.args.StandardRestore(target))
  return state, step


def latest_step(workdir: str) -> Optional[int]:
  """The step of the latest finished checkpoint in <workdir>/checkpoints (None: there is none);
  creates nothing, logs nothing and waits for no other process (a supervisor or a watchdog asks)."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    return None
  latest = ocp.step.latest_step_metadata(directory, ocp.step.standard_name_format())
  return None if latest is None else latest.step


@contextlib.contextmanager
def interrupt_after():
  """Ctrl-C (SIGINT) inside the block takes effect as KeyboardInterrupt once the block has ended, so
  that it cannot cut a checkpoint's start short (orbax waits there for the previous save). Where
  SIGINT has another handler, or off the main thread, the block runs as it is."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  received = []
  signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if received:
    raise KeyboardInterrupt


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts writing the checkpoint of `step` (asynchronously; Ctrl-C meanwhile: `interrupt_after`)."""
  with interrupt_after():
    mngr.save(step, args=ocp.args.StandardSave(state))


def _checkpoint_location(path: str) -> tuple[str, Optional[int]]:
  """(checkpoints directory, step or None for the latest) of a workdir, its checkpoints/ directory or
  one checkpoint (checkpoints/<step>)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  name = os.path.basename(path.rstrip(os.sep))
  if name.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(name)
  return path, None


def read_weights(path: str) -> dict:
  """{"params": the model's parameters, "batch_stats": ...} of another run's finished checkpoint (its
  latest, unless `path` names one), as host arrays; nothing else of that run (optimizer, step, memories)
  is read into the new run.

  Raises FileNotFoundError when there is no finished checkpoint at `path`.
  """
  directory, step = _checkpoint_location(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"init_from={path!r}: no such directory; pass a run's workdir or one of "
                            f"its checkpoints (<workdir>/checkpoints/<step>).")
  mngr = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"init_from={path!r}: no finished checkpoint there (steps found: "
                            f"{mngr.all_steps()}).")
  metadata = mngr.item_metadata(step)
  if "params" not in metadata or MODEL_PARAMS not in metadata["params"]:
    raise ValueError(f"init_from={path!r}: checkpoint {step} holds no model parameters "
                     f"(params/{MODEL_PARAMS}); it is not a TrainState of this version.")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  state = mngr.restore(step, args=ocp.args.StandardRestore(target))
  logging.info("Read the model's weights of step %d from %s.", step, directory)
  return {"params": jax.device_get(state["params"][MODEL_PARAMS]),
          "batch_stats": jax.device_get(state.get("batch_stats", {}))}


def _shapes(tree) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def init_from(state, weights: dict, source: str):
  """`state` with its model parameters and batch statistics replaced by `weights` (read_weights),
  which must match them name for name and shape for shape; the optimizer state and the step stay."""
  for part, ours in (("params", state.params[MODEL_PARAMS]), ("batch_stats", state.batch_stats)):
    expected, found = _shapes(ours), _shapes(weights[part])
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k}: {found[k]} in the checkpoint, {expected[k]} here" for k in sorted(expected)
                 if k in found and found[k] != expected[k]]
    if missing or unexpected or misshaped:
      raise ValueError(f"init_from={source!r} does not fit this model's {part}: missing {missing[:10]}, "
                       f"unexpected {unexpected[:10]}, mis-shaped {misshaped[:10]}.")
  def cast(new, old):
    return np.asarray(new, dtype=old.dtype)

  return state.replace(
      params={**state.params, MODEL_PARAMS: jax.tree.map(cast, weights["params"],
                                                         state.params[MODEL_PARAMS])},
      batch_stats=jax.tree.map(cast, weights["batch_stats"], state.batch_stats))
