"""Host transforms (random-resized crop, resize + centre crop, pad-crop) and device normalisations."""

import io

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from mmsi_jax.data import transforms


def photo_jpeg(width: int, height: int) -> bytes:
  """A smooth colour gradient as JPEG, so that decoding at reduced scale changes little."""
  ys, xs = np.mgrid[0:height, 0:width]
  image = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], -1)
  buffer = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def test_random_resized_box_respects_scale_ratio_and_bounds():
  rng = np.random.default_rng(0)
  for _ in range(500):
    left, top, right, bottom = transforms.random_resized_box(500, 375, rng, (0.16, 1.0), (3 / 4, 4 / 3))
    assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
    width, height = right - left, bottom - top
    assert 0.155 <= width * height / (500 * 375) <= 1.0
    assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02


def test_random_resized_box_falls_back_to_a_centred_crop_on_extreme_shapes():
  box = transforms.random_resized_box(1000, 10, np.random.default_rng(0), (0.9, 1.0), (1.0, 1.0))
  assert box == (495.0, 0.0, 505.0, 10.0)


def test_random_resized_crop_is_a_pure_function_of_the_rng():
  data = photo_jpeg(500, 375)
  crop = transforms.RandomResizedCrop(227)
  first = crop(data, np.random.default_rng([1, 2, 3]))
  assert first.shape == (227, 227, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, crop(data, np.random.default_rng([1, 2, 3])))
  assert not np.array_equal(first, crop(data, np.random.default_rng([1, 2, 4])))


def test_resize_center_crop_matches_full_resolution_resize_then_crop():
  data = photo_jpeg(1024, 768)  # Large enough to be decoded at reduced DCT scale.
  ours = transforms.ResizeCenterCrop(resize=256, size=227)(data).astype(np.float32)
  full = Image.open(io.BytesIO(data)).convert("RGB").resize((341, 256), Image.Resampling.BILINEAR)
  offset_x, offset_y = (341 - 227) // 2, (256 - 227) // 2
  reference = np.asarray(full)[offset_y:offset_y + 227, offset_x:offset_x + 227].astype(np.float32)
  assert ours.shape == (227, 227, 3)
  assert np.abs(ours - reference).mean() < 3.0


def test_pad_crop_translates_and_flips():
  data = photo_jpeg(32, 32)
  image = transforms.decode_image(data)
  assert np.array_equal(transforms.PadCrop(0, False)(data, np.random.default_rng(0)), image)
  moved = transforms.PadCrop(2, True)(data, np.random.default_rng(5))
  assert moved.shape == image.shape and not np.array_equal(moved, image)


def test_decode_converts_grayscale_to_rgb():
  buffer = io.BytesIO()
  Image.fromarray(np.full((6, 8), 200, np.uint8)).save(buffer, format="JPEG")
  assert transforms.decode_image(buffer.getvalue()).shape == (6, 8, 3)


def test_normalizations():
  pixel = jnp.array([[[[255, 128, 0]]]], jnp.uint8)  # RGB
  np.testing.assert_allclose(transforms.normalize(pixel, "symmetric")[0, 0, 0],
                             [1.0, 128 / 127.5 - 1, -1.0], atol=1e-6)
  np.testing.assert_allclose(transforms.normalize(pixel, "imagenet")[0, 0, 0],
                             [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, -0.406 / 0.225],
                             rtol=1e-5)
  np.testing.assert_allclose(transforms.normalize(pixel, "caffe_bgr")[0, 0, 0],
                             [0 - 104, 128 - 117, 255 - 128])  # B, G, R
  with pytest.raises(ValueError, match="Unknown normalization"):
    transforms.normalize(pixel, "zca")
