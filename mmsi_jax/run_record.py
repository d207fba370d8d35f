"""A workdir belongs to one run: its config.json, written once when the run starts, is the run's record.

Running again with the same workdir resumes that run, so the config must be the one it was started with,
except for the keys in `RESUMABLE`, which change how far it goes, what it reports, or where it finds its
files, never what it computes up to the step it resumes at:

  train.num_steps, train.log_every, train.eval_every, train.checkpoint_every, train.keep_checkpoints
      how long it trains and how often it logs, evaluates and saves (a longer run also stretches a
      schedule that depends on train.num_steps, e.g. cosine decay, from the resumed step on)
  eval.*                           what each evaluation computes and draws
  data.data_dir, data.manual_dir, model.pretrained, init_from
      where the dataset, the archives and the starting weights are (only read before the first step)
  data.num_threads, data.num_workers, data.prefetch, data.eval_batch_size
      how batches are prepared (the batches themselves are a pure function of the seed and the step)
  distributed.*                    when a lost process or a hang stops the run

Any other difference stops the run before any work (`check_resumable`), naming each key with its value
in the run and on the command line. A key added to the config after a run was recorded reads, in that
run's record, as the value under which the run ran (`ADDED`).
"""

import fnmatch
import json
import os
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"
RESUMABLE = ("train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints", "eval.*", "data.data_dir", "data.manual_dir", "model.pretrained",
             "init_from", "data.num_threads", "data.num_workers", "data.prefetch",
             "data.eval_batch_size", "distributed.*", "references.*.class_block")
# Keys added to the config after runs were recorded, each with the value under which those runs ran: a
# record without one reads as having it.
ADDED = {"data.validation.folds": 0, "data.validation.fold": 0, "references.proxies.class_block": 0,
         "references.memvir.class_block": 0,
         "references.proxies.class_shards": 0, "references.memvir.class_shards": 0,
         "distributed.heartbeat_timeout_seconds": 100, "distributed.hang_timeout_seconds": 0}
_ABSENT = object()  # A key that one of two configs lacks.


class WorkdirInUseError(ValueError):
  """The workdir holds a run made with another config."""


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"a.b": value} of every leaf, as config.json stores it (tuples as lists)."""
  return _flatten(json.loads(config.to_json_best_effort()))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def recorded_config(workdir: str) -> dict[str, Any] | None:
  """The flat config the run in `workdir` was started with; None when it holds no run."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return {**ADDED, **_flatten(json.load(f))}


def differences(recorded: dict[str, Any], config: ml_collections.ConfigDict
                ) -> list[tuple[str, Any, Any]]:
  """(key, recorded value, value in `config`) of every key whose values differ, sorted by key."""
  current = flat_config(config)
  return [(key, recorded.get(key, _ABSENT), current.get(key, _ABSENT))
          for key in sorted(set(recorded) | set(current))
          if recorded.get(key, _ABSENT) != current.get(key, _ABSENT)]


def is_resumable(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE)


def describe(changes: list[tuple[str, Any, Any]]) -> str:
  """One line per change: "key: <value in the run> in the run, <value now> now"."""
  def show(value):
    return "absent" if value is _ABSENT else json.dumps(value)

  return "\n".join(f"  {key}: {show(old)} in the run, {show(new)} now" for key, old, new in changes)


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """Raises WorkdirInUseError if `workdir` holds a run whose config differs from `config` in a key
  that is not RESUMABLE; returns the resumable differences (none for a new workdir)."""
  recorded = recorded_config(workdir)
  if recorded is None:
    return []
  changes = differences(recorded, config)
  fixed = [change for change in changes if not is_resumable(change[0])]
  if fixed:
    raise WorkdirInUseError(
        f"{workdir} holds another run, made with a config ({os.path.join(workdir, CONFIG_FILE)}) that "
        f"differs from this one in:\n{describe(fixed)}\nPass another --workdir for a new run, or the "
        f"config the run was made with to resume it (on resume only {', '.join(RESUMABLE)} may "
        f"change).")
  return [change for change in changes if is_resumable(change[0])]


def record(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes <workdir>/config.json, once: when the run starts for the first time."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    return
  tmp_path = path + ".tmp"
  with open(tmp_path, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp_path, path)
