"""The console commands that `pip install` puts on the PATH, each the `python -m` command beside it:

  mmsi-train    python -m mmsi_jax.main      train and evaluate one run
  mmsi-compare  python -m mmsi_jax.compare   every variant of a config over seeds
  mmsi-tune     python -m mmsi_jax.tune      a variant's settings tuned on validation classes
  mmsi-embed    python -m mmsi_jax.embed     a trained model's embeddings of images, as .npz
  mmsi-search   python -m mmsi_jax.search    the nearest images of a query in such an index
  mmsi-export   python -m mmsi_jax.export    a workdir's model as one .npz with its config
  mmsi-fetch    python -m mmsi_jax.models.fetch  published ImageNet weights, checksum verified

Each module is imported when its command runs, so that one command's flags never meet another's.
"""

import importlib
import sys


def _absl_command(module_name: str) -> None:
  """Runs an absl command module (its flags parsed as `python -m mmsi_jax.main` parses them)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from mmsi_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(module_name)
  app.run(module.main, flags_parser=main_lib.parse_flags)


def _argparse_command(module_name: str) -> None:
  sys.exit(importlib.import_module(module_name).main(sys.argv[1:]))


def train() -> None:
  _absl_command("mmsi_jax.main")


def compare() -> None:
  _absl_command("mmsi_jax.compare")


def tune() -> None:
  _absl_command("mmsi_jax.tune")


def embed() -> None:
  _argparse_command("mmsi_jax.embed")


def search() -> None:
  _argparse_command("mmsi_jax.search")


def export() -> None:
  _argparse_command("mmsi_jax.export")


def fetch() -> None:
  _argparse_command("mmsi_jax.models.fetch")
