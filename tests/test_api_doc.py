"""docs/API.md's code blocks run as written, top to bottom in one session, so the page cannot rot.

The page compiles a train step, MMSI's meta step and the evaluator, and trains a 20-step run: marked
slow. Its configs read the Glyphs dataset that the session already built (from data/, linked to it
here); its run has the settings of tests/test_train.py's tiny_config, so that the trainer's programs are
those of the suite's tiny runs, compiled once in the session's cache (tests/conftest.py).
"""

import os
import pathlib
import re

import pytest

from tests.test_train import tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "API.md"


def _blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def _run(blocks: list[str]) -> dict:
  namespace = {"__name__": "api_doc"}
  for number, block in enumerate(blocks, 1):
    try:
      exec(compile(block, f"{PAGE}, block {number}", "exec"), namespace)  # pylint: disable=exec-used
    except Exception as e:
      raise AssertionError(f"docs/API.md block {number} fails: {type(e).__name__}: {e}\n{block}") from e
  return namespace


@pytest.mark.slow
def test_the_whole_page_runs(glyphs_dir, tmp_path, monkeypatch, capsys):
  (tmp_path / "configs").symlink_to(REPO / "configs")
  (tmp_path / "data").symlink_to(glyphs_dir)
  monkeypatch.chdir(tmp_path)
  namespace = _run(_blocks(PAGE.read_text()))
  printed = capsys.readouterr().out
  assert "multi-similarity loss after 3 steps" in printed and "meta loss" in printed
  assert 0 < namespace["metrics"]["recall@1"] < 1
  assert "Recall@1 after 20 steps" in printed
  assert namespace["vectors"].shape == (32, 16)  # The page's run embeds in 16 dimensions.
  assert os.path.isfile(namespace["exported"])
  config, tiny = namespace["config"], tiny_config(glyphs_dir)
  config.data.data_dir = glyphs_dir
  for key in ("train", "miner"):  # The run's length and cadences; no miner.
    del config[key], tiny[key]
  assert config.to_dict() == tiny.to_dict()
