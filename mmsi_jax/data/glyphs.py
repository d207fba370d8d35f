"""Glyphs: the built-in, procedurally generated retrieval dataset.

Every class is a "glyph": a seeded arrangement of three coloured primitive shapes. Every image of a class
renders that glyph under a random similarity transform (rotation, scale, translation), a per-image colour
cast and over a random cluttered background (a colour gradient, distractor shapes and pixel noise). Two
images of one class therefore share their shapes, colours and layout but little of their pixels, so raw
pixels retrieve poorly while a learned embedding can do well: a small retrieval problem with the same
protocol as CUB-200-2011 (train on the first half of the classes, test on the unseen second half).

The generator is a pure function of its seed, so every machine builds bit-identical images; the TFDS builder
`Glyphs` writes them as PNG bytes to array_record, read back with `tfds.data_source`.

`GlyphsPretrain` ("glyphs_pretrain") is the demo's ImageNet: 1,000 other glyphs (classes 1000-1999) for
classification pretraining, and 100 more (2000-2099) to evaluate its features on unseen classes, drawn
by the same procedure from a smaller vocabulary of parts (PRETRAIN_KINDS, PRETRAIN_COLORS). No class id,
hence no glyph, is shared with the 200 demo classes (0-199).
"""

import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mmsi_jax.data import schema

NUM_CLASSES = 200
IMAGES_PER_CLASS = 24
IMAGE_SIZE = 32
SEED = 20261122

_SUPERSAMPLE = 2
_PARTS_PER_GLYPH = 3
_DISTRACTORS_PER_IMAGE = 2
_PALETTE = np.array(
    [
        [0.90, 0.10, 0.10], [0.10, 0.70, 0.10], [0.15, 0.25, 0.95], [0.95, 0.85, 0.10],
        [0.85, 0.15, 0.85], [0.10, 0.85, 0.85], [0.95, 0.55, 0.05], [0.55, 0.25, 0.05],
        [0.97, 0.97, 0.97], [0.05, 0.05, 0.05], [0.55, 0.55, 0.55], [0.50, 0.85, 0.40],
    ],
    dtype=np.float32,
)


def _shape_mask(kind: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Coverage of a unit-sized primitive at local coordinates (x, y): [H, W] bool."""
  r2 = x * x + y * y
  if kind == 0:  # disc
    return r2 < 1.0
  if kind == 1:  # square
    return np.maximum(np.abs(x), np.abs(y)) < 0.85
  if kind == 2:  # triangle
    return (y < 0.75) & (y > 1.7 * np.abs(x) - 0.95)
  if kind == 3:  # ring
    return (r2 < 1.0) & (r2 > 0.36)
  if kind == 4:  # cross
    return ((np.abs(x) < 0.3) & (np.abs(y) < 1.0)) | ((np.abs(y) < 0.3) & (np.abs(x) < 1.0))
  if kind == 5:  # bar
    return (np.abs(x) < 1.0) & (np.abs(y) < 0.35)
  if kind == 6:  # diamond
    return np.abs(x) + np.abs(y) < 1.0
  if kind == 7:  # half disc
    return (r2 < 1.0) & (y > 0.0)
  raise ValueError(f"unknown shape kind {kind}")


_NUM_SHAPE_KINDS = 8


ALL_KINDS = tuple(range(_NUM_SHAPE_KINDS))
ALL_COLORS = tuple(range(len(_PALETTE)))
# The pretraining glyphs' parts: disc, square, triangle, ring in red, green, blue, yellow, white, black.
# The demo's glyphs also have crosses, bars, diamonds and half discs, in 6 more colours: features
# learnt on the pretraining glyphs transfer but do not know every part the demo tells apart, as
# ImageNet's features do not know every detail that separates CUB's birds.
PRETRAIN_KINDS = (0, 1, 2, 3)
PRETRAIN_COLORS = (0, 1, 2, 3, 8, 9)


def glyph_spec(class_seed: int, kinds: tuple = ALL_KINDS, colors: tuple = ALL_COLORS) -> dict:
  """The fixed description of one class: its parts' shapes (of `kinds`), colours (of `colors`, indices
  of the palette), offsets, sizes and orientations."""
  rng = np.random.default_rng(class_seed)
  return {
      "kind": np.asarray(kinds)[rng.integers(0, len(kinds), _PARTS_PER_GLYPH)],
      "color": np.asarray(colors)[rng.choice(len(colors), _PARTS_PER_GLYPH, replace=False)],
      "offset": rng.uniform(-0.45, 0.45, (_PARTS_PER_GLYPH, 2)),
      "size": rng.uniform(0.18, 0.32, _PARTS_PER_GLYPH),
      "angle": rng.uniform(0.0, 2 * np.pi, _PARTS_PER_GLYPH),
  }


def _paint(canvas, xs, ys, kind, color, cx, cy, size, angle):
  """Paints one primitive centred at (cx, cy) with the given size and rotation onto canvas [H, W, 3]."""
  c, s = np.cos(angle), np.sin(angle)
  dx, dy = xs - cx, ys - cy
  lx = (c * dx + s * dy) / size
  ly = (-s * dx + c * dy) / size
  canvas[_shape_mask(kind, lx, ly)] = color


def render(spec: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
  """Renders one image of the glyph `spec` with nuisances drawn from `rng`: [size, size, 3] uint8."""
  hi = size * _SUPERSAMPLE
  coords = (np.arange(hi, dtype=np.float32) + 0.5) / hi * 2.0 - 1.0  # [-1, 1]
  ys, xs = np.meshgrid(coords, coords, indexing="ij")

  # Background: a linear gradient between two random colours.
  c0, c1 = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
  direction = rng.uniform(0.0, 2 * np.pi)
  t = (np.cos(direction) * xs + np.sin(direction) * ys + 1.0) / 2.0
  canvas = c0 * (1.0 - t[..., None]) + c1 * t[..., None]

  for _ in range(_DISTRACTORS_PER_IMAGE):
    _paint(canvas, xs, ys, rng.integers(_NUM_SHAPE_KINDS), rng.uniform(0.0, 1.0, 3),
           *rng.uniform(-0.9, 0.9, 2), rng.uniform(0.08, 0.16), rng.uniform(0.0, 2 * np.pi))

  # The glyph under a random similarity transform.
  rotation = rng.uniform(-np.pi / 4, np.pi / 4)
  scale = rng.uniform(0.8, 1.15)
  shift = rng.uniform(-0.2, 0.2, 2)
  c, s = np.cos(rotation), np.sin(rotation)
  for kind, color_index, (ox, oy), part_size, angle in zip(
      spec["kind"], spec["color"], spec["offset"], spec["size"], spec["angle"]):
    cx = scale * (c * ox - s * oy) + shift[0]
    cy = scale * (s * ox + c * oy) + shift[1]
    _paint(canvas, xs, ys, kind, _PALETTE[color_index], cx, cy, scale * part_size, angle + rotation)

  canvas = canvas * rng.uniform(0.75, 1.25, 3)  # colour cast
  canvas = canvas.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
  canvas = canvas + rng.normal(0.0, 0.04, canvas.shape)
  return np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)


def generate(class_ids, images_per_class: int = IMAGES_PER_CLASS, seed: int = SEED,
             size: int = IMAGE_SIZE, kinds: tuple = ALL_KINDS, colors: tuple = ALL_COLORS):
  """Yields (class_id, image_index, image [size, size, 3] uint8) for the given classes, deterministically;
  the glyphs' parts of `kinds` and `colors` (glyph_spec)."""
  for class_id in class_ids:
    spec = glyph_spec(seed * 100_003 + int(class_id), kinds, colors)
    rng = np.random.default_rng([seed, int(class_id)])
    for image_index in range(images_per_class):
      yield int(class_id), image_index, render(spec, rng, size)


def encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class Glyphs(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for the Glyphs dataset: splits `train` (classes 0-99) and `test` (classes 100-199)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "200 classes x 24 images, 32 px RGB."}
  SPLIT_CLASSES = {"train": range(0, NUM_CLASSES // 2), "test": range(NUM_CLASSES // 2, NUM_CLASSES)}
  PARTS = {"kinds": ALL_KINDS, "colors": ALL_COLORS}  # glyph_spec's vocabulary.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=schema.example_features(
            tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png")),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is generated.
    return {split: self._generate_examples(class_ids) for split, class_ids in self.SPLIT_CLASSES.items()}

  def _generate_examples(self, class_ids):
    first = class_ids[0]
    for class_id, image_index, image in generate(class_ids, **self.PARTS):
      name = f"glyph{class_id:03d}_{image_index:02d}.png"
      yield name, {"image": encode_png(image), "label": class_id - first, "class_id": class_id,
                   "file_name": name}


class GlyphsPretrain(Glyphs):
  """TFDS builder of the pretraining glyphs: `train` (classes 1000-1999, labels 0-999) for
  classification, `test` (classes 2000-2099) to evaluate the features on classes pretraining never saw;
  disjoint from the demo's classes 0-199, their parts of PRETRAIN_KINDS and PRETRAIN_COLORS."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "1,000 + 100 classes x 24 images, 32 px RGB, 4 part shapes, 6 colours."}
  SPLIT_CLASSES = {"train": range(1000, 2000), "test": range(2000, 2100)}
  PARTS = {"kinds": PRETRAIN_KINDS, "colors": PRETRAIN_COLORS}
