"""Search spaces: the settings of a component worth tuning, with their ranges, beside its factory.

    @search_space.tunable(margin=search_space.Float(0.01, 0.5, log=True))
    def triplet(sim, pos, neg, *, margin: float = 0.1, mining: str = "all"): ...

A component's settings are its factory's keyword arguments (registry.py); `tunable` names those that a
tuning study (`python -m mmsi_jax.tune`, docs/METHODS.md, "Tuning") searches, and `tunable()` without
any says that the component has nothing to tune (a backbone, the plain references): every registered
component declares one or the other. A variant's space is the union of the spaces of the components its
config selects, plus the optimizer's learning rate (step.OPTIMIZER_SPACE), so that every method gets
the same kind of search for the same budget (Musgrave et al., "A Metric Learning Reality Check", ECCV
2020). Each range holds the authors' value of every config of the project (configs/).

A study records the value each trial drew under the setting's config path; `apply` writes such values
into a config. This module imports nothing of the project, so that every component can import it.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import ml_collections

ATTRIBUTE = "search_space"  # Where `tunable` keeps a factory's space.
RUN_LENGTH = "train.num_steps"  # What a ShareOfRun is a share of.
# The best settings of a variant's study, as a config file in <tune workdir>/<variant>/ (written by
# mmsi_jax.tune, run by mmsi_jax.compare --tuned).
TUNED_CONFIG = "tuned_config.py"


def lookup(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value at `path` ("a.b.c") of `config`; KeyError if it has none."""
  return functools.reduce(lambda node, key: node[key], path.split("."), config)


class Param:
  """A setting's range. `suggest(trial, path, config)` draws the value a trial (an optuna Trial) records
  under the setting's config path `path`; `setting(recorded)` is the setting's value for `apply`, and
  `recorded(value, config)` the record of the setting's value in `config` (both the value itself,
  unless said)."""

  def setting(self, recorded: Any) -> Any:
    return recorded

  def recorded(self, value: Any, config: ml_collections.ConfigDict) -> Any:
    del config
    return value


@dataclasses.dataclass(frozen=True)
class Float(Param):
  """A number in [low, high], uniform, or log-uniform when `log`."""
  low: float
  high: float
  log: bool = False

  def suggest(self, trial, path: str, config: ml_collections.ConfigDict) -> float:
    del config
    return trial.suggest_float(path, self.low, self.high, log=self.log)


@dataclasses.dataclass(frozen=True)
class Int(Param):
  """An integer in [low, high], uniform, or log-uniform when `log`."""
  low: int
  high: int
  log: bool = False

  def suggest(self, trial, path: str, config: ml_collections.ConfigDict) -> int:
    del config
    return trial.suggest_int(path, self.low, self.high, log=self.log)


@dataclasses.dataclass(frozen=True)
class Around(Param):
  """A positive number log-uniform in [v / factor, v * factor] around the config's own value v: for a
  setting whose scale differs from one setup to the next (the learning rate: 2e-3 on the demo, 1e-5 to
  1e-7 fine-tuning on CUB)."""
  factor: float

  def suggest(self, trial, path: str, config: ml_collections.ConfigDict) -> float:
    value = lookup(config, path)
    return trial.suggest_float(path, value / self.factor, value * self.factor, log=True)


@dataclasses.dataclass(frozen=True)
class Share:
  """A step count as a share of train.num_steps: int(share * train.num_steps) steps."""
  of_run: float


@dataclasses.dataclass(frozen=True)
class ShareOfRun(Param):
  """A step count (a start, a warm-up) drawn as a share in [low, high] of train.num_steps, so that a
  setting tuned in trials shorter than the final runs scales to them: the study records the share, and
  `apply` sets the step count as int(share * train.num_steps), following any later change of
  train.num_steps (on the command line, in compare)."""
  low: float
  high: float

  def suggest(self, trial, path: str, config: ml_collections.ConfigDict) -> float:
    del config
    return trial.suggest_float(path, self.low, self.high)

  def setting(self, recorded: float) -> Share:
    return Share(recorded)

  def recorded(self, value: int, config: ml_collections.ConfigDict) -> float:
    return value / lookup(config, RUN_LENGTH)


def tunable(**space: Param) -> Callable:
  """Decorator: declares the settings of the decorated factory that a study tunes, {setting: range};
  none: the component has nothing to tune. Returns the factory unchanged."""
  def declare(factory: Callable) -> Callable:
    setattr(factory, ATTRIBUTE, dict(space))
    return factory
  return declare


def declared(factory: Callable) -> Optional[dict[str, Param]]:
  """The space `factory` declares with `tunable` ({} for nothing to tune); None if it declares none
  (a subclass does not inherit its parent's)."""
  return vars(factory).get(ATTRIBUTE)


def apply(config: ml_collections.ConfigDict, settings: Mapping[str, Any]) -> None:
  """Writes `settings` {config path: value} into `config`, adding a key the config lacks (a loss setting
  left at its factory's default); a Share becomes int(share * train.num_steps), a reference that
  follows later changes of train.num_steps."""
  run_length = config.train.get_ref("num_steps")
  with config.unlocked():
    for path, value in settings.items():
      parent, _, key = path.rpartition(".")
      lookup(config, parent)[key] = (run_length * value.of_run).to_int() if isinstance(value, Share) \
          else value
