"""The launch scripts parse, and the Colab notebook is a valid notebook whose commands name existing
configs."""

import json
import os
import re
import shutil
import subprocess
import tarfile

import pytest

from tests.test_train import REPO

LAUNCH = os.path.join(REPO, "launch")


@pytest.mark.parametrize("script", ["gpu.sh", "slurm_gpu.sbatch", "tpu_pod.sh"])
def test_script_parses_and_explains_its_usage(script):
  path = os.path.join(LAUNCH, script)
  assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
  assert os.access(path, os.X_OK)
  result = subprocess.run(["bash", path], capture_output=True, text=True, timeout=30)  # No arguments.
  assert result.returncode == 2 and "usage:" in result.stderr, result.stderr


def test_tpu_pod_ships_the_code_and_pretrained_weights_but_no_datasets_or_runs(tmp_path):
  checkout = tmp_path / "checkout"
  files = {"requirements.txt": "jax==0.0.1\n", "mmsi_jax/__init__.py": "", "configs/demo.py": "",
           "data/pretrained/resnet50.pth": "weights", "data/glyphs/1.0.0/train.array_record": "",
           "data/manual/cub200/CUB_200_2011.tgz": "", "runs/demo/config.json": "{}"}
  for name, text in files.items():
    (checkout / name).parent.mkdir(parents=True, exist_ok=True)
    (checkout / name).write_text(text)
  (checkout / "launch").mkdir()
  shutil.copy(os.path.join(LAUNCH, "tpu_pod.sh"), checkout / "launch")
  # A stand-in gcloud: keeps the package it is asked to copy and the command it is asked to run.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(
      '#!/usr/bin/env bash\n'
      'if [[ $4 == scp ]]; then cp "$5" "$(dirname "$0")/package.tgz"; fi\n'
      'if [[ $4 == ssh ]]; then echo "${@: -1}" > "$(dirname "$0")/command"; fi\n')
  (bin_dir / "gcloud").chmod(0o755)
  result = subprocess.run(
      ["bash", str(checkout / "launch" / "tpu_pod.sh"), "my-tpu", "zone-a", "configs/demo.py:ms",
       "/mnt/runs/ms", "--config.train.num_steps=5"], capture_output=True, text=True, timeout=60,
      env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  with tarfile.open(bin_dir / "package.tgz") as package:
    shipped = {os.path.normpath(m.name) for m in package.getmembers() if m.isfile()}
  assert shipped == {"requirements.txt", "mmsi_jax/__init__.py", "configs/demo.py",
                     "launch/tpu_pod.sh", "data/pretrained/resnet50.pth"}
  command = (bin_dir / "command").read_text()
  assert "tar xzf ~/mmsi_jax_src.tgz" in command and "'jax[tpu]==0.0.1'" in command
  assert command.rstrip().endswith("python -m mmsi_jax.main --multihost --config=configs/demo.py:ms "
                                   "--workdir=/mnt/runs/ms --config.train.num_steps=5"), command


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
