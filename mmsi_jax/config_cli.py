"""The run's config from the command line: `--config=FILE[:VARIANT]` and `--config.a.b=value` overrides.

    config, notes = config_cli.resolve("configs/demo.py:ms", ["--config.loss.name=triplet",
                                                              "--config.loss.hparams.margin=0.2"])

A value is parsed as the type of the key it replaces (a tuple as `1,2,4` or `(1, 2, 4)`; a bool as
true/false); a wrong key or value stops with a `ConfigError` that names the key, says what it takes and,
for an unknown key, suggests the key meant (by spelling, and by meaning for common aliases such as
lr -> learning_rate).

Choosing a component by name (`COMPONENTS`: loss, model, references, miner, batch policy) starts it
from its own defaults: the settings a config wrote for the component it named before are dropped
(listed in the notes) where they share its place (`loss.hparams`, the flat `model` block), and kept
under their own name where each component has one (`references.<name>`, `miner.<name>`,
`data.<name>`). A setting given on the command line for the new component is typed by its factory's
default and checked against its factory (config_check.check_config), as any other. A loss of the other
kind (pair or proxy) also switches `references.name` to that kind's plain references, unless the
command line names them.
"""

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, Optional, Sequence

import ml_collections

from mmsi_jax import batch_policies, losses, mining, models, references
from mmsi_jax.registry import Registry


class ConfigError(ValueError):
  """A config file, variant, key or value that cannot be used; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class ComponentKind:
  """Where a kind of component is named and configured.

  name_key: the config key of its name; names(): every name it takes; registry_of(name): the registry
  holding `name` (None: not a component, e.g. miner "none"); settings_of(name): the config path of that
  component's settings; context: the factory arguments the trainer passes, which are not settings.
  """
  name_key: str
  names: Callable[[], list[str]]
  registry_of: Callable[[str], Optional[Registry]]
  settings_of: Callable[[str], str]
  context: tuple[str, ...] = ()


def _loss_registry(name: str) -> Optional[Registry]:
  return losses.registry_of(name) if name in losses.names() + losses.proxy_names() else None


COMPONENTS = (
    ComponentKind("loss.name", lambda: losses.names() + losses.proxy_names(), _loss_registry,
                  lambda name: "loss.hparams"),
    ComponentKind("model.name", models.MODELS.names,
                  lambda name: models.MODELS if name in models.MODELS else None, lambda name: "model"),
    ComponentKind("references.name", references.REFERENCES.names,
                  lambda name: references.REFERENCES if name in references.REFERENCES else None,
                  lambda name: f"references.{name}", context=("num_classes",)),
    ComponentKind("miner.name", lambda: [mining.NONE, *mining.MINERS.names()],
                  lambda name: mining.MINERS if name in mining.MINERS else None,
                  lambda name: f"miner.{name}",
                  context=("model", "pair_loss", "hparams", "num_classes")),
    ComponentKind("data.batch_policy", batch_policies.BATCH_POLICIES.names,
                  lambda name: (batch_policies.BATCH_POLICIES if name in batch_policies.BATCH_POLICIES
                                else None),
                  lambda name: f"data.{name}",
                  context=("labels", "classes_per_batch", "samples_per_class", "seed",
                           "held_out_fraction", "loss_fn", "hparams", "sampler")),
)

# Blocks whose keys are free (new ones allowed) and the type of their values.
OPEN_BLOCKS = {"optim.lr_mults": float}

# Names users reach for, and the key each means here.
ALIASES = {
    "lr": "learning_rate", "base_lr": "learning_rate", "wd": "weight_decay", "decay": "weight_decay",
    "steps": "num_steps", "iterations": "num_steps", "iters": "num_steps", "max_steps": "num_steps",
    "epochs": "num_steps", "dim": "embed_dim", "embedding_dim": "embed_dim",
    "embedding_size": "embed_dim", "embed_size": "embed_dim", "backbone": "name", "arch": "name",
    "batch_size": "classes_per_batch", "warmup": "warmup_steps", "dataset": "name",
}


def load_module(path: str):
  """The config file at `path` as a module (its get_config, and VARIANTS where it lists them)."""
  if not os.path.isfile(path):
    raise ConfigError(f"--config={path}: no such config file (e.g. --config=configs/demo.py).")
  # A config in a package (configs/__init__.py) imports its siblings by the package's name (`from
  # configs import default`): the package's parent must be importable, whatever the working directory
  # and however the command was started (`python -m`, or an installed console command).
  config_dir = os.path.dirname(os.path.abspath(path))
  if os.path.isfile(os.path.join(config_dir, "__init__.py")):
    package_parent = os.path.dirname(config_dir)
    if package_parent not in map(os.path.abspath, sys.path):
      sys.path.append(package_parent)
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # The file's own error: its message, no traceback.
    raise ConfigError(f"--config={path}: {type(e).__name__}: {e}") from e
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of `spec`, "path/to/file.py" or "path/to/file.py:VARIANT": the file's get_config()."""
  path, _, variant = spec.partition(":")
  module = load_module(path)
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except Exception as e:  # The file's own error, e.g. an unknown variant: its message, no traceback.
    raise ConfigError(f"--config={spec}: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config={spec}: get_config() returned a {type(config).__name__}, not a "
                      f"ml_collections.ConfigDict.")
  return config


def split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the other arguments, the `--config.a.b=value` overrides), each in their order."""
  rest, overrides = [], []
  for argument in argv:
    if argument.startswith(("--config.", "-config.", "--noconfig.")):
      if "=" not in argument or argument.startswith("--noconfig."):
        key = argument.split("=", 1)[0].lstrip("-").removeprefix("no").removeprefix("config.")
        raise ConfigError(f"Write {argument} as --config.{key}=VALUE (e.g. --config.{key}=false).")
      overrides.append(argument)
    else:
      rest.append(argument)
  return rest, overrides


def resolve(spec: str, overrides: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The config of `spec` with `overrides` ("--config.a.b=value") applied, and notes for the user."""
  config = load_config(spec)
  return config, apply_overrides(config, overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> list[str]:
  """Applies the overrides ("--config.a.b=value", or "a.b=value") to `config` in place; returns notes
  on what a component switch changed besides the key given. Component names go first, so that their
  settings given on the same command line apply to the new component."""
  parsed = {}
  for override in overrides:
    key, _, raw = override.partition("=")
    parsed[key.lstrip("-").removeprefix("config.")] = raw  # The last of a repeated key wins.
  notes = []
  with config.unlocked():
    names_given = {kind.name_key for kind in COMPONENTS if kind.name_key in parsed}
    for kind in COMPONENTS:
      if kind.name_key in parsed:
        new = parse_value(parsed[kind.name_key], _get(config, kind.name_key), kind.name_key)
        notes += _switch_component(config, kind, new, names_given)
    for key, raw in parsed.items():
      if key not in names_given:
        _set(config, key, raw)
  return notes


def _switch_component(config, kind: ComponentKind, new: str, names_given: set) -> list[str]:
  if new not in kind.names():
    close = difflib.get_close_matches(new, kind.names(), n=1, cutoff=0.6)
    raise ConfigError(f"--config.{kind.name_key}={new}: {new!r} is not one of {kind.names()}"
                      + (f"; did you mean --config.{kind.name_key}={close[0]}?" if close else "."))
  old = _get(config, kind.name_key)
  _put(config, kind.name_key, new)
  notes = []
  if kind.name_key == "loss.name":
    notes += _follow_loss_kind(config, old, new, names_given)
  if new == old or kind.settings_of(new) != kind.settings_of(old):
    return notes  # Each component keeps its settings under its own name.
  block = _get(config, kind.settings_of(new))
  dropped = {k: v for k, v in block.items() if k != kind.name_key.rsplit(".", 1)[-1]}
  for key in dropped:
    del block[key]
  if dropped:
    notes.append(f"{kind.name_key}={new!r} (the config's was {old!r}) starts from its own defaults: "
                 f"dropped {kind.settings_of(new)} " + ", ".join(f"{k}={_show(v)}" for k, v in
                                                                  dropped.items()) + ".")
  return notes


def _follow_loss_kind(config, old: str, new: str, names_given: set) -> list[str]:
  """A loss of the other kind (pair / proxy) takes that kind's plain references, unless given."""
  if "references.name" in names_given or new not in losses.names() + losses.proxy_names():
    return []
  wanted = "proxy" if losses.is_proxy_loss(new) else "pair"
  current = config.references.name
  if current not in references.REFERENCES or references.kind_of(current) == wanted:
    return []
  plain = next(n for n in references.DEFAULTS if references.kind_of(n) == wanted)
  config.references.name = plain
  return [f"loss.name={new!r} is a {wanted} loss: references.name={plain!r} (its plain references; "
          f"the config's {current!r} serves {references.kind_of(current)} losses). Choose others with "
          f"--config.references.name."]


def _show(value) -> str:
  return repr(tuple(value) if isinstance(value, list) else value)


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _put(config, key: str, value) -> None:
  parent, _, leaf = key.rpartition(".")
  (_get(config, parent) if parent else config)[leaf] = value


def _component_settings(config, path: str) -> Optional[tuple[ComponentKind, str, dict]]:
  """(kind, component name, {setting: default}) when `path` is where a component's settings live."""
  for kind in COMPONENTS:
    name = None
    if path == kind.settings_of(_get(config, kind.name_key)):
      name = _get(config, kind.name_key)
    else:  # A per-name block, e.g. references.xbm, also when that component is not the selected one.
      parent, _, last = path.rpartition(".")
      if kind.settings_of(last) == path and kind.registry_of(last) is not None and (
          parent == kind.name_key.rpartition(".")[0]):
        name = last
    registry = kind.registry_of(name) if name is not None else None
    if registry is not None:
      return kind, name, registry.setting_defaults(name, kind.context)
  return None


def _set(config, key: str, raw: str) -> None:
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    path = ".".join(parts[:i + 1])
    last = i == len(parts) - 1
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      if last:
        current = node[part]
        if isinstance(current, ml_collections.ConfigDict):
          raise ConfigError(f"--config.{key}: {key} is a group of settings, not one; set its keys, "
                            f"e.g. --config.{key}.{next(iter(current), 'KEY')}=VALUE (it has: "
                            f"{', '.join(current) or 'none yet'}).")
        like = current if current is not None else node.get_type(part)
        node[part] = parse_value(raw, like, key)
        return
      node = node[part]
      continue
    parent = ".".join(parts[:i])
    if last and parent in OPEN_BLOCKS:
      node[part] = parse_value(raw, OPEN_BLOCKS[parent], key)
      return
    component = _component_settings(config, parent) if isinstance(node, ml_collections.ConfigDict) \
        else None
    if component is not None and last and part in component[2]:
      default = component[2][part]
      like = default if default is not inspect.Parameter.empty else None
      node[part] = parse_value(raw, like, key)
      return
    if component is None and not last and isinstance(node, ml_collections.ConfigDict):
      kinds = [k for k in COMPONENTS if k.settings_of(part) == path and k.registry_of(part)]
      if kinds:  # The settings block of a component the config does not configure yet.
        node[part] = ml_collections.ConfigDict()
        node = node[part]
        continue
    raise ConfigError(_unknown_key_message(config, key, parent, part, component))


def _leaf_paths(node, prefix: str = "") -> list[str]:
  paths = []
  for key, value in node.items():
    path = f"{prefix}{key}"
    paths += _leaf_paths(value, path + ".") if isinstance(value, ml_collections.ConfigDict) else [path]
  return paths


def _unknown_key_message(config, key: str, parent: str, part: str, component) -> str:
  node = _get(config, parent) if parent else config
  siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
  where = f"{parent}." if parent else ""
  if component is not None:
    kind, name, settings = component
    siblings = sorted(set(siblings) | set(settings))
  meant = ALIASES.get(part)
  guesses = [meant] if meant in siblings else []
  guesses += [g for g in difflib.get_close_matches(part, siblings, n=3, cutoff=0.6) if g not in guesses]
  suggestions = [f"{where}{g}" for g in guesses]
  if not suggestions:  # The same name, or its alias, elsewhere in the config.
    wanted = {part, meant} - {None}
    suggestions = [p for p in _leaf_paths(config) if p.rsplit(".", 1)[-1] in wanted][:3]
  message = f"--config.{key}: unknown config key {key!r}"
  if component is not None:
    kind, name, _ = component
    message += f" ({parent} holds the settings of the {kind.registry_of(name).kind} {name!r})"
  if suggestions:
    message += "; did you mean " + " or ".join(f"--config.{s}" for s in suggestions) + "?"
  elif siblings:
    message += f"; {parent or 'the config'} has: {', '.join(siblings)}."
  return message


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def parse_value(raw: str, like: Any, key: str) -> Any:
  """`raw` parsed as the type of `like` (a value of the key, or a type; None: a Python literal, else
  the string itself); a ConfigError naming `key` if it does not parse."""
  kind = like if isinstance(like, type) else type(like)

  def fail(expected: str, example: str) -> ConfigError:
    return ConfigError(f"--config.{key}={raw}: {key} takes {expected}, e.g. --config.{key}={example}.")

  text = raw.strip()
  if like is None or kind is type(None):
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return raw
  if kind is bool:
    if text.lower() in _TRUE + _FALSE:
      return text.lower() in _TRUE
    raise fail("true or false", "true")
  if kind is int:
    try:
      number = float(text.replace("_", ""))
    except ValueError:
      raise fail("an integer", like if isinstance(like, int) else 10) from None
    if not number.is_integer():
      raise fail("an integer", like if isinstance(like, int) else 10)
    return int(number)
  if kind is float:
    try:
      return float(text.replace("_", ""))
    except ValueError:
      raise fail("a number", like if isinstance(like, float) else 0.1) from None
  if kind is str:
    return raw
  if kind in (tuple, list):
    items = text[1:-1] if text[:1] in "([" and text[-1:] in ")]" else text
    parts = [p.strip() for p in items.split(",") if p.strip()]
    element = like[0] if isinstance(like, (tuple, list)) and len(like) else None
    try:
      return tuple(parse_value(p, element, f"{key}[{i}]") for i, p in enumerate(parts))
    except ConfigError:
      example = ",".join(map(str, like)) if isinstance(like, (tuple, list)) and like else "1,2"
      element_name = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
          type(element), "values")
      raise fail(f"a tuple of {element_name}", example) from None
  raise ConfigError(f"--config.{key}: a {kind.__name__} cannot be set from the command line; set it "
                    f"in a config file.")
