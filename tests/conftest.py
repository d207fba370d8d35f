"""Shared fixtures: the built-in dataset, built once per test session into a temporary directory; and
one compilation cache for the session (its processes and their subprocesses), so that a program that
several tests compile alike (e.g. a run and its resumed copy) compiles once."""

import contextlib
import io
import os
import shutil
import tempfile

import jax
import pytest

from mmsi_jax.data import pipeline


@pytest.fixture(scope="session")
def glyphs_build(tmp_path_factory):
  """(data_dir, what preparing it printed)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    pipeline.prepare("glyphs", data_dir)
  return data_dir, printed.getvalue()


@pytest.fixture(scope="session")
def glyphs_dir(glyphs_build):
  return glyphs_build[0]


_OWN_CACHE = []  # The cache directory this session made (removed at its end), if any.


def pytest_configure(config):
  del config
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE.append(tempfile.mkdtemp(prefix="mmsi_jax_test_cache_"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE[0]  # Subprocesses inherit it.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
  del config
  for path in _OWN_CACHE:
    shutil.rmtree(path, ignore_errors=True)
