"""The launch scripts parse, and the Colab notebook is a valid notebook whose commands name existing
configs."""

import json
import os
import re
import subprocess

import pytest

from tests.test_train import REPO

LAUNCH = os.path.join(REPO, "launch")


@pytest.mark.parametrize("script", ["gpu.sh", "slurm_gpu.sbatch", "tpu_pod.sh"])
def test_script_parses_and_explains_its_usage(script):
  path = os.path.join(LAUNCH, script)
  assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
  assert os.access(path, os.X_OK)
  if script != "slurm_gpu.sbatch":  # Run without arguments: usage, no work.
    result = subprocess.run(["bash", path], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_colab_notebook_runs_existing_configs():
  with open(os.path.join(LAUNCH, "colab_tpu.ipynb")) as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4 and notebook["metadata"]["accelerator"] == "TPU"
  code = "".join("".join(c["source"]) + "\n" for c in notebook["cells"] if c["cell_type"] == "code")
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code" and not "".join(cell["source"]).lstrip().startswith(("!", "%")):
      compile("".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))),
              "cell", "exec")
  configs = re.findall(r"--config=(configs/\w+\.py)", code)
  assert "configs/demo.py" in configs
  for config in configs:
    assert os.path.exists(os.path.join(REPO, config)), config
