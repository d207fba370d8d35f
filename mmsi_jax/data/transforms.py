"""Image transforms: encoded bytes -> uint8 [H, W, 3] on the host, normalisation on the device.

Host side (in the input workers): decoding, train augmentation and the test transform. They output uint8,
so a batch crosses to the accelerator at a quarter of the bytes of float32.

  PadCrop             train: reflect-pad by `padding`, crop back to the input size (a random translation).
  RandomResizedCrop   train: a random crop with area fraction in `scale` and aspect ratio (width / height)
                      in `ratio`, resized to size x size.
  ResizeCenterCrop    test: shorter side resized to `resize`, then the centre size x size.
  CenterCropTrain     train without augmentation: the test transform (train_crop "center").
  Decode              test: the stored image as it is.

Both crops of JPEG input decode at reduced resolution when the crop is at least twice the output size
(libjpeg's DCT scaling, `PIL.Image.draft`), which skips most of the decoding work for large photographs.

Device side (inside the jitted step): `normalize(images, method)` with method
  "symmetric"   x / 127.5 - 1, in [-1, 1];
  "imagenet"    RGB in [0, 1], minus the ImageNet mean, divided by its standard deviation (torchvision models);
  "caffe_bgr"   channels reversed to BGR, 0-255, minus the Caffe mean (104, 117, 128) (BN-Inception).
It fuses into the first layer, costs the host nothing and keeps the host-to-device transfer in uint8.

Every host transform is a frozen dataclass, so it pickles into worker processes.
"""

import dataclasses
import io
import math

import jax.numpy as jnp
import numpy as np
from PIL import Image

NORMALIZATIONS = ("symmetric", "imagenet", "caffe_bgr")
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (104.0, 117.0, 128.0)


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> [H, W, 3] uint8 RGB (grayscale and CMYK converted)."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def _flip(image: np.ndarray, rng: np.random.Generator, flip: bool) -> np.ndarray:
  return image[:, ::-1] if flip and rng.random() < 0.5 else image


def _resized_crop(data: bytes, box: tuple, size: int, crop_size: float) -> np.ndarray:
  """The region box = (left, top, right, bottom) of the encoded image, resized to [size, size, 3] uint8.

  JPEG input is decoded at the smallest DCT scale that keeps the crop's shorter side (crop_size) at
  least `size` pixels.
  """
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size
    reduction = max(crop_size / size, 1.0)
    image.draft("RGB", (math.ceil(width / reduction), math.ceil(height / reduction)))
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    left, top, right, bottom = box
    scaled_box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=scaled_box)
    return np.asarray(resized.convert("RGB"))


def image_size(data: bytes) -> tuple[int, int]:
  """(width, height) of an encoded image, read from its header."""
  with Image.open(io.BytesIO(data)) as image:
    return image.size


def random_resized_box(width: int, height: int, rng: np.random.Generator, scale: tuple,
                       ratio: tuple) -> tuple[float, float, float, float]:
  """A random crop (left, top, right, bottom) with area in scale * W * H and width / height in ratio.

  Tries 10 draws; if none fits the image, falls back to the largest centred crop with the ratio clamped
  into the range.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = round(math.sqrt(target_area * aspect))
    crop_h = round(math.sqrt(target_area / aspect))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      left = int(rng.integers(0, width - crop_w + 1))
      top = int(rng.integers(0, height - crop_h + 1))
      return left, top, left + crop_w, top + crop_h
  aspect = min(max(width / height, ratio[0]), ratio[1])
  crop_w, crop_h = (width, round(width / aspect)) if width / height < aspect else (
      round(height * aspect), height)
  left, top = (width - crop_w) / 2, (height - crop_h) / 2
  return left, top, left + crop_w, top + crop_h


@dataclasses.dataclass(frozen=True)
class PadCrop:
  """Train: reflect-pad by `padding` pixels, crop back to the original size, optional horizontal flip."""
  padding: int
  flip: bool

  def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
    image = decode_image(data)
    if self.padding:
      height, width = image.shape[:2]
      pad = ((self.padding,) * 2, (self.padding,) * 2, (0, 0))
      top, left = rng.integers(0, 2 * self.padding + 1, 2)
      image = np.pad(image, pad, mode="reflect")[top:top + height, left:left + width]
    return _flip(image, rng, self.flip)


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
  """Train: random-resized crop to [size, size, 3] (area fraction in scale, width / height in ratio), flip."""
  size: int
  scale: tuple = (0.16, 1.0)
  ratio: tuple = (3 / 4, 4 / 3)
  flip: bool = True

  def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
    box = random_resized_box(*image_size(data), rng, self.scale, self.ratio)
    crop_size = min(box[2] - box[0], box[3] - box[1])
    return _flip(_resized_crop(data, box, self.size, crop_size), rng, self.flip)


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop:
  """Test: shorter side resized to `resize`, then the centre [size, size, 3]."""
  resize: int
  size: int

  def __call__(self, data: bytes) -> np.ndarray:
    width, height = image_size(data)
    crop_size = self.size * min(width, height) / self.resize  # The output window in input pixels.
    left, top = (width - crop_size) / 2, (height - crop_size) / 2
    return _resized_crop(data, (left, top, left + crop_size, top + crop_size), self.size, crop_size)


@dataclasses.dataclass(frozen=True)
class Decode:
  """Test: the stored image as it is."""

  def __call__(self, data: bytes) -> np.ndarray:
    return decode_image(data)


@dataclasses.dataclass(frozen=True)
class CenterCropTrain:
  """Train without augmentation (as OSM + CAA's authors): shorter side to `resize`, centre size x size."""
  resize: int
  size: int

  def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
    del rng
    return ResizeCenterCrop(self.resize, self.size)(data)


def train_transform(data_config):
  """The train transform selected by config.data (train_crop, image_size, crop_*, flip)."""
  if data_config.train_crop == "center":
    return CenterCropTrain(data_config.resize_size, data_config.image_size)
  if data_config.train_crop == "pad":
    return PadCrop(data_config.crop_padding, data_config.flip)
  if data_config.train_crop == "random_resized":
    return RandomResizedCrop(data_config.image_size, tuple(data_config.crop_scale),
                             tuple(data_config.crop_ratio), data_config.flip)
  raise ValueError(f"data.train_crop={data_config.train_crop!r} is not 'pad', 'random_resized' or "
                   f"'center'.")


def test_transform(data_config):
  """The test transform selected by config.data: ResizeCenterCrop when image_size > 0, else Decode."""
  if data_config.image_size > 0:
    return ResizeCenterCrop(data_config.resize_size, data_config.image_size)
  return Decode()


def normalize(images: jnp.ndarray, method: str) -> jnp.ndarray:
  """uint8 [N, H, W, 3] RGB -> float32 [N, H, W, 3], normalised by `method` (see the module docstring)."""
  x = images.astype(jnp.float32)
  if method == "symmetric":
    return x / 127.5 - 1.0
  if method == "imagenet":
    return (x / 255.0 - jnp.array(IMAGENET_MEAN_RGB)) / jnp.array(IMAGENET_STD_RGB)
  if method == "caffe_bgr":
    return x[..., ::-1] - jnp.array(CAFFE_MEAN_BGR)
  raise ValueError(f"Unknown normalization {method!r}; known: {NORMALIZATIONS}.")
