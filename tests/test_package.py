"""The package as researchers install it: `pip install .` and `pip install -e .` in a fresh virtual
environment, used from outside the repository; pyproject.toml's ranges against requirements.txt's pins;
the Python version check.

The environments see this one's packages, so nothing is downloaded: pip installs the package alone
(--no-deps, --no-index, --no-build-isolation).
"""

import os
import pathlib
import shutil
import site
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _clean_env(**extra) -> dict:
  """The environment of a process outside the repository: no PYTHONPATH to find the sources by."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return {**env, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _venv(path: pathlib.Path, source: pathlib.Path, editable: bool) -> pathlib.Path:
  """A fresh environment at `path` with the package of `source` installed; its bin directory. It reads
  this environment's packages (a .pth of its site-packages, which works whether this one is a venv or
  not) after its own, so the package it installs is the one it imports."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
  python = path / "bin" / "python"
  own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       check=True, capture_output=True, text=True).stdout.strip()
  pathlib.Path(own, "parent_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
  subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                  *(["-e"] if editable else []), str(source)], check=True, env=_clean_env(),
                 cwd=path)
  return path / "bin"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pathlib.Path:
  """A copy of what the package is built from, so that building writes nothing into the repository."""
  copy = tmp_path_factory.mktemp("source")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, copy / name)
  shutil.copytree(REPO / "mmsi_jax", copy / "mmsi_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  return copy


@pytest.mark.slow
def test_pip_install_gives_the_package_and_its_commands_outside_the_repository(source, tmp_path):
  bin_dir = _venv(tmp_path / "venv", source, editable=False)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  script = (
      "import mmsi_jax, jax, jax.numpy as jnp\n"
      "print(mmsi_jax.__file__)\n"
      "e = jax.random.normal(jax.random.PRNGKey(0), (8, 4))\n"
      "e = e / jnp.linalg.norm(e, axis=1, keepdims=True)\n"
      "print(float(mmsi_jax.losses.get('multi_similarity')(e, jnp.arange(8) // 2)))\n")
  out = subprocess.run([str(bin_dir / "python"), "-c", script], cwd=elsewhere, env=_clean_env(),
                       capture_output=True, text=True, check=True).stdout.split()
  assert out[0].startswith(str(tmp_path / "venv")), out
  assert float(out[1]) > 0
  for command in ("mmsi-train", "mmsi-compare", "mmsi-tune", "mmsi-embed", "mmsi-search",
                  "mmsi-export", "mmsi-fetch"):
    assert (bin_dir / command).is_file(), command
  # The trainer's command reads the repository's configs from any directory (their package imports
  # its siblings); a misspelt key stops it before any work.
  result = subprocess.run(
      [str(bin_dir / "mmsi-train"), f"--config={REPO / 'configs' / 'demo.py'}:mmsi_ms",
       f"--workdir={tmp_path / 'run'}", "--config.train.nm_steps=1"],
      cwd=elsewhere, env=_clean_env(), capture_output=True, text=True)
  assert result.returncode == 1, result.stderr
  assert "did you mean --config.train.num_steps" in result.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pip_install_editable_imports_the_sources(source, tmp_path):
  bin_dir = _venv(tmp_path / "venv", source, editable=True)
  out = subprocess.run([str(bin_dir / "python"), "-c", "import mmsi_jax; print(mmsi_jax.__file__)"],
                       cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, check=True)
  assert out.stdout.strip() == str(source / "mmsi_jax" / "__init__.py")


def test_the_pinned_versions_satisfy_the_package_ranges():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  ranges = {Requirement(r).name.lower().replace("_", "-"): Requirement(r)
            for r in project["dependencies"] + project["optional-dependencies"]["test"]}
  pins = {}
  for line in (REPO / "requirements.txt").read_text().splitlines():
    if line.strip() and not line.startswith("#"):
      requirement = Requirement(line)
      pins[requirement.name.lower().replace("_", "-")] = next(iter(requirement.specifier)).version
  for name, requirement in ranges.items():
    if name in pins:
      assert requirement.specifier.contains(pins[name]), (name, pins[name], str(requirement))
  unpinned = sorted(set(ranges) - set(pins) - {"absl-py", "ml-dtypes"})  # Pinned by jax's own.
  assert not unpinned, f"pin these in requirements.txt: {unpinned}"


def test_an_old_python_is_told_which_version_is_needed():
  script = ("import sys; sys.version_info = (3, 10, 4, 'final', 0)\n"
            "try:\n  import mmsi_jax\nexcept ImportError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert "mmsi_jax needs Python 3.11 or later" in out and "this is Python 3.10" in out


def test_import_is_light():
  out = subprocess.run([sys.executable, "-c", "import sys, mmsi_jax; print('jax' in sys.modules)"],
                       cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert out.strip() == "False"  # The names of __all__ load on first use.


def test_the_readme_gives_the_two_commands_and_points_into_docs():
  readme = (REPO / "README.md").read_text()
  assert ("    pip install -r requirements.txt && python -m mmsi_jax.main --config=configs/demo.py "
          "--workdir=runs/demo\n") in readme
  assert "    python -m pytest -q -n auto --dist loadscope tests\n" in readme
  ci = (REPO / ".ci" / "run").read_text()
  assert "pip install -r requirements.txt" in ci and "python -m pytest -q -n auto --dist loadscope tests" in ci
  for page in ("docs/API.md", "docs/WEIGHTS.md", "docs/USAGE.md", "docs/METHODS.md", "launch/README.md"):
    assert page in readme and (REPO / page).is_file(), page
