"""Command line: `python -m mmsi_jax.main --config=configs/demo.py --workdir=runs/demo`.

Any config key can be overridden, e.g. `--config.train.num_steps=2000`, and any component chosen by name,
e.g. `--config.loss.name=lifted_structure` (config_cli.py); an unknown key, a value of the wrong type or
a setting a component refuses is reported, naming the key, before any work starts (config_check.py).
Running again with the same workdir resumes its run, whose config may differ only in the keys that
run_record.py lists; any other difference is refused.

On several hosts, run the same command on each with --multihost (see launch/): each runs its training
process as a child, whose native log goes to <workdir>/logs/ (stopping.supervise).

SIGTERM or Ctrl-C saves the checkpoint of the step in flight and exits with stopping.PREEMPTED (75) or
stopping.INTERRUPTED (130); a lost process or a hang exits with stopping.UNAVAILABLE (69); the same
command resumes in every case (docs/ARCHITECTURE.md, "Stopping"; launch/README.md).
"""

import os
import socket
import sys

from absl import app
from absl import flags
from absl import logging

from mmsi_jax import config_check
from mmsi_jax import config_cli
from mmsi_jax import parallel
from mmsi_jax import run_record
from mmsi_jax import stopping

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


def latest_step() -> int | None:
  """The step of the workdir's latest complete checkpoint (orbax loads on the first call)."""
  from mmsi_jax import checkpointing  # pylint: disable=g-import-not-at-top
  return checkpointing.latest_step(_WORKDIR.value)


def native_log_path() -> str:
  """<workdir>/logs/process_<id>.log (the host's name where the id is left to JAX to detect)."""
  process = _PROCESS_ID.value if _PROCESS_ID.value is not None else os.environ.get("SLURM_PROCID")
  name = f"process_{process}" if process is not None else socket.gethostname()
  return os.path.join(_WORKDIR.value, "logs", f"{name}.log")


def main(argv: list[str]) -> None:
  if _MULTIHOST.value and not stopping.supervised():  # This process supervises the training one.
    try:
      sys.exit(stopping.supervise([sys.executable, "-m", "mmsi_jax.main", *sys.argv[1:]],
                                  native_log_path(), _WORKDIR.value, latest_step))
    except OSError as e:
      sys.exit(f"Error: cannot write the log {native_log_path()} ({e.strerror}): pass a writable "
               f"--workdir.")
  if stopping.supervised():
    stopping.write_messages_to_screen()
  config = resolved_config(argv)
  logging.set_verbosity(logging.WARNING)  # Our progress goes to stdout; libraries stay quiet.
  if _MULTIHOST.value:  # Before anything asks JAX for its devices.
    try:
      config_check.check_distributed(config)
    except ValueError as e:
      sys.exit(f"Error: {e}")
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                        config.distributed.heartbeat_timeout_seconds)
  try:  # Before the trainer's libraries load (TFDS, grain, orbax: seconds): a wrong config fails fast.
    config_check.check_config(config)
    run_record.check_resumable(_WORKDIR.value, config)
  except ValueError as e:
    sys.exit(f"Error: {e}")
  from mmsi_jax import train  # pylint: disable=g-import-not-at-top
  try:
    with stopping.peer_verdict_first(_MULTIHOST.value, config.distributed.heartbeat_timeout_seconds):
      with stopping.StopSignals(distributed=_MULTIHOST.value) as stop:
        train.train_and_evaluate(config, _WORKDIR.value, stop=stop)
  except stopping.Stopped as e:
    print(f"\n{e}", file=sys.stderr, flush=True)
    sys.exit(e.status)
  except (ValueError, PermissionError, FileNotFoundError, train.NonFiniteLossError) as e:
    sys.exit(f"Error: {e}")
  except KeyboardInterrupt:  # A second Ctrl-C: the checkpoints under way were completed.
    print(f"\nInterrupted; {stopping.resume_hint(_WORKDIR.value, latest_step())}.", file=sys.stderr,
          flush=True)
    sys.exit(stopping.INTERRUPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
