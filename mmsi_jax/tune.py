"""Per-method tuning on validation classes, the test classes untouched: an optuna study per variant.

  python -m mmsi_jax.tune --config=configs/demo.py:mmsi_ms --trials=16 --workdir=runs/tune
  python -m mmsi_jax.tune --config=configs/finetune.py:xbm_ms --trials=16 --workdir=runs/tune \\
      --folds=1 --config.train.num_steps=200

The protocol of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020; docs/METHODS.md,
"Tuning"). Each trial draws the variant's settings from its search space (the spaces its components
declare, search_space.py, and the optimizer's learning rate), trains on the training classes outside a
fold and evaluates the fold's classes (config data.validation: the test split is never read), for each
of --folds class-disjoint folds of the training classes (the Reality Check's 4; 1: one half-and-half
split), and scores the mean over the folds of the final validation MAP@R. Optuna's TPE sampler draws the
settings, the first trial being the config's own (its authors'); the pruner (--pruner, default the
median rule) reads every periodic validation MAP@R of the trainer and stops a trial below the median of
the earlier trials at the same step.

The study is stored in <workdir>/<VARIANT>/study.db (SQLite), so one workdir holds the studies of many
variants. The same command continues it up to --trials trials in all: finished, pruned and failed trials
count; a trial cut short by a kill is marked "interrupted" when the study next opens and does not. A
study made with another config, other overrides or other folds is refused. A trial that fails (an
error, a non-finite loss) is recorded as failed with its error, and the study goes on. --parallel=P runs
P trials at once, each worker a process of its own (on a GPU they share its memory).

<workdir>/<VARIANT>/ receives, after every trial, trials.csv and trials.md (each trial's state, mean and
per-fold validation MAP@R, settings, time and error or pruning step) and tuned_config.py (the best
trial's settings as a config file: `python -m mmsi_jax.main --config=<workdir>/<VARIANT>/tuned_config.py
--workdir=...`; `python -m mmsi_jax.compare --tuned=<workdir>` runs it on the test classes); at the end
optuna's figures, optimization_history.png and param_importances.png (from two finished trials on).
Each trial's runs are in trial_<number>/fold_<k>/: the trainer's outputs, its printed lines in train.log,
its checkpoints removed (a trial is never resumed).

A variant that starts from a model trained on the same dataset's training classes (configs/finetune.py's
mmsi_ms: `init_from` the `ms` model, mmsi_jax/pretrain.py) would start each fold from a model that has
seen its validation classes. Each fold starts instead from the same recipe trained on the fold's
training classes alone, built once per study in validation_<folds>_<fold>/ (pretrain.for_validation).
"""

import contextlib
import copy
import csv
import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional
import warnings

from absl import app
from absl import flags
from absl import logging
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as optuna_figures

from mmsi_jax import config_check, config_cli, pretrain, reporting, search_space, step, train
from mmsi_jax import main as main_lib

# --config (FILE:VARIANT, and its --config.a.b=value overrides for every trial) and --workdir (of every
# variant's study) are mmsi_jax.main's flags.
FLAGS = flags.FLAGS
_TRIALS = flags.DEFINE_integer("trials", None, "Trials of the study in all, those of earlier runs of "
                               "the command included.", lower_bound=1)
_FOLDS = flags.DEFINE_integer("folds", 4, "Class-disjoint folds of the training classes each trial "
                              "trains and validates on (the Reality Check's 4); 1: one half-and-half "
                              "split.", lower_bound=1)
# compare has a --parallel of its own (runs at once); the two commands never share a process, but a test
# process imports both.
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials at once, each in a worker process.",
                                 lower_bound=1, allow_override=True)
_PRUNER = flags.DEFINE_enum("pruner", "median", ["median", "halving", "none"],
                            "Stops hopeless trials at a periodic evaluation: optuna's median rule, "
                            "successive halving, or none.")
_WORKER_TRIALS = flags.DEFINE_integer(
    "worker_trials", 0, "Internal (set by --parallel): run this many trials of the study that another "
    "tune process holds, then exit.", lower_bound=0)
flags.mark_flag_as_required("trials")

OBJECTIVE = "validation/map@r"  # The trainer's metric a trial maximises (its mean over the folds).
STUDY_FILE = "study.db"
LOCK_FILE = "tune.lock"
LOG_FILE = "train.log"  # In each fold's run directory: the trainer's printed lines.
POLL_SECONDS = 5.0  # How often the parent of workers looks for finished trials.
PRUNERS = {"median": optuna.pruners.MedianPruner, "halving": optuna.pruners.SuccessiveHalvingPruner,
           "none": optuna.pruners.NopPruner}
# Trial user attributes: the authors' settings (the first trial), an error, a pruning, the wall time.
AUTHORS, ERROR, PRUNED, SECONDS = "authors", "error", "pruned", "seconds"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What a study is about: every trial of it trains the same config, overrides and folds."""
  config: str  # FILE:VARIANT.
  overrides: tuple[str, ...]  # The --config.a.b=value overrides.
  folds: int  # --folds.

  @property
  def variant(self) -> str:
    return self.config.partition(":")[2]

  def splits(self) -> list[tuple[int, int]]:
    """(data.validation.folds, data.validation.fold) of each run of a trial."""
    if self.folds == 1:
      return [(2, 0)]  # One half-and-half split.
    return [(self.folds, fold) for fold in range(self.folds)]


def variant_space(config: ml_collections.ConfigDict
                  ) -> tuple[dict[str, search_space.Param], dict[str, Any]]:
  """The search space of the variant `config`, {config path: range}: the spaces of the components it
  selects (config_cli.COMPONENTS: loss, model, references, miner, batch policy) and the optimizer's
  (step.OPTIMIZER_SPACE); and the authors' value of each setting: the config's, or, where the config
  leaves a setting to its component, the factory's default."""
  space = dict(step.OPTIMIZER_SPACE)
  authors = {path: search_space.lookup(config, path) for path in space}
  for kind in config_cli.COMPONENTS:
    name = search_space.lookup(config, kind.name_key)
    registry = kind.registry_of(name)
    if registry is None:  # miner "none".
      continue
    declared = search_space.declared(registry.get(name))
    if declared is None:
      raise ValueError(f"The {registry.kind} {name!r} declares no search space: decorate its factory "
                       f"with search_space.tunable (search_space.py).")
    defaults = registry.setting_defaults(name, kind.context)
    for setting, param in declared.items():
      path = f"{kind.settings_of(name)}.{setting}"
      space[path] = param
      try:
        authors[path] = search_space.lookup(config, path)
      except KeyError:
        authors[path] = defaults[setting]
  return space, authors


def authors_params(space: dict[str, search_space.Param], authors: dict[str, Any],
                   config: ml_collections.ConfigDict, protocol: Protocol) -> dict[str, Any]:
  """The study's record of the authors' settings (variant_space): a step count as its share of the run
  of the variant's own config, which the overrides may shorten (XBM's start at step 400 of 800 is half
  the run), unless the overrides set it; every other setting as `config` has it."""
  source = config_cli.load_config(protocol.config)
  overridden = {o.split("=", 1)[0].removeprefix("--config.") for o in protocol.overrides}
  return {path: space[path].recorded(value, config if path in overridden else source)
          for path, value in authors.items()}


def fold_config(config: ml_collections.ConfigDict, settings: dict, folds: int,
                fold: int) -> ml_collections.ConfigDict:
  """A copy of `config` with a trial's settings, validating on fold `fold` of `folds`."""
  config = copy.deepcopy(config)
  search_space.apply(config, {**settings, "data.validation.folds": folds,
                              "data.validation.fold": fold})
  return config


def train_fold(config: ml_collections.ConfigDict, run_dir: str,
               on_evaluation: Callable[[int, dict], None]) -> dict:
  """One run of a trial in `run_dir`, its printed lines in run_dir/train.log (an error's traceback
  too); its checkpoints are removed afterwards, whatever the outcome."""
  os.makedirs(run_dir, exist_ok=True)
  try:
    with open(os.path.join(run_dir, LOG_FILE), "a") as log, contextlib.redirect_stdout(log):
      try:
        return train.train_and_evaluate(config, run_dir, on_evaluation)
      except optuna.TrialPruned as e:
        print(f"Pruned: {e}")
        raise
      except Exception:
        traceback.print_exc(file=log)
        raise
  finally:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)


def objective(trial: optuna.Trial, config: ml_collections.ConfigDict,
              space: dict[str, search_space.Param], protocol: Protocol, directory: str) -> float:
  """The mean over the protocol's folds of the final validation MAP@R of `config` with the settings
  the trial draws; every periodic evaluation is reported to the trial, whose pruner may stop it."""
  settings = {path: param.setting(param.suggest(trial, path, config)) for path, param in space.items()}
  trial_dir = os.path.join(directory, f"trial_{trial.number:04d}")
  shutil.rmtree(trial_dir, ignore_errors=True)  # Left by a study of the same name that was deleted.
  values = []
  for index, (folds, fold) in enumerate(protocol.splits()):
    run_config = fold_config(config, settings, folds, fold)
    run_config.init_from = pretrain.for_validation(run_config.init_from, run_config, directory)
    offset = index * run_config.train.num_steps  # The folds' steps follow one another in the reports.

    def report(step: int, metrics: dict) -> None:
      trial.report(metrics[OBJECTIVE], offset + step)
      if trial.should_prune():
        raise optuna.TrialPruned(f"fold {fold} at step {step}, validation MAP@R "
                                 f"{metrics[OBJECTIVE]:.4f}")

    final = train_fold(run_config, os.path.join(trial_dir, f"fold_{fold}"), report)
    values.append(final[OBJECTIVE])
    trial.set_user_attr(f"fold_{fold}", final[OBJECTIVE])
  return float(np.mean(values))


def run_trials(study: optuna.Study, count: int, config: ml_collections.ConfigDict,
               space: dict[str, search_space.Param], protocol: Protocol, directory: str,
               on_end: Callable[[FrozenTrial], None]) -> None:
  """Runs `count` trials of `study` one after the other in this process; `on_end(trial)` after each. A
  trial that raises is recorded as failed with its error; a pruned one as pruned."""
  for _ in range(count):
    trial = study.ask()
    started = time.perf_counter()
    value, state = None, TrialState.COMPLETE
    try:
      value = objective(trial, config, space, protocol, directory)
    except optuna.TrialPruned as e:
      state = TrialState.PRUNED
      trial.set_user_attr(PRUNED, str(e))
    except Exception as e:  # pylint: disable=broad-except  # A failing trial: the study goes on.
      state = TrialState.FAIL
      trial.set_user_attr(ERROR, f"{type(e).__name__}: {e}"[:500])
    trial.set_user_attr(SECONDS, time.perf_counter() - started)
    on_end(study.tell(trial, value, state=state))


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
  """The trials that count towards --trials: finished, pruned, failed; not interrupted ones."""
  return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
          or (t.state == TrialState.FAIL and ERROR in t.user_attrs)]


def best_trial(trials: list[FrozenTrial]) -> Optional[FrozenTrial]:
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  return max(complete, key=lambda t: t.value) if complete else None


def state_name(trial: FrozenTrial) -> str:
  """COMPLETE, PRUNED, FAIL, RUNNING, or "INTERRUPTED": a trial cut short by a kill."""
  if trial.state == TrialState.FAIL and ERROR not in trial.user_attrs:
    return "INTERRUPTED"
  return trial.state.name


class StudyProgress:
  """A line per finished trial: its state and value, the best so far, and the study's ETA from the
  wall time per trial since this command started."""

  def __init__(self, variant: str, total: int, done: int):
    self._variant, self._total, self._done = variant, total, done
    self._finished_here = 0
    self._started = time.perf_counter()

  def line(self, trial: FrozenTrial, trials: list[FrozenTrial]) -> str:
    self._done += 1
    self._finished_here += 1
    elapsed = time.perf_counter() - self._started
    eta = (self._total - self._done) * elapsed / self._finished_here
    if trial.state == TrialState.COMPLETE:
      outcome = f"validation MAP@R {trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
      outcome = f"pruned ({trial.user_attrs.get(PRUNED, '')})"
    else:
      outcome = f"FAILED: {trial.user_attrs.get(ERROR, '')}"
    best = best_trial(trials)
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "best: none yet"
    return (f"[tune {self._variant}] trial {trial.number} {outcome} in "
            f"{reporting.duration(trial.user_attrs.get(SECONDS, math.nan))} | {best_text} | "
            f"{self._done}/{self._total} trials | ETA {reporting.duration(eta)}")


def open_study(directory: str, variant: str, protocol: Protocol, pruner: str, trials: int,
               sampler_seed: Optional[int] = None) -> optuna.Study:
  """The study of <directory>/study.db (created if missing) with its TPE sampler and `pruner`;
  app.UsageError if it was made with another protocol. The sampler starts with a quarter of the
  `trials` drawn at random (TPE's start) and is seeded with `sampler_seed`, by default the number of
  trials the study holds (a resumed study draws new points)."""
  storage = f"sqlite:///{os.path.abspath(os.path.join(directory, STUDY_FILE))}"
  study = optuna.create_study(storage=storage, study_name=variant, direction="maximize",
                              load_if_exists=True, pruner=PRUNERS[pruner]())
  recorded = study.user_attrs.get("protocol")
  wanted = dataclasses.asdict(protocol)
  if recorded is None:
    study.set_user_attr("protocol", wanted)
  elif json.loads(json.dumps(wanted)) != recorded:
    raise app.UsageError(
        f"{directory} holds a study of another protocol: {recorded}; this command gives {wanted}. Give "
        f"the same --config, overrides and --folds to continue it, or another --workdir.")
  study.sampler = optuna.samplers.TPESampler(
      seed=len(study.trials) if sampler_seed is None else sampler_seed,
      n_startup_trials=max(2, trials // 4))
  return study


@contextlib.contextmanager
def study_lock(directory: str):
  """Holds <directory>/tune.lock, an OS lock released however the process ends, so that two tune
  commands never run the same study."""
  with open(os.path.join(directory, LOCK_FILE), "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise app.UsageError(f"Another mmsi_jax.tune is running the study in {directory}; wait for it "
                           f"to end.") from None
    yield


def write_trials(trials: list[FrozenTrial], space: dict[str, search_space.Param],
                 directory: str) -> None:
  """<directory>/trials.csv and trials.md: one row per trial."""
  folds = sorted({k for t in trials for k in t.user_attrs if k.startswith("fold_")})
  rows = []
  for t in trials:
    notes = ["authors' settings" if t.user_attrs.get(AUTHORS) else "", t.user_attrs.get(ERROR, ""),
             t.user_attrs.get(PRUNED, "")]
    rows.append({"trial": t.number, "state": state_name(t),
                 "map@r": t.value if t.state == TrialState.COMPLETE else "",
                 **{fold: t.user_attrs.get(fold, "") for fold in folds},
                 **{path: t.params.get(path, "") for path in space},
                 "seconds": round(t.user_attrs[SECONDS]) if SECONDS in t.user_attrs else "",
                 "note": "; ".join(n for n in notes if n)})
  header = ["trial", "state", "map@r", *folds, *space, "seconds", "note"]
  with open(os.path.join(directory, "trials.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, header)
    writer.writeheader()
    writer.writerows(rows)

  def cell(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)

  shares = {p for p, param in space.items() if isinstance(param, search_space.ShareOfRun)}
  titles = [f"{h} (share of {search_space.RUN_LENGTH})" if h in shares else h for h in header]
  lines = [f"# {os.path.basename(directory)}: {len(trials)} trials", "",
           "Validation MAP@R: the mean over the folds (map@r) and each fold's.", "",
           "| " + " | ".join(titles) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(row[h]) for h in header) + " |" for row in rows]
  with open(os.path.join(directory, "trials.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def write_tuned_config(trials: list[FrozenTrial], space: dict[str, search_space.Param],
                       protocol: Protocol, directory: str) -> Optional[str]:
  """<directory>/tuned_config.py, the config of `protocol` with the best trial's settings, once a trial
  has finished; its path (None before)."""
  best = best_trial(trials)
  if best is None:
    return None
  authors = next((t for t in trials if t.user_attrs.get(AUTHORS) and t.state == TrialState.COMPLETE),
                 None)
  settings = {path: space[path].setting(value) for path, value in best.params.items() if path in space}
  path = os.path.join(directory, search_space.TUNED_CONFIG)
  settings_text = "".join(f"\n    {k!r}: {v!r}," for k, v in settings.items())
  overrides_text = "".join(f"\n  {o}" for o in protocol.overrides) or " none"
  folds_text = ("on its half-and-half split" if protocol.folds == 1 else
                f"the mean over its {protocol.folds} folds")
  with open(path, "w") as f:
    f.write(f'''"""{protocol.config} with the settings of trial {best.number} of the study in this
directory (mmsi_jax.tune): validation MAP@R {best.value:.4f}, {folds_text}.
The trials ran with these overrides, which this config does not apply:{overrides_text}

  python -m mmsi_jax.main --config={path} --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = {protocol.config!r}
SETTINGS = {{{settings_text}
}}
TRIAL = {best.number}
VALIDATION_MAP_AT_R = {best.value!r}
AUTHORS = {bool(best.user_attrs.get(AUTHORS))}  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = {authors.value if authors else None!r}


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{{__file__}} has no variants, got {{variant!r}}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
''')
  return path


def draw_figures(study: optuna.Study, directory: str) -> list[str]:
  """optuna's optimisation history and, from two finished trials on, parameter importances."""
  finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
  if not finished:
    return []
  drawers = {"optimization_history.png": lambda: optuna_figures.plot_optimization_history(
      study, target_name="validation MAP@R")}
  if finished >= 2:
    drawers["param_importances.png"] = lambda: optuna_figures.plot_param_importances(study)
  paths = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    for name, draw in drawers.items():
      axes = draw()
      paths.append(os.path.join(directory, name))
      axes.figure.savefig(paths[-1], bbox_inches="tight")
      plt.close(axes.figure)
  return paths


def write_outputs(study: optuna.Study, space: dict[str, search_space.Param], protocol: Protocol,
                  directory: str) -> list[str]:
  """The trials table and, once a trial has finished, the tuned config; the paths written."""
  trials = study.get_trials(deepcopy=False)
  write_trials(trials, space, directory)
  tuned = write_tuned_config(trials, space, protocol, directory)
  return [os.path.join(directory, name) for name in ("trials.csv", "trials.md")] + ([tuned] if tuned
                                                                                    else [])


def run_workers(argv: tuple[str, ...], study: optuna.Study, remaining: int, parallel: int, directory: str,
                on_end: Callable[[FrozenTrial], None]) -> None:
  """Runs `remaining` trials in `parallel` worker processes (this command, its arguments `argv`, with
  --worker_trials; the output of worker i in <directory>/worker_<i>.log), calling `on_end(trial)` for
  each trial they finish."""
  quotas = [remaining // parallel + (i < remaining % parallel) for i in range(min(parallel, remaining))]
  seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
  workers = []
  for i, quota in enumerate(quotas):
    log = open(os.path.join(directory, f"worker_{i}.log"), "a")
    command = [sys.executable, "-m", "mmsi_jax.tune", *argv, f"--worker_trials={quota}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / len(quotas):.2f}"}  # One GPU's memory shared.
    workers.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
  try:
    running = True
    while running:
      time.sleep(POLL_SECONDS)
      running = any(process.poll() is None for process, _ in workers)
      for trial in study.get_trials(deepcopy=False):
        if trial.state.is_finished() and trial.number not in seen:
          seen.add(trial.number)
          on_end(trial)
  finally:
    for process, log in workers:  # Interrupted: their trials are marked so on the next start.
      if process.poll() is None:
        process.terminate()
        process.wait()
      log.close()
  for i, (process, _) in enumerate(workers):
    if process.returncode:
      print(f"Worker {i} exited with status {process.returncode}: see "
            f"{os.path.join(directory, f'worker_{i}.log')}.", flush=True)


def run_study(config: ml_collections.ConfigDict, protocol: Protocol, workdir: str, trials: int,
              pruner: str = "median", parallel: int = 1, argv: tuple[str, ...] = ()) -> optuna.Study:
  """The work of the command, under the study's lock: continues (or starts, with the authors' settings
  as its first trial) the study of `protocol`'s variant in <workdir>/<variant>/ up to `trials` trials in
  all, the trials a kill cut short marked "interrupted"; runs them here, or in `parallel` workers
  (`argv`: the command's arguments, run again with --worker_trials); writes the outputs; returns the
  study."""
  space, authors = variant_space(config)
  variant = protocol.variant
  directory = os.path.join(workdir, variant)
  os.makedirs(directory, exist_ok=True)
  with study_lock(directory):
    study = open_study(directory, variant, protocol, pruner, trials)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
      study.tell(trial.number, state=TrialState.FAIL)  # Cut short by a kill: no worker runs now.
    if not study.trials:
      study.enqueue_trial(authors_params(space, authors, config, protocol), user_attrs={AUTHORS: True})
    done = len(counted(study.get_trials(deepcopy=False)))
    remaining = max(trials - done, 0)
    print(f"Study {variant} in {directory}: {done} of {trials} trials done, {remaining} to run "
          f"({parallel} at once); {len(protocol.splits())} run(s) per trial; the space: "
          + ", ".join(space), flush=True)
    if pretrain.trained_on_run_dataset(config.init_from, config):
      print(f"init_from={config.init_from} was trained on every training class: each fold starts "
            f"from the same recipe trained on the fold's training classes alone, built once in "
            f"{directory}/validation_<folds>_<fold>/.", flush=True)
    elif config.init_from:
      print(f"Warning: init_from={config.init_from} starts every trial: if it was trained on the "
            f"validation classes, the validation scores are optimistic.", flush=True)
    progress = StudyProgress(variant, trials, done)

    def on_end(trial: FrozenTrial) -> None:
      print(progress.line(trial, study.get_trials(deepcopy=False)), flush=True)
      write_outputs(study, space, protocol, directory)

    if remaining and parallel == 1:
      run_trials(study, remaining, config, space, protocol, directory, on_end)
    elif remaining:
      run_workers(argv, study, remaining, parallel, directory, on_end)
    written = write_outputs(study, space, protocol, directory) + draw_figures(study, directory)
  best = best_trial(study.get_trials(deepcopy=False))
  print(f"[tune {variant}] best: " + (f"trial {best.number}, validation MAP@R {best.value:.4f}, "
                                      f"{best.params}" if best else "no finished trial yet")
        + f". Wrote {', '.join(written)}.", flush=True)
  return study


def main(argv: list[str]) -> None:
  unexpected, overrides = config_cli.split_arguments(argv[1:])
  if unexpected:
    raise app.UsageError(f"Unexpected arguments: {unexpected}")
  protocol = Protocol(FLAGS.config, tuple(overrides), _FOLDS.value)
  if not protocol.variant:
    raise app.UsageError(f"--config={FLAGS.config}: name the variant to tune, e.g. "
                         f"--config={FLAGS.config}:ms.")
  if any(o.startswith("--config.data.validation.") for o in overrides):
    raise app.UsageError("--folds sets the validation classes: leave data.validation out of the "
                         "overrides.")
  try:
    config, _ = config_cli.resolve(FLAGS.config, overrides)
    config_check.check_config(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.set_verbosity(logging.WARNING)  # Our progress goes to stdout; libraries stay quiet.
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  if _WORKER_TRIALS.value:  # A worker of a tune command, which holds the lock.
    directory = os.path.join(FLAGS.workdir, protocol.variant)
    study = open_study(directory, protocol.variant, protocol, _PRUNER.value, _TRIALS.value,
                       sampler_seed=os.getpid())  # Workers that start together draw apart.
    space, _ = variant_space(config)
    run_trials(study, _WORKER_TRIALS.value, config, space, protocol, directory,
               on_end=lambda trial: print(f"trial {trial.number}: {trial.state.name}", flush=True))
    return
  signal.signal(signal.SIGTERM, lambda *_: sys.exit("Stopped: the same command resumes the study."))
  run_study(config, protocol, FLAGS.workdir, _TRIALS.value, _PRUNER.value, _PARALLEL.value,
            tuple(sys.argv[1:]))


if __name__ == "__main__":
  app.run(main, flags_parser=main_lib.parse_flags)
