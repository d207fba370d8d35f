"""The notebooks run top to bottom on a CPU (nbclient, the python3 kernel), with short settings: the
example of a training loop of your own (examples/), and the Colab notebook (launch/), which outside
Colab uses the clone it is in, installs nothing that is already there, and runs with the flags of
MMSI_JAX_RUN_FLAGS into MMSI_JAX_RUNS_DIR."""

import pathlib

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


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
      "--config.optim.warmup_steps=1",
      "--config.train.checkpoint_every=4", "--config.model.widths=8", "--config.eval.nmi=false",
      f"--config.data.data_dir={glyphs_dir}"]))
  monkeypatch.delenv("MMSI_JAX_REPO_URL", raising=False)
  printed = _execute(REPO / "launch" / "colab_tpu.ipynb")
  assert "Installing" not in printed  # The environment is complete: nothing is installed.
  assert f"{REPO} [" in printed  # The clone it is in.
  for run in ("demo", "demo_mmsi"):
    assert (tmp_path / run / "metrics.jsonl").is_file()
    assert f"{tmp_path}/{run}/eval/step_000004_grid.png" in printed
  assert "TensorBoard: tensorboard --logdir" in printed
