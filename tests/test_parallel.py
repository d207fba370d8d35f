"""Data parallelism: training in 2 processes joined with jax.distributed, each with 2 (virtual CPU)
devices, matches training on one device."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmsi_jax import reporting, train
from tests import conftest
from tests.test_train import REPO, latest_params, tiny_config

TRAIN = """
import sys
from mmsi_jax import parallel
parallel.initialize(sys.argv[3], 2, int(sys.argv[4]))
import jax
assert jax.local_device_count() == 2 and jax.device_count() == 4, jax.devices()
from mmsi_jax import train
from tests.test_train import tiny_config
train.train_and_evaluate(tiny_config(sys.argv[1], num_steps=10, miner="mmsi"), sys.argv[2])
"""
ENV = conftest.host_devices_env(2)


def coordinator_address() -> str:
  """localhost and a free port, for process 0's coordination service."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return f"localhost:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def one_device_run(glyphs_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one"))
  train.train_and_evaluate(tiny_config(glyphs_dir, num_steps=10, miner="mmsi"), workdir)
  return workdir


def assert_same_training(workdir, reference):
  """The same losses (each step reported once) and, up to reduction order, the same parameters and
  MMSI memory."""
  records = reporting.read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == [5, 10]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  expected = [r["train/loss"] for r in reporting.read_metrics(reference) if "train/loss" in r]
  np.testing.assert_allclose(losses, expected, rtol=1e-4)
  (_, state), (_, expected_state) = latest_params(workdir), latest_params(reference)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(expected_state["params"])):
    # Reduction order differs between 1 and 4 devices, and Adam's normalisation amplifies that noise
    # in near-zero gradients; the parameters agree as a whole, not to the last bit.
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b) + 1e-6
  np.testing.assert_array_equal(state["miner"]["memory"]["labels"],
                                expected_state["miner"]["memory"]["labels"])


def test_two_processes_of_two_devices_train_like_one_device(glyphs_dir, tmp_path, one_device_run):
  """Two hosts in miniature: two processes of two CPU devices each, one workdir (a shared
  filesystem), each process feeding its half of every batch to its two devices."""
  coordinator = coordinator_address()
  workdir = str(tmp_path / "two_processes")
  processes = [subprocess.Popen([sys.executable, "-c", TRAIN, glyphs_dir, workdir, coordinator,
                                 str(i)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  assert "Test split" in outputs[0][0] and "step" not in outputs[1][0]  # Process 0 alone reports.
  assert_same_training(workdir, one_device_run)
  assert os.listdir(os.path.join(workdir, "eval"))
