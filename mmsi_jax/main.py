"""Command line: `python -m mmsi_jax.main --config=configs/demo.py --workdir=runs/demo`.

Any config key can be overridden, e.g. `--config.train.num_steps=2000`; an unknown key or a value of the
wrong type is reported before any work starts. Running again with the same workdir resumes.

On several hosts, run the same command on each with --multihost (see launch/).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmsi_jax import parallel
from mmsi_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and events.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Run as one process of a multi-host job (jax.distributed). On Cloud TPU pods and "
    "under SLURM the rest is detected; elsewhere also pass the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "With --multihost: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --multihost: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "With --multihost: this process's id, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else text


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a wrong config file or override into a short error, no traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # An exception raised by the config file: keep its own message.
      message = f"{message.splitlines()[0]} {_last_line(message)}"
    sys.exit(f"Error: {message}\nPass --helpfull to list the flags.")
  except (AttributeError, KeyError) as e:
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    detail = " ".join(part.strip("'\" ") for part in
                      str(e).encode().decode("unicode_escape").splitlines())
    sys.exit(f"Error: unknown config key in {overrides}: {detail}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Our progress goes to stdout; libraries stay quiet.
  if _MULTIHOST.value:
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, PermissionError, FileNotFoundError, train.NonFiniteLossError) as e:
    sys.exit(f"Error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
