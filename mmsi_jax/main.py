"""Command line: `python -m mmsi_jax.main --config=configs/demo.py --workdir=runs/demo`.

Any config key can be overridden, e.g. `--config.train.num_steps=2000`, and any component chosen by name,
e.g. `--config.loss.name=lifted_structure` (config_cli.py); an unknown key, a value of the wrong type or
a setting a component refuses is reported, naming the key, before any work starts (config_check.py).
Running again with the same workdir resumes its run, whose config may differ only in the keys that
run_record.py lists; any other difference is refused.

On several hosts, run the same command on each with --multihost (see launch/).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from mmsi_jax import config_check
from mmsi_jax import config_cli
from mmsi_jax import parallel
from mmsi_jax import run_record

_CONFIG = flags.DEFINE_string("config", None, "Config file and variant, e.g. configs/demo.py[:VARIANT]; "
                              "any key overridden with --config.a.b=value.")
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
INTERRUPTED = 130  # Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a short error, no traceback. The `--config.a.b=value` overrides are not
  absl flags: they are returned after the program name and the other arguments, for
  config_cli.resolve."""
  try:
    rest, overrides = config_cli.split_arguments(argv[1:])
    return flags.FLAGS([argv[0], *rest]) + overrides
  except (flags.Error, config_cli.ConfigError) as e:
    sys.exit(f"Error: {e}\nPass --helpfull to list the flags.")


def resolved_config(argv: list[str]):
  """The config of --config with the overrides among `argv[1:]` applied; exits with the reason if it
  cannot be made. Notes on component switches are printed."""
  rest, overrides = config_cli.split_arguments(argv[1:])
  if rest:
    raise app.UsageError(f"Unexpected arguments: {rest}")
  try:
    config, notes = config_cli.resolve(_CONFIG.value, overrides)
  except config_cli.ConfigError as e:
    sys.exit(f"Error: {e}")
  for note in notes:
    print(f"Note: {note}", flush=True)
  return config


def main(argv: list[str]) -> None:
  config = resolved_config(argv)
  logging.set_verbosity(logging.WARNING)  # Our progress goes to stdout; libraries stay quiet.
  if _MULTIHOST.value:  # Before anything asks JAX for its devices.
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:  # Before the trainer's libraries load (TFDS, grain, orbax: seconds): a wrong config fails fast.
    config_check.check_config(config)
    run_record.check_resumable(_WORKDIR.value, config)
  except ValueError as e:
    sys.exit(f"Error: {e}")
  from mmsi_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, PermissionError, FileNotFoundError, train.NonFiniteLossError) as e:
    sys.exit(f"Error: {e}")
  except KeyboardInterrupt:
    step = checkpointing.latest_step(_WORKDIR.value)
    where = (f"the last checkpoint is step {step} in {os.path.join(_WORKDIR.value, 'checkpoints')}: "
             f"the same command resumes from it" if step is not None else
             "no checkpoint was written yet: the same command starts the run again")
    print(f"\nInterrupted; {where}.", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
