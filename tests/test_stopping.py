"""Runs that survive their machines: a signal saves the step in flight on every process, a lost process
stops the others within seconds with one line, a hang is named; the same command resumes."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mmsi_jax import checkpointing, stopping
from tests.test_parallel import coordinator_address
from tests.test_train import REPO

# The small model of the other tests (programs compiled once), in runs that never end by themselves.
TINY = ["--config=configs/demo.py", "--config.model.widths=8,16", "--config.model.embed_dim=16",
        "--config.data.classes_per_batch=8", "--config.eval.nmi=false", "--config.optim.warmup_steps=0",
        "--config.train.num_steps=1000", "--config.train.log_every=5",
        "--config.train.checkpoint_every=5", "--config.train.eval_every=1000"]


def start_two_processes(workdir, data_dir, *overrides):
  """The command line's two processes of one run (--multihost, one CPU device each)."""
  coordinator = coordinator_address()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return [subprocess.Popen(
      [sys.executable, "-m", "mmsi_jax.main", "--multihost", f"--coordinator_address={coordinator}",
       "--num_processes=2", f"--process_id={i}", f"--workdir={workdir}",
       f"--config.data.data_dir={data_dir}", *TINY, *overrides],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def read_until(process, pattern):
  """process 0's printed lines up to the first that matches `pattern`, and that match."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    found = re.match(pattern, line)
    if found:
      return "".join(lines), found
  raise AssertionError(f"{pattern!r} never printed:\n{''.join(lines)}{process.communicate()[1]}")


def test_a_lost_process_stops_the_other_and_a_preempted_one_saves_with_it(glyphs_dir, tmp_path):
  workdir = tmp_path / "run"
  # Process 1 is killed (its supervisor and, with it, its training process) once step 10 is logged:
  # process 0 stops within the heartbeat timeout, naming it, its native trace in its log only.
  processes = start_two_processes(workdir, glyphs_dir, "--config.distributed.heartbeat_timeout_seconds=5")
  read_until(processes[0], r"step\s+10/1000")
  processes[1].kill()
  killed = time.monotonic()
  _, stderr = processes[0].communicate(timeout=60)
  assert time.monotonic() - killed < 30
  processes[1].communicate()
  complete = checkpointing.latest_step(str(workdir))
  assert complete >= 5
  assert processes[0].returncode == stopping.UNAVAILABLE, stderr
  log = workdir / "logs" / "process_0.log"
  assert stderr.strip() == (
      f"Stopped: process 1 of the run was lost (JAX's coordination service); the last complete "
      f"checkpoint is step {complete} in {workdir / 'checkpoints'}: the same command on every host "
      f"resumes from it. The native log is {log}.")
  assert "Check failure stack trace" in log.read_text()

  # The same command resumes both from there; SIGTERM to process 1 two log lines later: both save the
  # step that JAX's preemption sync point picks, and exit with PREEMPTED.
  processes = start_two_processes(workdir, glyphs_dir)
  printed, _ = read_until(processes[0], rf"step\s+{complete + 10}/1000")
  assert f"Resuming at step {complete} of 1000" in printed
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=120) for p in processes]
  saved = checkpointing.latest_step(str(workdir))
  assert saved >= complete + 10
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == stopping.PREEMPTED, stderr
    assert stderr.strip() == (
        f"Stopped after step {saved} (a preemption notice (SIGTERM) to a process of the run; every "
        f"process saved this step); its checkpoint is in {workdir / 'checkpoints'}: the same command "
        f"resumes from it."), stderr


def test_the_second_signal_takes_its_usual_effect():
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Also when run in the background.
  try:
    with stopping.StopSignals(distributed=False) as stop:
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.received == signal.SIGINT and stop.reached(1)
      assert stop.stopped(1, "ckpt").status == stopping.INTERRUPTED
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  finally:
    signal.signal(signal.SIGINT, previous)
  with stopping.StopSignals(distributed=False) as stop:  # No signal: no stop.
    assert not stop.reached(1)


def test_the_watchdog_names_what_made_no_progress(tmp_path):
  hangs = []
  watchdog = stopping.Watchdog(0.3, lambda what, seconds: hangs.append(what))
  with watchdog.waiting_for("a quick step"):
    time.sleep(0.05)
  with watchdog.waiting_for("a first step, compiling", watch=False):
    time.sleep(0.5)
  time.sleep(0.3)
  watchdog.close()
  assert not hangs
  # The command line's watchdog, over a checkpoint that never ends: one line, exit UNAVAILABLE.
  hung = ("import functools, time\nfrom mmsi_jax import stopping\n"
          "watchdog = stopping.Watchdog(0.3, functools.partial(stopping.end_hung_process, "
          f"workdir={str(tmp_path)!r}, latest_step=lambda: 5))\n"
          "with watchdog.waiting_for('the checkpoint of step 10 on every process'):\n"
          "  time.sleep(60)")
  result = subprocess.run([sys.executable, "-c", hung], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == stopping.UNAVAILABLE
  assert result.stderr.strip() == (
      f"Stopped: no progress for 0 s while waiting for the checkpoint of step 10 on every process (a "
      f"process of the run may be lost or stuck; distributed.hang_timeout_seconds sets the wait); the "
      f"last complete checkpoint is step 5 in {tmp_path / 'checkpoints'}: the same command on every "
      f"host resumes from it.")


# What a survivor's native log says when process 1 was lost, and when the coordinator was (jax 0.10).
LOST_1 = ("E1203 10:22:13.408146 13713 coordination_service.cc:1549] [3590829073042762479] Use error "
          "polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks "
          "are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed. Check the task logs")
LOST_0 = ("F1203 10:18:55.718360 15525 client.h:80] Terminating process because the JAX distributed "
          "service detected fatal errors. [...] absl::Status: UNAVAILABLE: Failed to send RPC to "
          "coordination service. Either the leader task was preempted/died/restarted unexpectedly")


def test_the_supervisor_names_the_lost_process_and_passes_on_other_ends(tmp_path):
  assert stopping.lost_process(LOST_1) == "process 1"
  assert stopping.lost_process("... UNAVAILABLE: Task 3 heartbeat timeout. This indicates") == "process 3"
  assert stopping.lost_process(LOST_0) == "process 0 (the coordinator)"
  assert stopping.lost_process("F1203 client.h:80] something else") is None
  log = tmp_path / "logs" / "process_0.log"

  def supervise(code):
    result = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom mmsi_jax import stopping\nsys.exit(stopping.supervise("
         f"[sys.executable, '-c', {code!r}], {str(log)!r}, {str(tmp_path)!r}, lambda: 40))"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr.strip()

  # The child's own messages reach the screen, its native log the file, and its status is passed on.
  child = ("import os, sys\nfrom mmsi_jax import stopping\nstopping.write_messages_to_screen()\n"
           "os.write(2, b'native\\n')\nsys.exit('Error: own message')")
  assert supervise(child) == (1, "Error: own message")
  assert log.read_text() == "native\n"
  # An abort after the coordination service's verdict: one line, the trace in the log.
  child = f"import os\nos.write(2, {LOST_1.encode()!r})\nos.abort()"
  assert supervise(child) == (stopping.UNAVAILABLE, (
      f"Stopped: process 1 of the run was lost (JAX's coordination service); the last complete "
      f"checkpoint is step 40 in {tmp_path / 'checkpoints'}: the same command on every host resumes "
      f"from it. The native log is {log}."))
  assert log.read_text().startswith("native\nE1203")
