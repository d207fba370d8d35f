"""A trained model in use: mmsi_jax.load of a workdir and of its export, the embed, search and export
commands, and their errors on a workdir without a checkpoint, corrupt files and unreadable images."""

import io
import os

import jax
import numpy as np
from PIL import Image
import pytest

from mmsi_jax import checkpointing, embed, export, inference, run_record, search
from mmsi_jax.data import pipeline, transforms
from mmsi_jax.models import MODEL_PARAMS
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def workdir(glyphs_dir, tmp_path_factory):
  """The workdir of a run of tiny_config with one checkpoint (its model freshly initialised; written
  as the trainer writes them: config.json and an orbax TrainState holding params/model)."""
  path = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(glyphs_dir)
  run_record.record(path, config)
  model = inference.build_model(config)
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  mngr = checkpointing.manager(path, keep=1)
  checkpointing.save(mngr, 3, {"step": np.int32(3), "params": {MODEL_PARAMS: variables["params"]},
                               "batch_stats": variables.get("batch_stats", {})})
  mngr.wait_until_finished()
  return path


@pytest.fixture(scope="module")
def image_dir(glyphs_dir, tmp_path_factory):
  """3 classes x 3 images of the Glyphs test split as PNG files in class subdirectories."""
  root = tmp_path_factory.mktemp("images")
  source = pipeline.load_split("glyphs", "test", glyphs_dir, decode_images=False)
  labels = pipeline.split_labels(source)
  for label in range(3):
    folder = root / f"class{label:03d}"
    folder.mkdir()
    for number, index in enumerate(np.flatnonzero(labels == label)[:3]):
      (folder / f"{number}.png").write_bytes(source[int(index)]["image"])
  return root


def test_load_reads_a_workdir_and_its_export_alike(workdir, image_dir, tmp_path):
  embedder = inference.load(workdir)
  paths = inference.image_files(str(image_dir))
  vectors = embedder.embed_files(paths, batch_size=4)  # Two full batches and a padded one.
  assert vectors.shape == (9, 16)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
  images = np.stack([transforms.decode_image(open(p, "rb").read()) for p in paths])
  reference = embedder.model.apply(embedder.variables, transforms.normalize(images, "symmetric"),
                                   train=False)
  np.testing.assert_allclose(vectors, reference, atol=1e-5)

  exported = str(tmp_path / "model.npz")
  assert export.main([f"--workdir={workdir}", f"--out={exported}"]) == 0
  np.testing.assert_array_equal(inference.load(exported).embed_files(paths, batch_size=4), vectors)


def test_embed_and_search_commands(workdir, image_dir, glyphs_dir, tmp_path, capsys):
  index_path = str(tmp_path / "index.npz")
  assert embed.main([f"--workdir={workdir}", f"--images={image_dir}", f"--out={index_path}"]) == 0
  with np.load(index_path, allow_pickle=False) as f:
    index = {k: f[k] for k in f.files}
  assert list(index["ids"])[:2] == [os.path.join("class000", "0.png"), os.path.join("class000", "1.png")]
  assert list(index["classes"]) == ["class000", "class001", "class002"]
  np.testing.assert_array_equal(index["labels"], np.repeat([0, 1, 2], 3))

  assert "9 embeddings of 16 dimensions, 3 classes" in capsys.readouterr().out
  query = str(image_dir / "class001" / "2.png")
  figure = str(tmp_path / "search.png")
  assert search.main([f"--index={index_path}", f"--query={query}", "--k=3",
                      f"--figure={figure}"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[1].split()[1:] == ["1.0000", os.path.join("class001", "2.png"), "class",
                                    "class001"]  # The query itself is in the index.
  assert Image.open(figure).size[0] > 100

  # A prepared dataset split, with its labels; searched with a directory of queries.
  split_index = str(tmp_path / "split.npz")
  assert embed.main([f"--workdir={workdir}", "--images=glyphs/test", f"--data_dir={glyphs_dir}",
                     f"--out={split_index}"]) == 0
  with np.load(split_index, allow_pickle=False) as f:
    assert f["vectors"].shape == (2400, 16) and f["labels"].max() == 99
    assert str(f["ids"][0]).endswith(".png")
  assert search.main([f"--index={split_index}", f"--query={image_dir}", "--k=2", "--figure="]) == 0
  assert "class002/" in capsys.readouterr().out


def test_a_model_file_that_is_not_one_is_refused(workdir, tmp_path):
  no_checkpoint = tmp_path / "new_run"
  no_checkpoint.mkdir()
  (no_checkpoint / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  with pytest.raises(inference.ModelFileError, match="no finished checkpoint yet"):
    inference.load(str(no_checkpoint))
  with pytest.raises(inference.ModelFileError, match="holds no config.json"):
    inference.load(str(tmp_path))
  with pytest.raises(inference.ModelFileError, match="no such workdir or model file"):
    inference.load(str(tmp_path / "missing"))

  exported = tmp_path / "model.npz"
  export.main([f"--workdir={workdir}", f"--out={exported}"])
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(exported.read_bytes()[:2000])
  with pytest.raises(inference.ModelFileError, match="not a readable .npz"):
    inference.load(str(truncated))
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, format=np.array(inference.EXPORT_FORMAT), config=np.array([{"code": 1}], object))
  with pytest.raises(inference.ModelFileError, match="not a readable .npz"):  # Never unpickled.
    inference.load(str(pickled))
  state_dict = tmp_path / "backbone.npz"
  np.savez(state_dict, **{"conv1.weight": np.zeros((2, 3, 3, 3), np.float32)})
  with pytest.raises(inference.ModelFileError, match="not a model exported by mmsi_jax"):
    inference.load(str(state_dict))
  with np.load(exported, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  arrays["params/head/kernel"] = np.zeros((3, 3), np.float32)
  misshaped = tmp_path / "misshaped.npz"
  np.savez(misshaped, **arrays)
  with pytest.raises(inference.ModelFileError, match=r"mis-shaped \['params/head/kernel"):
    inference.load(str(misshaped))


def test_unreadable_images_are_named(workdir, image_dir, tmp_path, capsys):
  broken = tmp_path / "images"
  broken.mkdir()
  for i, path in enumerate(inference.image_files(str(image_dir))[:3]):
    (broken / f"{i}.png").write_bytes(open(path, "rb").read())
  (broken / "corrupt.png").write_bytes(b"\x89PNG not really")
  (broken / "notes.txt").write_text("not an image: ignored")
  assert embed.main([f"--workdir={workdir}", f"--images={broken}",
                     f"--out={tmp_path / 'index.npz'}"]) == 1
  error = capsys.readouterr().err
  assert "1 of 4 images cannot be read: " in error and "corrupt.png" in error
  assert not (tmp_path / "index.npz").exists()
  big = io.BytesIO()
  Image.new("RGB", (40, 32)).save(big, format="PNG")
  (broken / "corrupt.png").write_bytes(big.getvalue())
  assert embed.main([f"--workdir={workdir}", f"--images={broken}",
                     f"--out={tmp_path / 'index.npz'}"]) == 1
  assert "Resize the images" in capsys.readouterr().err
