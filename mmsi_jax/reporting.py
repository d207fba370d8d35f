"""What a run shows and leaves behind: metrics.jsonl, TensorBoard events, progress lines, a final table."""

import json
import math
import os
import time
from typing import Optional

import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX import summary as tensorboard_summary

METRICS_FILE = "metrics.jsonl"
# Wall-clock time of the training steps between two log lines (evaluation and checkpointing left out):
# {"step": s, "steps": n, "seconds": t, "compiling": b}, b when the interval includes the step's
# compilation (the first one of each start). Kept apart from metrics.jsonl, which a resumed run
# reproduces exactly.
TIMING_FILE = "timing.jsonl"
# The evaluations of step 0 a run's table sets beside its own, by their metrics' prefix: raw pixels
# (always), and the features the run starts from (config.eval.initial_features).
REFERENCE_ROWS = {"baseline": "raw pixels", "initial": "initial features"}


def read_records(path: str) -> list[dict]:
  """Every record of a .jsonl file, in order ([] when there is none)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
  """Every record of <workdir>/metrics.jsonl, in order ([] when there is none)."""
  return read_records(os.path.join(workdir, METRICS_FILE))


def read_timing(workdir: str) -> list[dict]:
  """Every record of <workdir>/timing.jsonl, in order ([] when there is none)."""
  return read_records(os.path.join(workdir, TIMING_FILE))


class JsonLines:
  """Appends {"step": s, **values} lines to a .jsonl file.

  Resuming at `resume_step` drops the records of later steps (a killed run may have written them after
  its last checkpoint; the resumed run writes them again); None, a start from step 0, drops them all
  (a run killed before its first checkpoint starts again, step-0 records included).
  """

  def __init__(self, path: str, resume_step: Optional[int]):
    kept = [r for r in read_records(path) if resume_step is not None and r["step"] <= resume_step]
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp_path, path)
    self._file = open(path, "a")

  def write(self, step: int, values: dict) -> None:
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricsWriter:
  """Appends {"step": s, **metrics} lines to <workdir>/metrics.jsonl and scalars to TensorBoard events,
  and images and the run's hyperparameters to TensorBoard; resuming at `resume_step` (None: starting
  at step 0) drops the records of later steps from both (JsonLines)."""

  def __init__(self, workdir: str, resume_step: Optional[int]):
    self._file = JsonLines(os.path.join(workdir, METRICS_FILE), resume_step)
    self._tensorboard = SummaryWriter(workdir, purge_step=0 if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    self._file.write(step, metrics)
    for key, value in metrics.items():
      self._tensorboard.add_scalar(key, value, int(step))
    self._tensorboard.flush()

  def write_image(self, tag: str, image: np.ndarray, step: int) -> None:
    """An image [H, W, 3] uint8 under `tag` at `step` (TensorBoard's Images tab)."""
    self._tensorboard.add_image(tag, np.asarray(image), int(step), dataformats="HWC")
    self._tensorboard.flush()

  def write_hparams(self, hparams: dict, metric_tags: list[str]) -> None:
    """The run's settings {name: value} (TensorBoard's HParams tab), with the scalar tags that
    compare runs there (e.g. "test/recall@1")."""
    values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
              for k, v in hparams.items() if v is not None}
    for summary in tensorboard_summary.hparams(values, dict.fromkeys(metric_tags, 0.0)):
      self._tensorboard.file_writer.add_summary(summary)
    self._tensorboard.flush()

  def close(self) -> None:
    self._file.close()
    self._tensorboard.close()


class NullWriter:
  """The MetricsWriter of a process that does not report (every process of a multi-host run but 0)."""

  def write(self, step: int, metrics: dict) -> None:
    del step, metrics

  def write_image(self, tag: str, image: np.ndarray, step: int) -> None:
    del tag, image, step

  def write_hparams(self, hparams: dict, metric_tags: list[str]) -> None:
    del hparams, metric_tags

  def close(self) -> None:
    pass


def duration(seconds: float) -> str:
  """"1h05m" or "4m07s"; "?" when not finite."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
  """Progress lines with step rate and ETA; the rate leaves out the first step (compilation)."""

  def __init__(self, total_steps: int, start_step: int):
    self._total = total_steps
    self._start_time: Optional[float] = None
    self._start_step = start_step

  def line(self, step: int, metrics: dict) -> str:
    now = time.perf_counter()
    if self._start_time is None:  # First report: timing starts here.
      self._start_time, self._start_step = now, step
      rate = math.nan
    else:
      rate = (step - self._start_step) / max(now - self._start_time, 1e-9)
    eta = (self._total - step) / rate if rate > 0 else math.nan
    parts = [f"step {step:>{len(str(self._total))}}/{self._total}"]
    parts += [f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()]
    parts.append(f"{rate:.1f} steps/s" if rate == rate else "compiling")
    if eta == eta:
      parts.append(f"ETA {duration(eta)}")
    return "  ".join(parts)


def format_table(rows: dict[str, dict], columns: list[str]) -> str:
  """A plain-text table: one row per name, one column per metric key (missing cells left blank)."""
  header = ["", *columns]
  body = [[name, *(f"{row[c]:.4f}" if c in row else "" for c in columns)]
          for name, row in rows.items()]
  widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [header, *body]]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
