"""Command line: `python -m mmsi_jax.main --config=configs/demo.py --workdir=runs/demo`.

Any config key can be overridden, e.g. `--config.train.num_steps=2000`; an unknown key or a value of the
wrong type is reported before any work starts. Running again with the same workdir resumes.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmsi_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and events.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a wrong config override into a one-line error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"Error: {e}\nPass --helpfull to list the flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = e.args[0] if e.args else str(e)
    sys.exit(f"Error in the config overrides {[a for a in argv[1:] if a.startswith('--config.')]}: "
             f"{str(message).strip(chr(39))}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Our progress goes to stdout; libraries stay quiet.
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, PermissionError, FileNotFoundError, train.NonFiniteLossError) as e:
    logging.error("%s", e)
    sys.exit(f"Error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
