"""Input pipeline throughput: the train transform against a plain PIL decode-and-crop loop.

  python -m mmsi_jax.bench input --json PATH

On synthetic photographs (JPEG, quality 90, CUB-like 500 x 375 by default), measured in this run:
- plain_pil_images_per_core_s: decode the whole JPEG with PIL, convert to RGB, crop a random 227 x 227
  window (no resizing), to numpy; images per CPU-second of one thread (the baseline);
- train_transform_images_per_core_s: our train transform (random-resized crop to 227, scale 0.16 to 1,
  flip); test_transform_images_per_core_s: resize 256 + centre crop 227; same units;
- cores_to_feed_3000_images_s: 3,000 / train_transform_images_per_core_s (one H100 on ResNet-50);
- pipeline_images_per_core_s: PK batches of 16 x 5 through grain in this process (2 threads), images per
  CPU-second of the process: the transform plus the pipeline's own overhead;
- pipeline_wall_images_s: the same with --workers worker processes, wall clock, after the workers have
  started: bounded by the cores free on this machine (load_average_1min says how busy it was);
- pk_sampler_batches_s: PKSampler.batch_indices at SOP scale (11,318 classes of 2 to 12 images).
Per-core figures use the process's CPU time, so other load on a shared machine changes them little.
"""

import argparse
import io
import os
import time

import numpy as np
from PIL import Image

from mmsi_jax.data import pipeline, transforms
from mmsi_jax.data.sampler import PKSampler

FEED_RATE = 3_000  # Images/s that one H100 consumes training ResNet-50 at 224 px.


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--images", type=int, default=64, help="distinct synthetic JPEGs")
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--size", type=int, default=227, help="output side")
  parser.add_argument("--seconds", type=float, default=3.0, help="minimum CPU time per measurement")
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="pipeline worker processes")
  parser.add_argument("--steps", type=int, default=40, help="pipeline batches of 16 x 5 timed")


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A photograph-like JPEG: smooth colour fields, a few edges and sensor noise."""
  coarse = rng.uniform(0, 255, (height // 25 + 2, width // 25 + 2, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), float)
  for _ in range(6):  # Hard-edged blocks.
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    image[y0:y0 + rng.integers(10, 120), x0:x0 + rng.integers(10, 120)] = rng.uniform(0, 255, 3)
  image += rng.normal(0, 6, image.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def plain_pil_crop(data: bytes, rng: np.random.Generator, size: int) -> np.ndarray:
  """The baseline: full decode, RGB, a random size x size window, to numpy."""
  with Image.open(io.BytesIO(data)) as image:
    image = image.convert("RGB")
    left = int(rng.integers(0, image.width - size + 1))
    top = int(rng.integers(0, image.height - size + 1))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def images_per_cpu_second(fn, images: list, min_seconds: float) -> float:
  """Images per CPU-second of this thread running fn(data, rng) over `images` repeatedly."""
  rng = np.random.default_rng(0)
  fn(images[0], rng)  # Warm-up.
  done, start = 0, time.thread_time()
  while time.thread_time() - start < min_seconds:
    for data in images:
      fn(data, rng)
    done += len(images)
  return done / (time.thread_time() - start)


class InMemorySource:
  """A random-access source of {"image": bytes, "label"} records held in memory."""

  def __init__(self, images: list, labels: np.ndarray):
    self._records = [{"image": data, "label": int(label)} for data, label in zip(images, labels)]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return self._records[index]

  def __getitems__(self, indices) -> list[dict]:
    return [self._records[i] for i in indices]


def pipeline_images_per_second(images: list, size: int, workers: int, steps: int,
                               clock=time.perf_counter) -> float:
  """Images/s of PK batches (16 x 5) from train_batches, by `clock`, after the workers have started."""
  labels = np.arange(len(images)) % (len(images) // 4)
  source = InMemorySource(images, labels)
  sampler = PKSampler(labels, 16, 5, seed=0)
  batches = pipeline.train_batches(source, sampler, transform=transforms.RandomResizedCrop(size),
                                   start_step=0, num_steps=steps + workers + 1, seed=0,
                                   num_threads=2, num_workers=workers, prefetch=max(2 * workers, 2))
  for _ in range(workers + 1):
    next(batches)
  start = clock()
  for _ in range(steps):
    next(batches)
  return steps * sampler.batch_size / (clock() - start)


def pk_sampler_batches_per_second(min_seconds: float) -> float:
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(11_318), rng.integers(2, 13, 11_318))
  sampler = PKSampler(labels, 16, 5, seed=0)
  step, start = 0, time.perf_counter()
  while time.perf_counter() - start < min_seconds:
    sampler.batch_indices(step)
    step += 1
  return step / (time.perf_counter() - start)


def run(args) -> dict:
  rng = np.random.default_rng(0)
  images = [synthetic_jpeg(rng, args.width, args.height) for _ in range(args.images)]
  train = transforms.RandomResizedCrop(args.size)
  test = transforms.ResizeCenterCrop(round(args.size * 256 / 227), args.size)
  plain = images_per_cpu_second(lambda d, r: plain_pil_crop(d, r, args.size), images, args.seconds)
  ours = images_per_cpu_second(train, images, args.seconds)
  return {
      "image_px": f"{args.width}x{args.height} -> {args.size}x{args.size}",
      "mean_jpeg_kb": float(np.mean([len(d) for d in images]) / 1024),
      "plain_pil_images_per_core_s": plain,
      "train_transform_images_per_core_s": ours,
      "train_vs_plain_pil": ours / plain,
      "test_transform_images_per_core_s": images_per_cpu_second(
          lambda d, r: test(d), images, args.seconds),
      "cores_to_feed_3000_images_s": FEED_RATE / ours,
      "pipeline_images_per_core_s": pipeline_images_per_second(
          images, args.size, 0, args.steps, clock=time.process_time),
      "pipeline_workers": args.workers,
      "pipeline_wall_images_s": pipeline_images_per_second(images, args.size, args.workers, args.steps),
      "load_average_1min": os.getloadavg()[0],
      "pk_sampler_batches_s": pk_sampler_batches_per_second(1.0),
  }
