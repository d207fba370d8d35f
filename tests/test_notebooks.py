"""The notebooks run top to bottom on a CPU (nbclient, the python3 kernel), with short settings: the
example of a training loop of your own (examples/), and the Colab notebook (launch/), which outside
Colab uses the clone it is in, installs nothing that is already there, and runs with the flags of
MMSI_JAX_RUN_FLAGS into MMSI_JAX_RUNS_DIR."""

import pathlib

import nbclient
import nbformat
import pytest

import mmsi_jax
from tests.test_train import tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
# The model, batch, optimizer, evaluation and MMSI settings of tests/test_train.py's tiny_config as
# flags: both runs of the Colab notebook (plain and MMSI) compile the programs of the suite's tiny runs,
# and read them from the session's compilation cache (tests/conftest.py).
TINY_FLAGS = ("--config.model.widths=8,16", "--config.model.embed_dim=16",
              "--config.data.classes_per_batch=8", "--config.data.eval_batch_size=600",
              "--config.eval.nmi=false", "--config.optim.learning_rate=5e-3",
              "--config.optim.schedule=constant", "--config.optim.warmup_steps=2",
              "--config.miner.mmsi.memory_size=1", "--config.miner.mmsi.wait_for_coverage=false",
              "--config.miner.mmsi.warmup_steps=4")


def _execute(path: pathlib.Path) -> str:
  """Runs the notebook at `path` in its own directory; its text outputs, joined."""
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}}).execute()
  return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.get("outputs", []))


@pytest.mark.slow
def test_the_example_trains_with_its_own_loop(glyphs_dir, monkeypatch):
  monkeypatch.setenv("MMSI_JAX_EXAMPLE_STEPS", "5")
  monkeypatch.setenv("MMSI_JAX_DATA_DIR", glyphs_dir)
  printed = _execute(REPO / "examples" / "own_training_loop.ipynb")
  assert "train: (2400, 32, 32, 3), 100 classes" in printed
  assert "step    4  loss" in printed and "recall@1" in printed


@pytest.mark.slow
def test_the_colab_notebook_runs_on_a_cpu(glyphs_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("MMSI_JAX_RUNS_DIR", str(tmp_path))
  monkeypatch.setenv("MMSI_JAX_RUN_FLAGS", " ".join([
      "--config.train.num_steps=4", "--config.train.eval_every=4", "--config.train.log_every=2",
      "--config.train.checkpoint_every=4", f"--config.data.data_dir={glyphs_dir}", *TINY_FLAGS]))
  monkeypatch.delenv("MMSI_JAX_REPO_URL", raising=False)
  printed = _execute(REPO / "launch" / "colab_tpu.ipynb")
  assert "Installing" not in printed  # The environment is complete: nothing is installed.
  assert f"{REPO} [" in printed  # The clone it is in.
  for run in ("demo", "demo_mmsi"):
    assert (tmp_path / run / "metrics.jsonl").is_file()
    assert f"{tmp_path}/{run}/eval/step_000004_grid.png" in printed
  assert "TensorBoard: tensorboard --logdir" in printed


@pytest.mark.parametrize("variant,miner", [("", "none"), (":mmsi_ms", "mmsi")])
def test_the_colab_runs_compile_the_programs_of_the_tiny_runs(variant, miner):
  """TINY_FLAGS on the notebook's configs give tiny_config's settings, all but the run's length."""
  config, _ = mmsi_jax.resolve_config(str(REPO / "configs" / f"demo.py{variant}"), list(TINY_FLAGS))
  tiny = tiny_config(config.data.data_dir, miner=miner)
  del config.train, tiny.train
  assert config.to_dict() == tiny.to_dict()
