"""mmsi_jax: deep metric learning in JAX/Flax (MMSI and the mining methods it is compared with).

The public names are those of `__all__`, here and in each subpackage; docs/API.md shows them at work.
Importing the package loads nothing heavy: each name is imported on first use.

  losses, mining, references, models, eval   the components, by name (their registries)
  resolve_config(spec, overrides)            a config file (and variant) with --config.a.b=value
                                             overrides, and notes on what they changed
  train_and_evaluate(config, workdir)        a training run, as `python -m mmsi_jax.main` starts it
  load(path)                                 a trained model (a workdir or an exported .npz) as an
                                             embedding function with its preprocessing
  export_model(workdir, path)                a workdir's model as one .npz with its config
"""

import importlib
import sys

__version__ = "0.1.0"

# jax and jaxlib 0.10 are built for Python 3.11 and later (pyproject.toml: requires-python).
MIN_PYTHON = (3, 11)
if sys.version_info < MIN_PYTHON:
  raise ImportError(
      "mmsi_jax needs Python %d.%d or later (its jax and jaxlib 0.10 do); this is Python %d.%d "
      "(%s). Create the environment with a newer Python, e.g. `python3.11 -m venv .venv`."
      % (MIN_PYTHON + tuple(sys.version_info[:2]) + (sys.executable,)))

_SUBMODULES = ("eval", "losses", "mining", "models", "references")
# Public name -> (module, its name there).
_FUNCTIONS = {"load": ("mmsi_jax.inference", "load"),
              "export_model": ("mmsi_jax.inference", "export_model"),
              "Embedder": ("mmsi_jax.inference", "Embedder"),
              "resolve_config": ("mmsi_jax.config_cli", "resolve"),
              "train_and_evaluate": ("mmsi_jax.train", "train_and_evaluate")}

__all__ = ["Embedder", "__version__", "eval", "export_model", "load", "losses", "mining", "models",
           "references", "resolve_config", "train_and_evaluate"]


def __getattr__(name: str):
  """The public names, imported on first use (PEP 562), so that `import mmsi_jax` stays fast."""
  if name in _SUBMODULES:
    return importlib.import_module(f"mmsi_jax.{name}")
  if name in _FUNCTIONS:
    module, attribute = _FUNCTIONS[name]
    return getattr(importlib.import_module(module), attribute)
  raise AttributeError(f"module 'mmsi_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
