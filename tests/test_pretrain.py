"""The fine-tuning regime: the pretraining glyphs, the pretrained backbone through `model.pretrained`, the
fine-tuning configs, a model built once while other runs wait, and the step-0 references."""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo, finetune
from mmsi_jax import checkpointing, compare, config_cli, models, pretrain, reporting, train
from mmsi_jax.data import glyphs
from mmsi_jax.models import torch_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec_key(class_id: int) -> tuple:
  spec = glyphs.glyph_spec(glyphs.SEED * 100_003 + class_id)
  return tuple(np.round(np.concatenate([np.ravel(v) for v in spec.values()]), 6))


def test_the_pretraining_glyphs_are_other_classes_than_the_demos():
  demo_ids = [c for ids in glyphs.Glyphs.SPLIT_CLASSES.values() for c in ids]
  pretrain_ids = [c for ids in glyphs.GlyphsPretrain.SPLIT_CLASSES.values() for c in ids]
  assert len(glyphs.GlyphsPretrain.SPLIT_CLASSES["train"]) >= 1000
  assert sorted(demo_ids) == list(range(glyphs.NUM_CLASSES))
  assert len(set(pretrain_ids)) == len(pretrain_ids) and not set(pretrain_ids) & set(demo_ids)
  # Not only other ids: other glyphs (shapes, colours, layout), none equal to a demo glyph.
  demo_specs = {_spec_key(c) for c in demo_ids}
  assert len(demo_specs) == len(demo_ids)
  assert not {_spec_key(c) for c in pretrain_ids} & demo_specs
  # The same procedure: a pretraining image is rendered as a demo image is.
  (_, _, image), = glyphs.generate([1000], images_per_class=1)
  assert image.shape == (glyphs.IMAGE_SIZE, glyphs.IMAGE_SIZE, 3) and image.dtype == np.uint8


def _resnet18_checkpoint(workdir: str) -> dict:
  """A workdir whose checkpoint holds a randomly initialised ResNet-18 with non-trivial BatchNorm
  statistics, as a training run writes it; returns its model variables."""
  model = models.get("resnet18", embed_dim=8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(0)
  batch_stats = jax.tree.map(lambda x: rng.uniform(0.5, 2.0, x.shape).astype(x.dtype),
                             variables["batch_stats"])
  state = {"params": {"model": variables["params"]}, "batch_stats": batch_stats}
  ckpt = checkpointing.manager(workdir, keep=1)
  checkpointing.save(ckpt, 7, state)
  ckpt.wait_until_finished()
  return {"params": variables["params"], "batch_stats": batch_stats}


def _finetune_model(variant: str, weights_file: str):
  config, _ = config_cli.resolve(f"configs/finetune.py:{variant}",
                                 [f"--config.model.pretrained={weights_file}"])
  return models.get(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(the exported backbone's path, the variables it came from)."""
  tmp = tmp_path_factory.mktemp("export")
  variables = _resnet18_checkpoint(str(tmp / "run"))
  path = str(tmp / "backbone.npz")
  pretrain.export_backbone(str(tmp / "run"), path)
  return path, variables


def test_an_exported_backbone_loads_through_model_pretrained_in_every_finetune_variant(exported):
  path, original = exported
  names = set(np.load(path).files)
  assert "conv1.weight" in names and "layer4.1.bn2.running_var" in names
  assert not any(n.startswith(("head", "fc", "proxies")) for n in names)  # The head is dropped.
  model = _finetune_model("ms", path)
  loaded = jax.jit(model.init)(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32))
  for part in ("params", "batch_stats"):
    got, want = loaded[part]["backbone"], original[part]["backbone"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for variant in finetune.VARIANTS[1:]:
    config = finetune.get_config(variant)
    assert config.model.name == "resnet18" and config.model.pretrained == finetune.PRETRAINED
    assert config.eval.initial_features and config.train.num_steps <= demo.get_config(variant.replace(
        "_continued", "")).train.num_steps


def test_a_finetune_config_refuses_a_foreign_or_corrupt_weights_file(exported, tmp_path):
  path, _ = exported
  state = dict(np.load(path))
  del state["layer4.1.conv2.weight"]
  state["classifier.weight"] = np.zeros((3, 3), np.float32)
  foreign = str(tmp_path / "glyphs_resnet18.npz")  # Named as the demo's: refused, not rebuilt.
  np.savez(foreign, **state)
  pretrain.ensure(foreign)
  with pytest.raises(torch_weights.WeightsError, match="missing.*layer4.1.conv2.weight.*unexpected.*"
                                                       "classifier.weight"):
    _finetune_model("ms", foreign).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  corrupt = str(tmp_path / "corrupt.npz")
  with open(path, "rb") as f:
    data = f.read()
  with open(corrupt, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(torch_weights.WeightsError, match="corrupt.npz"):
    _finetune_model("ms", corrupt).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))


TINY_RECIPE = '''
from tests.test_train import tiny_config


def get_config(variant=""):
  config = tiny_config("unused", num_steps=10)
  config.eval.initial_features = True
  config.eval.nmi = False
  return config
'''


def test_a_missing_model_is_built_once_and_a_run_started_meanwhile_waits_for_it(
    glyphs_dir, tmp_path, monkeypatch, capsys):
  recipe_file = tmp_path / "tiny_recipe.py"
  recipe_file.write_text(TINY_RECIPE)
  monkeypatch.setitem(pretrain.RECIPES, "tiny_backbone.npz",
                      pretrain.Recipe(str(recipe_file), True, "a tiny test backbone"))
  built = []
  build_started = threading.Event()
  real_train = train.train_and_evaluate

  def counted_train(config, workdir):
    built.append(workdir)
    build_started.set()
    time.sleep(1.0)  # Long enough for the second run to find the lock held.
    return real_train(config, workdir)

  monkeypatch.setattr(train, "train_and_evaluate", counted_train)
  path = str(tmp_path / "pretrained" / "tiny_backbone.npz")
  builder = threading.Thread(target=pretrain.ensure, args=(path, glyphs_dir))
  builder.start()
  assert build_started.wait(60)
  waited = time.perf_counter()
  pretrain.ensure(path, glyphs_dir)  # A second run meanwhile: it waits, then finds the model built.
  waited = time.perf_counter() - waited
  builder.join()
  out = capsys.readouterr().out
  assert built == [str(tmp_path / "pretrained" / "tiny_backbone.run")] and waited > 0.5
  assert f"{path} is missing: building it once, a tiny test backbone" in out
  assert f"Waiting for {path}: another process is building it" in out and f"Built {path}" in out
  assert not os.path.exists(f"{path}.partial.npz")
  # The backbone of the run's last checkpoint, torch-named, without its head.
  weights = checkpointing.read_weights(built[0])
  exported_state = np.load(path)
  assert set(exported_state.files) == set(torch_weights.to_state_dict({
      **weights["params"]["backbone"]}).keys()) | {f"{m}.{torch_weights.TORCH_LEAF[leaf]}"
                                                   for m, s in weights["batch_stats"]["backbone"].items()
                                                   for leaf in s}
  # Its step 0 evaluated the initial features beside raw pixels.
  start = reporting.read_metrics(built[0])[0]
  assert start["step"] == 0 and {"baseline/recall@1", "initial/recall@1", "initial/map@r"} <= set(start)
  assert 0 < start["initial/recall@1"] <= 1
  pretrain.ensure(path, glyphs_dir)  # Built: nothing more.
  assert len(built) == 1


def test_pretrain_command_names_the_models_it_builds(tmp_path):
  result = subprocess.run([sys.executable, "-m", "mmsi_jax.pretrain", f"--out={tmp_path}/other.npz"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "glyphs_resnet18.npz" in result.stderr + result.stdout


def _write_run(workdir: str, step0: dict, final: dict, num_steps: int) -> None:
  os.makedirs(workdir)
  with open(os.path.join(workdir, reporting.METRICS_FILE), "w") as f:
    f.write(json.dumps({"step": 0, **step0}) + "\n")
    f.write(json.dumps({"step": num_steps, **{f"test/{k}": v for k, v in final.items()}}) + "\n")


def test_the_comparison_table_leads_with_raw_pixels_and_each_starting_models_features(tmp_path):
  runs = []
  for variant, seed, init_from, initial in (("ms", 0, "", 0.5), ("ms", 1, "", 0.5),
                                            ("mmsi_ms", 0, "x/ms_model", 0.7)):
    config = ml_collections.ConfigDict({"init_from": init_from, "model": {"pretrained": "p/net.npz"},
                                        "train": {"num_steps": 10}})
    workdir = str(tmp_path / variant / f"seed_{seed}")
    _write_run(workdir, {"baseline/recall@1": 0.2, "initial/recall@1": initial},
               {"recall@1": 0.8 + seed / 10}, 10)
    runs.append(compare.Run(variant, seed, workdir, config))
  rows = compare.reference_rows(runs)
  by_name = {row["variant"]: row for row in rows}
  assert list(by_name) == ["raw pixels", "initial features (net.npz)", "initial features (ms_model)"]
  assert by_name["raw pixels"]["finished"] == 3
  assert by_name["raw pixels"]["recall@1_mean"] == pytest.approx(0.2)
  assert by_name["initial features (net.npz)"]["recall@1_mean"] == 0.5
  assert by_name["initial features (net.npz)"]["recall@1_std"] == 0.0
  assert by_name["initial features (ms_model)"]["recall@1_mean"] == 0.7
  path = str(tmp_path / "results.md")
  compare.write_markdown(rows, path, "t")
  with open(path) as f:
    table = f.read()
  assert "| raw pixels | 3/3 | 0.2000 ± 0.0000 |" in table
