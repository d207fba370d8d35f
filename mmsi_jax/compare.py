"""Every variant of a config under one protocol, over seeds: one command, one table, two figures.

  python -m mmsi_jax.compare --config=configs/demo.py --seeds=0,1,2 --workdir=runs/compare
  python -m mmsi_jax.compare --config=configs/demo.py --variants=ms,mmsi_ms --seeds=0,1,2 \\
      --workdir=runs/compare --config.train.num_steps=2000

Each (variant, seed) is one `mmsi_jax.main` run in its own process, in <workdir>/<variant>/seed_<seed>
(its output in run.log there), with the `--config.*` overrides given here. A run whose metrics.jsonl
holds the final evaluation is finished and skipped; any other (interrupted, failed) resumes from its own
checkpoint. Without --variants, every variant the config module lists in `VARIANTS` (its default, the
unnamed "", is an alias of one of them). Runs go one at a time on the CPU; on GPUs, each run gets
--devices_per_run of them and as many runs go at once as the GPUs allow.

Writes <workdir>/results.md and results.csv (per variant: mean and sd over seeds of every final test
metric, the wall time per run and the step time against the plain loss's, failed runs with their
error) after each run, and recall_at_1.png (Recall@1 over training, mean and a +-sd band over seeds) and
final_recall_at_1.png (final Recall@1, +-sd error bars) at the end.

With --tuned=TUNE_WORKDIR (the --workdir of mmsi_jax.tune), each variant also runs with the settings its
study found best (TUNE_WORKDIR/<variant>/tuned_config.py), as the row "<variant> (tuned)", in
<workdir>/<variant>_tuned/seed_<seed>; a variant without a study runs its authors' settings alone, and
one whose study found its authors' settings best has them as its tuned runs too; each says so.
results.md then ends with a table of each variant's authors' and tuned settings side by side.

Where the config module names each method's baseline (`BASELINES`, {method: baseline}) and both are run,
results.md ends with whether each method helps: its gain over the baseline on test MAP@R with Welch's
95% interval over the seeds, and the verdict (help_verdict); with --tuned, tuned against tuned too.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags
import ml_collections
import numpy as np
from scipy import stats

from mmsi_jax import config_cli
from mmsi_jax import main as main_lib
from mmsi_jax import mining, references, reporting, run_record, search_space
from mmsi_jax.eval import figures

# --config (the file, without a variant, and its --config.a.b=value overrides for every run) and
# --workdir (of the runs, the table and the figures) are mmsi_jax.main's flags.
FLAGS = flags.FLAGS
_VARIANTS = flags.DEFINE_list("variants", [], "Variants to compare (default: every variant the config "
                              "module lists in VARIANTS).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each variant.")
_DEVICES_PER_RUN = flags.DEFINE_integer(
    "devices_per_run", 1, "On GPUs: devices each run trains on; runs at once = GPUs // this.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 0, "Runs at once; 0: one per group of --devices_per_run GPUs, else 1. On the CPU, runs "
    "at once share its cores.")
_RUN = flags.DEFINE_bool("run", True, "Run what is not finished; --norun: only write the table and "
                         "figures of the runs there are (also while another compare runs them).")
_TUNED = flags.DEFINE_string("tuned", "", "The workdir of mmsi_jax.tune: each variant also runs with "
                             "its tuned settings, <tuned>/<variant>/tuned_config.py, where it has them.")
_MARGIN = flags.DEFINE_float("verdict_margin", 0.005, "The smallest gain in test MAP@R over its baseline "
                             "that counts as helping: a method whose gain is shown to be below it (the "
                             "95% interval's upper end) does not help.")

POLL_SECONDS = 5.0  # How often the running runs are checked.
PROGRESS_SECONDS = 60.0  # Most seconds between two progress lines.
STATUS_FILE = "compare.json"  # In each run's workdir: wall seconds spent, attempts, the last error.
LOG_FILE = "run.log"  # In each run's workdir: the run's stdout and stderr, every attempt appended.
LOCK_FILE = "compare.lock"  # In the comparison's workdir while a compare runs there: its process id.
PRIMARY_METRIC = "recall@1"
VERDICT_METRIC = "map@r"  # The tuning objective (A Metric Learning Reality Check's main metric).
CONFIDENCE = 0.95
TUNED = " (tuned)"  # The row of a variant run with its tuned settings.


@dataclasses.dataclass
class Run:
  variant: str
  seed: int
  workdir: str
  config: ml_collections.ConfigDict  # As the run's process builds it: the variant, overrides, seed.
  config_spec: str = ""  # Its process's --config: FILE:VARIANT, or a variant's tuned config file.

  @property
  def num_steps(self) -> int:
    return self.config.train.num_steps

  def records(self) -> list[dict]:
    return reporting.read_metrics(self.workdir)

  def final_metrics(self) -> Optional[dict]:
    """The test metrics of the evaluation after the last step; None while the run is not finished."""
    for record in self.records():
      if record["step"] == self.num_steps and any(k.startswith("test/") for k in record):
        return {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("test/")}
    return None

  def steps_done(self) -> int:
    return max((r["step"] for r in self.records()), default=0)

  def status(self) -> dict:
    path = os.path.join(self.workdir, STATUS_FILE)
    if not os.path.exists(path):
      return {"wall_seconds": 0.0, "attempts": 0, "error": ""}
    with open(path) as f:
      return json.load(f)

  def record_attempt(self, seconds: float, error: str) -> None:
    status = self.status()
    status = {"wall_seconds": status["wall_seconds"] + seconds, "attempts": status["attempts"] + 1,
              "error": error}
    with open(os.path.join(self.workdir, STATUS_FILE), "w") as f:
      json.dump(status, f)

  def step_seconds(self) -> Optional[float]:
    """Seconds per training step, from the loop's timing.jsonl (intervals with compilation left out)."""
    intervals = [r for r in reporting.read_timing(self.workdir) if not r["compiling"]]
    steps = sum(r["steps"] for r in intervals)
    return sum(r["seconds"] for r in intervals) / steps if steps else None


def config_overrides(argv: list[str]) -> list[str]:
  """The --config.a.b=value arguments, passed on verbatim to every run."""
  try:
    _, overrides = config_cli.split_arguments(argv)
  except config_cli.ConfigError as e:
    raise app.UsageError(str(e)) from None
  if any(override.split("=", 1)[0] == "--config.seed" for override in overrides):
    raise app.UsageError("Choose seeds with --seeds=0,1,2, not --config.seed.")
  return overrides


def config_spec(config_path: str, variant: str) -> str:
  """The --config of a run of `variant` of the file `config_path` ("": the file's own config)."""
  return f"{config_path}:{variant}" if variant else config_path


def variant_config(config_path: str, variant: str, overrides: list[str],
                   seed: int) -> ml_collections.ConfigDict:
  """The config a run of `variant` ("": the file's own config) trains with, as its `mmsi_jax.main`
  process makes it: the variant's, the overrides applied by the same rules (config_cli), then the
  seed."""
  try:
    config, _ = config_cli.resolve(config_spec(config_path, variant), overrides)
  except config_cli.ConfigError as e:
    raise app.UsageError(f"{variant or config_path}: {e}") from None
  with config.unlocked():
    config.seed = seed
  return config


def made_otherwise(runs: list["Run"], also: tuple[str, ...] = ()) -> list[str]:
  """"<workdir>:" and its differing keys, for each run whose workdir holds a run made with another
  config than the run's (run_record.py): the keys that stop a resume, and those of `also`."""
  found = []
  for run in runs:
    recorded = run_record.recorded_config(run.workdir)
    if recorded is None:
      continue
    changes = [c for c in run_record.differences(recorded, run.config)
               if c[0] in also or not run_record.is_resumable(c[0])]
    if changes:
      found.append(f"{run.workdir}:\n{run_record.describe(changes)}")
  return found


def plain_counterpart(config: ml_collections.ConfigDict, configs: dict[str, ml_collections.ConfigDict]
                      ) -> Optional[str]:
  """The variant that trains `config`'s loss, with the same settings, plainly: no miner and the loss's
  own references (the batch itself for a pair loss, class proxies for a proxy loss); None if none of
  `configs` does."""
  for name, other in configs.items():
    if (other.loss.name == config.loss.name and other.loss.hparams == config.loss.hparams
        and other.miner.name == mining.NONE and other.references.name in references.DEFAULTS):
      return name
  return None


def local_devices() -> tuple[str, int]:
  """(platform, count) of the local devices, asked of a child process so that this one never holds an
  accelerator (on a GPU, JAX would reserve most of its memory)."""
  if os.environ.get("JAX_PLATFORMS") == "cpu":  # No accelerator to look for.
    return "cpu", 1
  probe = "import jax; print(jax.default_backend(), jax.local_device_count())"
  output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
  platform, count = output.stdout.split()[-2:]
  return platform, int(count)


def device_slots(platform: str, count: int, devices_per_run: int, parallel: int) -> list[dict]:
  """The environment of each slot a run can take: on GPUs, its own CUDA_VISIBLE_DEVICES."""
  if platform == "gpu":
    if devices_per_run < 1 or devices_per_run > count:
      raise app.UsageError(f"--devices_per_run must be in 1..{count} (the local GPUs).")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    groups = [ids[i:i + devices_per_run] for i in range(0, count - devices_per_run + 1, devices_per_run)]
    if parallel > len(groups):
      raise app.UsageError(f"--parallel={parallel}: {count} GPUs hold {len(groups)} runs of "
                           f"{devices_per_run} GPUs at once.")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(group)} for group in groups[:parallel or len(groups)]]
  return [{} for _ in range(max(parallel, 1))]


def _last_error(log_path: str) -> str:
  with open(log_path) as f:
    lines = [line.strip() for line in f if line.strip()]
  errors = [line for line in lines if line.startswith(("Error", "Traceback")) or "Error:" in line]
  return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def _mean_sd(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; NaN with one value)."""
  values = np.asarray(values, np.float64)
  if not len(values):
    return math.nan, math.nan
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _metric_means(results: list[dict]) -> dict:
  """{"<metric>_mean": ..., "<metric>_std": ...} over the runs' metrics `results` ([{metric: value}])."""
  cells = {}
  for name in dict.fromkeys(k for m in results for k in m):
    cells[f"{name}_mean"], cells[f"{name}_std"] = _mean_sd([m[name] for m in results if name in m])
  return cells


def reference_rows(runs: list[Run]) -> list[dict]:
  """The step-0 references of the finished runs (reporting.REFERENCE_ROWS), a row each: raw pixels, and
  the initial features of each model the runs start from (init_from, else model.pretrained)."""
  groups: dict[str, list[dict]] = {}
  for run in runs:
    if run.final_metrics() is None:
      continue
    start = next((r for r in run.records() if r["step"] == 0), {})
    for prefix, label in reporting.REFERENCE_ROWS.items():
      metrics = {k.split("/", 1)[1]: v for k, v in start.items() if k.startswith(f"{prefix}/")}
      if prefix == "initial":
        source = run.config.init_from or run.config.model.get("pretrained", "")
        label += f" ({os.path.basename(source.rstrip(os.sep)) if source else 'random init'})"
      if metrics:
        groups.setdefault(label, []).append(metrics)
  return [{"variant": label, "runs": len(results), "finished": len(results), "failed": 0,
           **_metric_means(results), "wall_seconds_mean": math.nan, "wall_seconds_std": math.nan,
           "step_ms_mean": math.nan, "step_ms_std": math.nan, "step_time_vs_plain": math.nan,
           "plain_variant": "", "errors": ""} for label, results in groups.items()]


def summarize(runs: list[Run], configs: dict[str, ml_collections.ConfigDict]) -> list[dict]:
  """One row per variant: counts, mean/sd of each final metric, wall and step time, errors; after the
  references of step 0 (reference_rows)."""
  rows = []
  step_ms = {}
  for variant in configs:
    own = [r for r in runs if r.variant == variant]
    finals = [(r, r.final_metrics()) for r in own]
    done = [(r, m) for r, m in finals if m is not None]
    failed = [r for r, m in finals if m is None and r.status()["error"]]
    row = {"variant": variant, "runs": len(own), "finished": len(done), "failed": len(failed),
           **_metric_means([m for _, m in done])}
    walls = [r.status()["wall_seconds"] for r, _ in done if r.status()["attempts"]]
    row["wall_seconds_mean"], row["wall_seconds_std"] = _mean_sd(walls)
    steps = [s for s in (r.step_seconds() for r, _ in done) if s is not None]
    row["step_ms_mean"], row["step_ms_std"] = _mean_sd([1000 * s for s in steps])
    step_ms[variant] = row["step_ms_mean"]
    row["plain_variant"] = plain_counterpart(configs[variant], configs) or ""
    row["errors"] = " | ".join(f"seed {r.seed}: {r.status()['error']}" for r in failed)
    rows.append(row)
  for row in rows:
    plain = step_ms.get(row["plain_variant"], math.nan)
    row["step_time_vs_plain"] = row["step_ms_mean"] / plain if row["plain_variant"] else math.nan
  return reference_rows(runs) + rows


def _columns(rows: list[dict]) -> tuple[list[str], list[str]]:
  timing = ("wall_seconds_mean", "step_ms_mean")
  metrics = list(dict.fromkeys(k.removesuffix("_mean") for row in rows for k in row
                               if k.endswith("_mean") and k not in timing))
  rest = ["runs", "finished", "failed", "wall_seconds_mean", "wall_seconds_std", "step_ms_mean",
          "step_ms_std", "step_time_vs_plain", "plain_variant", "errors"]
  return metrics, rest


def write_csv(rows: list[dict], path: str) -> None:
  metrics, rest = _columns(rows)
  header = ["variant", *(f"{m}_{s}" for m in metrics for s in ("mean", "std")), *rest]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, header, restval="")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def _cell(mean: float, sd: float, digits: int = 4) -> str:
  """"mean ± sd" ("" without a mean, the mean alone without an sd)."""
  if math.isnan(mean):
    return ""
  return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def write_markdown(rows: list[dict], path: str, title: str) -> None:
  metrics, _ = _columns(rows)
  header = ["variant", "seeds", *metrics, "wall (s)", "step (ms)", "step / plain"]
  lines = [f"# {title}", "",
           "Mean ± sample sd over the finished seeds. Wall: a run's process, start to end; step: the "
           "training step alone (timing.jsonl); step / plain: against the variant that trains the same "
           "loss with no miner and its own references (named in brackets).", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    plain = row["plain_variant"]
    ratio = "" if math.isnan(row["step_time_vs_plain"]) else f"{row['step_time_vs_plain']:.2f} ({plain})"
    seeds = f"{row['finished']}/{row['runs']}" + (f", {row['failed']} failed" if row["failed"] else "")
    lines.append("| " + " | ".join([
        row["variant"], seeds, *(_cell(row.get(f"{m}_mean", math.nan), row.get(f"{m}_std", math.nan))
                                 for m in metrics),
        _cell(row["wall_seconds_mean"], row["wall_seconds_std"], 0),
        _cell(row["step_ms_mean"], row["step_ms_std"], 1), ratio]) + " |")
  errors = [row for row in rows if row["errors"]]
  if errors:
    lines += ["", "Failed runs:", ""] + [f"- {row['variant']}: {row['errors']}" for row in errors]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def tuned_studies(tuned_dir: str, variants: list[str]) -> dict[str, Any]:
  """{variant: its tuned config (a module)} of the variants whose study in `tuned_dir` (mmsi_jax.tune's
  workdir) has finished a trial; says which variants have none, and which studies found the authors'
  settings best."""
  studies = {}
  for variant in variants:
    path = os.path.join(tuned_dir, variant, search_space.TUNED_CONFIG)
    if not os.path.exists(path):
      print(f"{variant}: no tuned settings ({path} is missing: no study there has finished a trial); "
            f"it runs its authors' settings alone.", flush=True)
      continue
    try:
      studies[variant] = config_cli.load_module(path)
    except config_cli.ConfigError as e:
      raise app.UsageError(str(e)) from None
    if studies[variant].AUTHORS:
      print(f"{variant}: its study found its authors' settings best; its authors' runs are its tuned "
            f"runs.", flush=True)
  return studies


def make_runs(config_path: str, variants: list[str], seeds: list[int], overrides: list[str],
              workdir: str, tuned: dict[str, Any]) -> tuple[dict[str, ml_collections.ConfigDict],
                                                          list[Run]]:
  """The config of each row of the table (seed 0's) and the runs of every row, seed by seed (an early
  stop still covers each row): each variant, and "<variant> (tuned)" with the settings of `tuned`
  (tuned_studies) where they are not its authors'."""
  sources = {v: (config_path, v, os.path.join(workdir, v)) for v in variants}
  sources.update({v + TUNED: (study.__file__, "", os.path.join(workdir, f"{v}_tuned"))
                  for v, study in tuned.items() if not study.AUTHORS})
  configs = {row: variant_config(path, variant, overrides, seeds[0])
             for row, (path, variant, _) in sources.items()}
  runs = [Run(row, seed, os.path.join(directory, f"seed_{seed}"),
              variant_config(path, variant, overrides, seed), config_spec(path, variant))
          for seed in seeds for row, (path, variant, directory) in sources.items()]
  return configs, runs


def tuned_table(rows: list[dict], variants: list[str], tuned: dict[str, Any], tuned_dir: str
                ) -> list[str]:
  """Markdown lines: each variant with its authors' settings and with its tuned ones (`tuned`, from
  `tuned_dir`: tuned_studies), side by side."""
  by_name = {row["variant"]: row for row in rows}
  metrics = ("map@r", PRIMARY_METRIC)

  def describe(settings: dict) -> str:
    return ", ".join(f"{path.rsplit('.', 1)[-1]} " + (f"{value.of_run:.2f} of the run" if isinstance(
        value, search_space.Share) else f"{value:.3g}") for path, value in settings.items())

  def number(value) -> str:
    return "" if value is None else f"{value:.4f}"

  lines = ["", "## Authors' settings and tuned", "",
           f"Tuned: the best trial of each variant's study (mmsi_jax.tune, {tuned_dir}). Validation "
           "MAP@R: the study's trial of the authors' settings and its best, each the mean over its "
           "validation folds; test: mean ± sample sd over the finished seeds.", "",
           "| variant | tuned settings | validation MAP@R, authors' | validation MAP@R, tuned | "
           + " | ".join(f"{m}, authors' | {m}, tuned" for m in metrics) + " |",
           "|" + "---|" * (4 + 2 * len(metrics))]
  for variant in variants:
    study = tuned.get(variant)
    authors = by_name[variant]
    if study is None:
      settings, validation, own = "none: no study", ("", ""), {}
    else:
      settings = ("the authors'" if study.AUTHORS else describe(study.SETTINGS)) + \
          f" (trial {study.TRIAL})"
      validation = number(study.AUTHORS_VALIDATION_MAP_AT_R), number(study.VALIDATION_MAP_AT_R)
      own = authors if study.AUTHORS else by_name[variant + TUNED]
    cells = [_cell(row.get(f"{m}_mean", math.nan), row.get(f"{m}_std", math.nan))
             for m in metrics for row in (authors, own)]
    lines.append("| " + " | ".join([variant, settings, *validation, *cells]) + " |")
  return lines


def help_verdict(method: list[float], baseline: list[float], margin: float
                 ) -> tuple[float, float, float, str]:
  """(gain, low, high, verdict) of a method's final test values over seeds against its baseline's: the
  difference of their means and its CONFIDENCE interval, Welch's (the two variants' seeds are
  independent, their spreads may differ). The method helps if the interval lies above 0, does not help
  if it lies below `margin` (the smallest gain that counts), and otherwise the seeds cannot tell."""
  gain = float(np.mean(method) - np.mean(baseline)) if method and baseline else math.nan
  if len(method) < 2 or len(baseline) < 2:
    return gain, math.nan, math.nan, "cannot tell: under 2 seeds"
  low, high = stats.ttest_ind(method, baseline, equal_var=False).confidence_interval(CONFIDENCE)
  if low > 0:
    return gain, low, high, "helps"
  if high < margin:
    return gain, low, high, "does not help" + (" (worse)" if high < 0 else "")
  return gain, low, high, "cannot tell"


def verdict_table(runs: list[Run], variants: list[str], baselines: dict[str, str],
                  tuned: Optional[dict[str, Any]], margin: float) -> list[str]:
  """Markdown lines: each method of `baselines` ({method: its baseline}) whose baseline is among
  `variants`, against it on test VERDICT_METRIC (help_verdict), with their authors' settings and, where
  `tuned` (tuned_studies) is given, with their tuned ones."""
  def values(row: str) -> list[float]:
    return [m[VERDICT_METRIC] for m in (r.final_metrics() for r in runs if r.variant == row)
            if m is not None]

  def tuned_row(variant: str) -> tuple[str, str]:
    study = tuned.get(variant)
    if study is None:
      return variant, "authors' (no study)"
    return (variant, "tuned: the authors'") if study.AUTHORS else (variant + TUNED, "tuned")

  pairs = [(m, b) for m, b in baselines.items() if m in variants and b in variants]
  if not pairs:
    return []
  settings = [lambda v: (v, "authors'")] + ([tuned_row] if tuned is not None else [])
  lines = ["", "## Does each method help?", "",
           f"Each method against its baseline on test {VERDICT_METRIC}: the gain in the mean over seeds "
           f"and its {CONFIDENCE:.0%} interval (Welch's). Helps: the interval lies above 0; does not "
           f"help: it lies below {margin:g}, the smallest gain that counts (--verdict_margin); else "
           "the seeds cannot tell.", "",
           f"| method | baseline | settings, method / baseline | method {VERDICT_METRIC} | baseline "
           f"{VERDICT_METRIC} | gain [{CONFIDENCE:.0%} interval] | verdict |", "|" + "---|" * 7]
  for method, baseline in pairs:
    for setting in settings:
      (method_row, method_label), (baseline_row, baseline_label) = setting(method), setting(baseline)
      method_values, baseline_values = values(method_row), values(baseline_row)
      gain, low, high, verdict = help_verdict(method_values, baseline_values, margin)
      interval = "" if math.isnan(low) else f" [{low:+.4f}, {high:+.4f}]"
      lines.append("| " + " | ".join([
          method, baseline, f"{method_label} / {baseline_label}",
          *(_cell(*_mean_sd(v)) for v in (method_values, baseline_values)),
          ("" if math.isnan(gain) else f"{gain:+.4f}") + interval, verdict]) + " |")
  return lines


def draw_figures(runs: list[Run], variants: list[str], workdir: str) -> list[str]:
  """<workdir>/recall_at_1.png: test Recall@1 over training steps per variant, mean and a +-sd band over
  seeds; final_recall_at_1.png: final Recall@1 per variant with +-sd error bars. Finished runs only."""
  key = f"test/{PRIMARY_METRIC}"
  curves, finals = {}, {}
  for variant in variants:
    series = [{r["step"]: r[key] for r in run.records() if key in r}
              for run in runs if run.variant == variant and run.final_metrics() is not None]
    series = [s for s in series if s]  # Without the metric (config.eval.ks without 1): not drawn.
    if not series:
      continue
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = np.array([[s[step] for step in steps] for s in series])
    sd = values.std(0, ddof=1) if len(series) > 1 else np.zeros(len(steps))
    curves[variant] = (steps, values.mean(0), sd)
    finals[variant] = _mean_sd([s[max(s)] for s in series])
  if not curves:
    return []
  paths = [os.path.join(workdir, "recall_at_1.png"), os.path.join(workdir, "final_recall_at_1.png")]
  figures.training_curves(curves, metric=PRIMARY_METRIC).savefig(paths[0])
  figures.final_bars(finals, metric=PRIMARY_METRIC).savefig(paths[1])
  return paths


def run_all(runs: list[Run], overrides: list[str], slots: list[dict], on_finish) -> None:
  """Runs every run in its own `mmsi_jax.main` process, len(slots) at once, printing overall progress
  (finished runs, steps done of all, and the ETA from the step rate so far); `on_finish()` after each."""
  pending = list(runs)
  free = list(range(len(slots)))
  running = {}  # slot -> (run, process, log file, start time)
  total_steps = sum(r.num_steps for r in runs)
  steps_at_start = sum(min(r.steps_done(), r.num_steps) for r in runs)
  started = time.perf_counter()
  last_report = 0.0
  ended_runs, failed = [], 0
  try:
    while pending or running:
      while pending and free:
        slot, run = free.pop(0), pending.pop(0)
        os.makedirs(run.workdir, exist_ok=True)
        log = open(os.path.join(run.workdir, LOG_FILE), "a")
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: attempt {run.status()['attempts'] + 1}\n")
        log.flush()
        command = [sys.executable, "-m", "mmsi_jax.main", f"--config={run.config_spec}",
                   f"--workdir={run.workdir}", f"--config.seed={run.seed}", *overrides]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **slots[slot], "PYTHONUNBUFFERED": "1"})
        running[slot] = (run, process, log, time.perf_counter())
        print(f"start {run.variant} seed {run.seed} -> {run.workdir}", flush=True)
      time.sleep(POLL_SECONDS)
      changed = False
      for slot, (run, process, log, start) in list(running.items()):
        if process.poll() is None:
          continue
        log.close()
        del running[slot]
        free.append(slot)
        finished = process.returncode == 0 and run.final_metrics() is not None
        error = "" if finished else f"exit code {process.returncode}: {_last_error(log.name)}"
        run.record_attempt(time.perf_counter() - start, error)
        ended_runs.append(run)
        failed += not finished
        changed = True
        print(f"{'done' if finished else 'FAILED'} {run.variant} seed {run.seed} in "
              f"{reporting.duration(time.perf_counter() - start)}" + (f": {error}" if error else ""),
              flush=True)
        on_finish()
      if changed or time.perf_counter() - last_report >= PROGRESS_SECONDS:
        steps = sum(r.num_steps if r in ended_runs else min(r.steps_done(), r.num_steps)
                    for r in runs)  # An ended run counts whole, failed or not.
        elapsed = time.perf_counter() - started
        rate = (steps - steps_at_start) / elapsed
        eta = (total_steps - steps) / rate if rate > 0 else math.inf
        print(f"[compare] runs {len(ended_runs)}/{len(runs)} ended ({failed} failed), "
              f"{len(running)} running | steps {steps}/{total_steps} | elapsed "
              f"{reporting.duration(elapsed)} | ETA {reporting.duration(eta)}", flush=True)
        last_report = time.perf_counter()
  finally:
    for run, process, log, start in running.values():  # Interrupted: they resume on the next call.
      process.terminate()
      process.wait()
      log.close()
      run.record_attempt(time.perf_counter() - start, error="")  # Its wall time counts; no failure.


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds <workdir>/compare.lock, so that two compares never start the same runs."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    with open(path) as f:
      pid = int(f.read().strip() or 0)
    try:
      os.kill(pid, 0)
      raise app.UsageError(f"A compare (process {pid}) is running in {workdir}; wait for it, or pass "
                           f"--norun to write the table of the runs so far.") from None
    except ProcessLookupError:  # Left by a compare that was killed.
      os.remove(path)
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  try:
    yield
  finally:
    os.remove(path)


def select_variants(config_path: str, requested: list[str]) -> tuple[Any, list[str]]:
  """The config module at `config_path` and the variants to run: `requested` (of its VARIANTS and
  EXTRA_VARIANTS), or every one the module lists in VARIANTS ("" is left out: a config's default is an
  alias of one of its named variants)."""
  if ":" in config_path:
    raise app.UsageError(f"--config={config_path}: pass the config file alone and choose variants with "
                         f"--variants.")
  try:
    module = config_cli.load_module(config_path)
  except config_cli.ConfigError as e:
    raise app.UsageError(str(e)) from None
  listed = [v for v in getattr(module, "VARIANTS", ()) if v]
  variants = requested or listed
  if not variants:
    raise app.UsageError(f"{config_path} lists no VARIANTS: name them with --variants.")
  known = listed + list(getattr(module, "EXTRA_VARIANTS", ()))
  unknown = [v for v in variants if listed and v not in known]
  if unknown:
    raise app.UsageError(f"{config_path} has no variants {unknown}; it has {known}.")
  return module, variants


def main(argv: list[str]) -> None:
  unexpected, _ = config_cli.split_arguments(argv[1:])
  if unexpected:
    raise app.UsageError(f"Unexpected arguments: {unexpected}")
  overrides = config_overrides(argv[1:])  # main_lib.parse_flags returns them after the others.
  config_path = FLAGS.config
  module, variants = select_variants(config_path, _VARIANTS.value)
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise app.UsageError(f"--seeds must be integers, e.g. 0,1,2; got {_SEEDS.value}.") from None
  workdir = FLAGS.workdir
  tuned = tuned_studies(_TUNED.value, variants) if _TUNED.value else {}
  configs, runs = make_runs(config_path, variants, seeds, overrides, workdir, tuned)
  # A run resumes with more steps; a table reads a run as finished at its own last step.
  otherwise = made_otherwise(runs, also=() if _RUN.value else ("train.num_steps",))
  if otherwise:
    message = (f"{len(otherwise)} of the runs in {workdir} were made with another config than this "
               f"command gives them (the values there, then here):\n" + "\n".join(otherwise[:5])
               + ("\n..." if len(otherwise) > 5 else "") + "\nPass the --config.* overrides they were "
               "made with, or another --workdir.")
    if _RUN.value:
      sys.exit(f"Error: {message}")
    print(f"Warning: {message} Until then they are not counted as finished.", flush=True)
  todo = [r for r in runs if r.final_metrics() is None]
  platform, count = local_devices()
  slots = device_slots(platform, count, _DEVICES_PER_RUN.value, _PARALLEL.value)
  also_tuned = f" ({len(configs) - len(variants)} also tuned)" if tuned else ""
  print(f"{len(variants)} variants{also_tuned} x {len(seeds)} seeds: {len(runs) - len(todo)} runs "
        f"finished, {len(todo)} to run, {len(slots)} at once ({count} {platform} device(s)).",
        flush=True)
  os.makedirs(workdir, exist_ok=True)
  title = f"{config_path}: {len(variants)} variants x seeds {','.join(map(str, seeds))}"
  started = time.perf_counter()

  def write_tables():
    rows = summarize(runs, configs)
    write_csv(rows, os.path.join(workdir, "results.csv"))
    write_markdown(rows, os.path.join(workdir, "results.md"), title)
    lines = tuned_table(rows, variants, tuned, _TUNED.value) if _TUNED.value else []
    lines += verdict_table(runs, variants, getattr(module, "BASELINES", {}),
                           tuned if _TUNED.value else None, _MARGIN.value)
    if lines:
      with open(os.path.join(workdir, "results.md"), "a") as f:
        f.write("\n".join(lines) + "\n")

  if _RUN.value:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("Stopped: the runs resume on the next call."))
    with workdir_lock(workdir):
      run_all(todo, overrides, slots, write_tables)
  write_tables()
  drawn = draw_figures(runs, list(configs), workdir)
  with open(os.path.join(workdir, "results.md")) as f:
    print("\n" + f.read(), flush=True)
  print(f"Wrote {', '.join(os.path.join(workdir, n) for n in ('results.md', 'results.csv'))}"
        + "".join(f", {p}" for p in drawn) + f" in {reporting.duration(time.perf_counter() - started)}.",
        flush=True)
  failed = [r for r in runs if r.final_metrics() is None]
  if failed and _RUN.value:
    sys.exit(f"{len(failed)} of {len(runs)} runs did not finish: see results.md and their run.log.")


if __name__ == "__main__":
  app.run(main, flags_parser=main_lib.parse_flags)
