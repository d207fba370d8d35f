"""Checkpoints of the whole TrainState with orbax.

orbax writes each checkpoint into a temporary directory and renames it when it is complete, so a run
killed mid-save leaves at worst an unfinished temporary directory, which is ignored (and removed): the
latest finished checkpoint is the one restored.
"""

import logging
import os
from typing import Any, Optional

import orbax.checkpoint as ocp


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


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))
