"""How a run stops when its machines go, and how the same command then resumes it (docs/ARCHITECTURE.md,
"Stopping"; launch/README.md, "Signals and exit statuses").

- SIGTERM (what SLURM, Kubernetes and Cloud TPU maintenance send first) and SIGINT (Ctrl-C) ask the
  loop to stop (`StopSignals`): it finishes the step in flight, saves its checkpoint and raises
  `Stopped`. On several processes the step is agreed through JAX's preemption sync point
  (`jax.experimental.multihost_utils.reached_preemption_sync_point`), so that every process saves the
  same one. A second signal stops at once.
- A lost process: JAX's coordination service notices its missing heartbeats after
  distributed.heartbeat_timeout_seconds and ends every other process with a native abort. `supervise`
  runs each process of a multi-host run as a child whose native log goes to a file, and turns that end
  into one line that names the lost process.
- A hang: `Watchdog` ends the process, naming what it waited for, when a step's collectives or a
  checkpoint make no progress for distributed.hang_timeout_seconds.

The exit statuses of `python -m mmsi_jax.main` below are what the launchers in launch/ act on.
This module loads no JAX backend, dataset or checkpoint library: the supervising process stays light.
"""

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Iterator, Optional

import numpy as np

PREEMPTED = 75  # Stopped on SIGTERM, the step in flight saved: run again (sysexits.h EX_TEMPFAIL).
UNAVAILABLE = 69  # A process was lost or a collective hung: run again (sysexits.h EX_UNAVAILABLE).
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it), the step in flight saved.
# The environment variable that marks a supervised process: the descriptor of the supervisor's stderr,
# where this process writes its messages (its own stderr, the native log, goes to the log file).
_SCREEN_FD = "MMSI_JAX_SCREEN_FD"
# After an error in a multi-process run, the wait beyond the heartbeat timeout for the coordination
# service's verdict on the other processes (its abort comes 1-3 s after the timeout).
_VERDICT_MARGIN_S = 10
# The metrics of the steps since the last log line of a run stopped between two log lines.
INTERVAL_FILE = "stopped_interval.json"


class Stopped(Exception):
  """The loop stopped on a signal after saving the checkpoint of `step`."""

  def __init__(self, step: int, reason: str, status: int, directory: str):
    super().__init__(f"Stopped after step {step} ({reason}); its checkpoint is in {directory}: the "
                     f"same command resumes from it.")
    self.step, self.status = step, status


class StopSignals:
  """SIGTERM and SIGINT received inside the block ask the loop to stop at the next step's end.

  `reached(step)`, called after every step by every process, says whether to save that step and
  stop. Alone, the first signal does. On several processes (`distributed`: jax.distributed is
  initialized), JAX's preemption notifier owns SIGTERM and shares the notice with every process, which
  all reach the sync point at the same step; Ctrl-C is turned into that notice (a SIGTERM to this
  process). A second signal takes its usual
  effect at once (Ctrl-C: KeyboardInterrupt). Off the main thread, and for a signal this process
  ignores, nothing is installed.
  """

  def __init__(self, distributed: bool):
    self._distributed = distributed
    self.received: Optional[int] = None  # The first signal this process received.
    self._previous: dict[int, Callable] = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT,) if self._distributed else (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _on_signal(self, signum: int, frame) -> None:
    del frame
    self.received = signum
    self._restore()
    if self._distributed:  # JAX's preemption notifier takes it from here.
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if self._distributed:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def stopped(self, step: int, directory: str) -> Stopped:
    """The exception that reports the stop after `step`, whose checkpoint is in `directory`."""
    if self.received == signal.SIGINT:
      return Stopped(step, "Ctrl-C", INTERRUPTED, directory)
    if not self._distributed:
      return Stopped(step, "SIGTERM", PREEMPTED, directory)
    return Stopped(step, "a preemption notice (SIGTERM) to a process of the run; every process saved "
                   "this step", PREEMPTED, directory)


def write_interval(workdir: str, step: int, metrics: list[tuple[int, dict]]) -> None:
  """Keeps `metrics`, (step, {name: value}) of the steps since the last log line, beside the checkpoint
  of a stop at `step`, so that the resumed run's next log line averages the same steps, to the bit, as
  an uninterrupted run's (values stored with their dtype)."""
  names = metrics[0][1]
  record = {"step": step, "steps": [s for s, _ in metrics],
            "metrics": {name: {"dtype": str(np.asarray(names[name]).dtype),
                               "values": [np.asarray(m[name]).tolist() for _, m in metrics]}
                        for name in names}}
  path = os.path.join(workdir, INTERVAL_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f)
  os.replace(path + ".tmp", path)


def read_interval(workdir: str, step: Optional[int]) -> list[tuple[int, dict]]:
  """The metrics `write_interval` kept for a stop at `step`; none for another step (a later checkpoint
  was restored, or that one was never completed)."""
  path = os.path.join(workdir, INTERVAL_FILE)
  if step is None or not os.path.exists(path):
    return []
  with open(path) as f:
    record = json.load(f)
  if record["step"] != step:
    return []
  columns = {name: np.asarray(m["values"], dtype=m["dtype"]) for name, m in record["metrics"].items()}
  return [(s, {name: column[i] for name, column in columns.items()})
          for i, s in enumerate(record["steps"])]


def resume_hint(workdir: str, latest_step: Optional[int], every_host: bool = False) -> str:
  """Where the run stands and that the same command resumes it."""
  command = "the same command on every host" if every_host else "the same command"
  if latest_step is None:
    return f"no checkpoint was written yet: {command} starts the run again"
  return (f"the last complete checkpoint is step {latest_step} in "
          f"{os.path.join(os.path.abspath(workdir), 'checkpoints')}: {command} resumes from it")


class Watchdog:
  """Ends the process when an operation that waits on other processes or devices makes no progress.

  `waiting_for(what)` marks a blocking operation; one that lasts more than `timeout_s` (0: never) calls
  `on_hang(what, seconds)` from the watchdog's thread, which must end the process: the operation
  itself cannot be interrupted (it waits in native code).
  """

  def __init__(self, timeout_s: float, on_hang: Callable[[str, float], None]):
    self._timeout_s, self._on_hang = timeout_s, on_hang
    self._waiting: Optional[tuple[str, float]] = None  # (what, since when)
    self._changed = threading.Condition()
    self._closed = False
    self._thread = None
    if timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, name="mmsi_jax watchdog", daemon=True)
      self._thread.start()

  @contextlib.contextmanager
  def waiting_for(self, what: str, watch: bool = True) -> Iterator[None]:
    """The block waits for `what`; `watch=False`: not watched (e.g. a first call, which compiles)."""
    if not watch:
      yield
      return
    with self._changed:
      self._waiting = (what, time.monotonic())
      self._changed.notify()
    try:
      yield
    finally:
      with self._changed:
        self._waiting = None
        self._changed.notify()

  def close(self) -> None:
    with self._changed:
      self._closed = True
      self._changed.notify()
    if self._thread is not None:
      self._thread.join()

  def _watch(self) -> None:
    with self._changed:
      while not self._closed:
        if self._waiting is None:
          self._changed.wait()
          continue
        what, since = self._waiting
        left = since + self._timeout_s - time.monotonic()
        if left > 0:
          self._changed.wait(left)
        else:
          self._on_hang(what, time.monotonic() - since)
          return


def end_hung_process(what: str, seconds: float, workdir: str,
                     latest_step: Callable[[], Optional[int]]) -> None:
  """A Watchdog's `on_hang` for the command line: one line on stderr, then exit UNAVAILABLE."""
  print(f"\nStopped: no progress for {seconds:.0f} s while waiting for {what} (a process of the run "
        f"may be lost or stuck; distributed.hang_timeout_seconds sets the wait); "
        f"{resume_hint(workdir, latest_step(), every_host=True)}.", file=sys.stderr, flush=True)
  os._exit(UNAVAILABLE)  # pylint: disable=protected-access  # The main thread waits in native code.


@contextlib.contextmanager
def peer_verdict_first(distributed: bool, heartbeat_timeout_s: float) -> Iterator[None]:
  """In a multi-process run, an error may be the loss of another process seen first by a collective
  (gloo: "Connection reset by peer"). The error then waits, its traceback in the native log, until JAX's
  coordination service has had the time to notice missing heartbeats: if a process was lost, the
  service ends this one and its supervisor names the lost process; an error that outlives the wait is
  this process's own and goes on as usual."""
  try:
    yield
  except Stopped:
    raise
  except Exception:  # pylint: disable=broad-except  # Re-raised below.
    if distributed:
      traceback.print_exc(file=sys.__stderr__)  # The native log, under a supervisor.
      sys.__stderr__.flush()
      time.sleep(heartbeat_timeout_s + _VERDICT_MARGIN_S)
    raise


def supervised() -> bool:
  """Whether this process runs under `supervise`."""
  return _SCREEN_FD in os.environ


def write_messages_to_screen() -> None:
  """Under `supervise`: this process's Python messages (sys.stderr) go to the supervisor's stderr; the
  native log (file descriptor 2: JAX's and XLA's C++ logging) stays in the log file."""
  sys.stderr = os.fdopen(int(os.environ[_SCREEN_FD]), "w", buffering=1, closefd=False)


def _die_with_parent() -> None:
  """In the child: SIGKILL when the supervisor dies, so that a killed host loses both (Linux)."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def lost_process(native_log: str) -> Optional[str]:
  """The process that JAX's coordination service found lost, as the survivor's native log names it
  ("Task 1 heartbeat timeout", "unhealthy (stopped sending heartbeats): 1"; the coordinator, process
  0, lost: "Failed to send RPC to coordination service"); None if it names none."""
  found = re.search(r"Task (\d+) heartbeat timeout", native_log) or re.search(
      r"stopped sending heartbeats\):\s*([\d\s,]+?)\s*(?:The tasks|$)", native_log)
  if found:
    ids = re.findall(r"\d+", found.group(1))
    return f"process{'es' if len(ids) > 1 else ''} {', '.join(ids)}"
  if "Failed to send RPC to coordination service" in native_log:
    return "process 0 (the coordinator)"
  return None


def supervise(command: list[str], log_path: str, workdir: str,
              latest_step: Callable[[], Optional[int]]) -> int:
  """Runs `command` (this program, one process of a multi-host run) as a child and returns the exit
  status to end with.

  The child's native log (stderr: JAX's and XLA's C++ logging, an abort's stack trace) is appended to
  `log_path`; its own messages come here (`write_messages_to_screen`). SIGTERM and SIGINT are passed on
  to it; it dies with this process. When it is ended by a signal (JAX's coordination service aborts
  every survivor of a lost process), one line says which process was lost and how to resume, and the
  status is UNAVAILABLE.
  """
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, "ab") as log:
    start = log.tell()
    screen = os.dup(sys.stderr.fileno())
    child = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn  # No threads here.
        command, stderr=log, pass_fds=(screen,), env={**os.environ, _SCREEN_FD: str(screen)},
        start_new_session=True, preexec_fn=_die_with_parent)
  os.close(screen)
  # Its own session: a terminal's Ctrl-C reaches it once, from here.
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda signum, frame: child.send_signal(signum))
  status = child.wait()
  if status >= 0:
    return status
  with open(log_path, "rb") as f:
    f.seek(start)
    native_log = f.read().decode(errors="replace")
  lost = lost_process(native_log)
  what = (f"{lost} of the run was lost (JAX's coordination service)" if lost else
          f"this process was ended by {signal.Signals(-status).name}")
  print(f"\nStopped: {what}; {resume_hint(workdir, latest_step(), every_host=True)}. The native log "
        f"is {log_path}.", file=sys.stderr, flush=True)
  return UNAVAILABLE if lost else 128 - status
