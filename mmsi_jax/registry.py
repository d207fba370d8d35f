"""Components found by name: one registry per kind (losses, miners, references, models, datasets).

A registry maps names to factories (functions or classes). A component's settings are the keyword
arguments of its factory, so the factory's signature is the one list of what a config may set:

    MINERS = Registry("miner")

    @MINERS.register("xbm")
    class XBM:
      def __init__(self, context, *, size: int, weight: float = 1.0): ...

    MINERS.check_settings("xbm", config.miner.xbm, where="miner.xbm")  # a typo stops here
    MINERS.build("xbm", config.miner.xbm, where="miner.xbm", context=context)

Settings are keyword-only arguments when the factory has any (losses: their hyperparameters after the
positional S, pos, neg), otherwise any argument that is not given as context.
"""

import contextlib
import inspect
from typing import Any, Callable, Iterator, Mapping


class Registry:
  """Named factories of one kind of component."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Callable] = {}

  def register(self, name: str) -> Callable[[Callable], Callable]:
    """Decorator: registers the decorated factory under `name` and returns it unchanged."""
    def add(factory: Callable) -> Callable:
      if name in self._entries:
        raise ValueError(f"A {self.kind} named {name!r} is already registered.")
      self._entries[name] = factory
      return factory
    return add

  @contextlib.contextmanager
  def registered(self, name: str, factory: Callable) -> Iterator[Callable]:
    """`factory` registered as `name` inside the `with` block only (experiments, tests)."""
    self.register(name)(factory)
    try:
      yield factory
    finally:
      del self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def get(self, name: str) -> Callable:
    if name not in self._entries:
      plural = self.kind if self.kind.endswith("s") else f"{self.kind}s"
      raise KeyError(f"Unknown {self.kind} {name!r}; known {plural}: {', '.join(self.names())}.")
    return self._entries[name]

  def settings(self, name: str, context: tuple[str, ...] = ()) -> list[str]:
    """The names a config may set for component `name` (see the module docstring)."""
    return list(self.setting_defaults(name, context))

  def setting_defaults(self, name: str, context: tuple[str, ...] = ()) -> dict[str, Any]:
    """{setting: its default} of component `name`; inspect.Parameter.empty where it has none."""
    parameters = inspect.signature(self.get(name)).parameters.values()
    keyword_only = [p for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY]
    settings = keyword_only or [p for p in parameters if p.name not in context and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return {p.name: p.default for p in settings}

  def check_settings(self, name: str, settings: Mapping[str, Any], where: str,
                     context: tuple[str, ...] = ()) -> None:
    """Raises ValueError naming the first key of `settings` that component `name` does not take.

    `where` is the config path of `settings` (e.g. "miner.xbm"), used in the message.
    """
    accepted = self.settings(name, context)
    for key in settings:
      if key not in accepted:
        raise ValueError(f"{where}.{key} is not a setting of the {self.kind} {name!r}; it takes "
                         f"{accepted}.")

  def build(self, name: str, settings: Mapping[str, Any], where: str, **context) -> Any:
    """The component `name` made with its `settings` (checked first) and the `context` arguments."""
    self.check_settings(name, settings, where, tuple(context))
    return self.get(name)(**context, **dict(settings))
