"""A trained model in use: `load(path)` gives the embedding function of a run with its preprocessing;
`export_model(workdir, path)` writes the model as one .npz that `load` reads without the training code's state.

    embedder = mmsi_jax.load("runs/demo")          # a workdir, or an exported model.npz
    vectors = embedder.embed_files(["a.jpg", "b.png"])          # [2, D], L2-normalised
    vectors = embedder(images)                                  # uint8 [N, H, W, 3], preprocessed

A workdir holds the run's config (config.json, mmsi_jax/run_record.py) and its orbax checkpoints; the
latest finished checkpoint's model parameters and BatchNorm statistics are read (nothing else of the
run: no optimizer, memories or miner). The preprocessing is the evaluator's: the test transform of the
run's `data` settings (data/transforms.py: resize and centre crop, or the image as stored) and its
normalisation, on the device.

The export (`EXPORT_FORMAT`) is a NumPy .npz: "format", "config" (the run's config.json text) and one
array per variable, "params/<module path>" and "batch_stats/<module path>". It is read with
allow_pickle=False: a model file never runs code. The model is rebuilt from the config (its
`model.pretrained` file is not needed: the weights are the file's), and the file's variables are
checked against the model's, name for name and shape for shape, before any is used.
"""

import json
import os
import zipfile
from typing import Iterable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from mmsi_jax import run_record
from mmsi_jax.data import transforms

EXPORT_FORMAT = "mmsi_jax.model/1"
# The variable collections of a model (models/embedding.py): its parameters and BatchNorm statistics.
COLLECTIONS = ("params", "batch_stats")
# File names `embed_files` and the image directories of mmsi_jax.embed read as images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ModelFileError(ValueError):
  """A workdir or model file that holds no usable model: what is wrong and how to get one."""


class UnreadableImagesError(ValueError):
  """Images that cannot be decoded, listed by file."""


def build_model(config: ml_collections.ConfigDict):
  """The run's model (config.model) without its pretrained weights file: the weights come from the
  checkpoint or the export."""
  from mmsi_jax import models  # pylint: disable=g-import-not-at-top  (flax modules: on first use)
  settings = {k: v for k, v in config.model.items() if k != "name"}
  if "pretrained" in settings:
    settings["pretrained"] = ""
  return models.get(config.model.name, **settings)


def _input_side(config: ml_collections.ConfigDict) -> int:
  """A side of the network input for shape inference: the run's crop, or a common one when the run
  read images as stored (the models pool globally: their variables do not depend on it)."""
  return config.data.image_size or 224


def _checked_variables(model, config: ml_collections.ConfigDict, variables: dict, source: str) -> dict:
  """`variables` ({"params", "batch_stats"}) cast to the model's dtypes, once they match its variables
  name for name and shape for shape; else ModelFileError listing what does not fit."""
  side = _input_side(config)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, side, side, 3)), train=False))
  expected = flax.traverse_util.flatten_dict(
      {c: flax.core.unfreeze(expected.get(c, {})) for c in COLLECTIONS}, sep="/")
  found = flax.traverse_util.flatten_dict(variables, sep="/")
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  misshaped = [f"{k}: {tuple(np.shape(found[k]))} in the file, {expected[k].shape} in the model"
               for k in sorted(set(expected) & set(found)) if np.shape(found[k]) != expected[k].shape]
  if missing or unexpected or misshaped:
    raise ModelFileError(
        f"{source} does not fit the model of its config ({config.model.name}): missing "
        f"{missing[:10]}, unexpected {unexpected[:10]}, mis-shaped {misshaped[:10]}.")
  cast = {k: np.asarray(found[k], dtype=expected[k].dtype) for k in expected}
  variables = flax.traverse_util.unflatten_dict(cast, sep="/")
  return {c: variables.get(c, {}) for c in COLLECTIONS}


class Embedder:
  """A trained model's embedding function with its preprocessing (see the module docstring).

  Attributes:
    config: the run's config.
    model: the Flax model (models/embedding.py).
    variables: {"params": ..., "batch_stats": ...} of the model.
    source: where the model was read from (a workdir or an exported .npz).
    transform: encoded image bytes -> uint8 [H, W, 3], the run's test transform.
  """

  def __init__(self, config: ml_collections.ConfigDict, model, variables: dict, source: str):
    from mmsi_jax.eval import evaluator  # pylint: disable=g-import-not-at-top  (TFDS: on first use)
    self.config = config
    self.model = model
    self.variables = variables
    self.source = source
    self.transform = transforms.test_transform(config.data)
    self._embed = evaluator.make_embed_fn(model, config.data.normalization)

  def __call__(self, images) -> np.ndarray:
    """Embeddings [N, D] (L2-normalised, float32) of preprocessed images, uint8 [N, H, W, 3]."""
    return np.asarray(self._embed(self.variables["params"], self.variables["batch_stats"],
                                  np.asarray(images, np.uint8)))

  def preprocess(self, data: bytes) -> np.ndarray:
    """An encoded image (JPEG, PNG, ...) as the model reads it: uint8 [H, W, 3]."""
    return self.transform(data)

  def embed_files(self, paths: Sequence[str], batch_size: int = 0) -> np.ndarray:
    """Embeddings [N, D] of the image files `paths`, in order, `batch_size` at a time (default: the
    run's data.eval_batch_size), every batch padded to that size (one compilation).

    Raises UnreadableImagesError listing every file that cannot be decoded, before any is embedded
    past the first of them; ValueError when the run reads images as stored (data.image_size = 0) and
    they are not all of one size.
    """
    return self.embed_records(((path, _read(path)) for path in paths), len(paths), batch_size)

  def embed_records(self, records: Iterable[tuple[str, bytes]], count: int,
                    batch_size: int = 0) -> np.ndarray:
    """Embeddings [count, D] of `count` (name, encoded image) records, as `embed_files`."""
    if not count:
      raise ValueError("No images to embed.")
    batch_size = batch_size or self.config.data.eval_batch_size
    outputs, batch, unreadable, first_shape = [], [], [], None
    for name, data in records:
      try:
        image = self.preprocess(data)
      except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        unreadable.append(f"{name} ({type(e).__name__}: {e})")
        continue
      if first_shape is None:
        first_shape = (name, image.shape)
      elif image.shape != first_shape[1]:
        raise ValueError(
            f"This model reads images as they are stored (data.image_size = 0 in its config) and "
            f"batches them: {first_shape[0]} is {first_shape[1][1]}x{first_shape[1][0]} but {name} is "
            f"{image.shape[1]}x{image.shape[0]}. Resize the images to the size the model was trained "
            f"on.")
      if unreadable:  # Only looking for more unreadable files from here on.
        continue
      batch.append(image)
      if len(batch) == batch_size:
        outputs.append(self(np.stack(batch)))
        batch = []
    if unreadable:
      raise UnreadableImagesError(
          f"{len(unreadable)} of {count} images cannot be read: " + "; ".join(unreadable[:20])
          + (" ..." if len(unreadable) > 20 else "") + ". Remove or replace them.")
    if batch:
      padded = np.zeros((batch_size, *batch[0].shape), np.uint8)
      padded[:len(batch)] = batch
      outputs.append(self(padded)[:len(batch)])
    return np.concatenate(outputs)


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, run_record.CONFIG_FILE)
  if not os.path.isfile(path):
    raise ModelFileError(
        f"{workdir} holds no {run_record.CONFIG_FILE}: it is not the workdir of a run "
        f"(python -m mmsi_jax.main --config=... --workdir={workdir}), nor an exported model (.npz).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _workdir_variables(workdir: str) -> dict:
  from mmsi_jax import checkpointing  # pylint: disable=g-import-not-at-top  (orbax: on first use)
  try:
    return checkpointing.read_weights(workdir)
  except FileNotFoundError:
    raise ModelFileError(
        f"{workdir} holds no finished checkpoint yet: a run writes one every "
        f"train.checkpoint_every steps and at its end. Let the run (the same command) go on.") from None


def _read_export(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, variables) of an exported model file."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise ModelFileError(f"{path} is not a readable .npz ({type(e).__name__}: {e}); is it complete? "
                         f"Export the model again (python -m mmsi_jax.export).") from None
  if "format" not in arrays or "config" not in arrays:
    raise ModelFileError(
        f"{path} is not a model exported by mmsi_jax (no 'format' and 'config' entries); a torch "
        f"state dict of a backbone is read through --config.model.pretrained instead.")
  if str(arrays["format"]) != EXPORT_FORMAT:
    raise ModelFileError(f"{path} is of format {str(arrays['format'])!r}; this version reads "
                         f"{EXPORT_FORMAT!r}.")
  try:
    config = ml_collections.ConfigDict(json.loads(str(arrays.pop("config"))))
  except json.JSONDecodeError as e:
    raise ModelFileError(f"{path}: its config is not valid JSON ({e}).") from None
  del arrays["format"]
  variables = flax.traverse_util.unflatten_dict(arrays, sep="/")
  return config, variables


def load(path: str) -> Embedder:
  """The model of a workdir (its latest finished checkpoint) or of an exported .npz, as an Embedder.

  Raises ModelFileError when `path` holds no usable model, saying why and what to do.
  """
  if os.path.isdir(path):
    config = _workdir_config(path)
    variables = _workdir_variables(path)
  elif os.path.isfile(path):
    config, variables = _read_export(path)
  else:
    raise ModelFileError(f"{path}: no such workdir or model file.")
  model = build_model(config)
  return Embedder(config, model, _checked_variables(model, config, variables, path), path)


def export_model(workdir: str, path: str) -> None:
  """Writes the model of `workdir` (its latest finished checkpoint) with its config to `path` (.npz,
  format `EXPORT_FORMAT`), atomically: a file at `path` is always complete."""
  config = _workdir_config(workdir)
  variables = _workdir_variables(workdir)
  with open(os.path.join(workdir, run_record.CONFIG_FILE)) as f:
    config_text = f.read()
  model = build_model(config)
  variables = _checked_variables(model, config, variables, workdir)
  arrays = {"format": np.array(EXPORT_FORMAT), "config": np.array(config_text),
            **flax.traverse_util.flatten_dict(jax.device_get(variables), sep="/")}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = f"{path}.partial"
  with open(partial, "wb") as f:
    np.savez(f, **arrays)
  os.replace(partial, path)


def image_files(directory: str) -> list[str]:
  """The image files (by suffix, IMAGE_SUFFIXES) under `directory`, recursively, sorted by path."""
  found = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    found += [os.path.join(root, name) for name in sorted(files)
              if name.lower().endswith(IMAGE_SUFFIXES)]
  return found


__all__ = ["EXPORT_FORMAT", "Embedder", "ModelFileError", "UnreadableImagesError", "export_model",
           "image_files", "load"]
