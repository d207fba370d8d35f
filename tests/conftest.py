"""Shared fixtures: the built-in dataset, built once per test session into a temporary directory."""

import pytest

from mmsi_jax.data import pipeline


@pytest.fixture(scope="session")
def glyphs_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  pipeline.prepare("glyphs", data_dir)
  return data_dir
