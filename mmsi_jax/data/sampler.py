"""Training batches, a pure function of (seed, step): PK batches of P classes x K images (`PKSampler`,
data.sampler = "pk"), or B = P x K images drawn at random from the whole split (`RandomSampler`,
data.sampler = "random", as MemVir's authors draw their batches of 128).

Batch `step` depends on nothing but the seed and the step number, so a run resumed at step t draws
exactly the batches an uninterrupted run would, and batches can be prepared in any order by any worker.

Extra batches (what a component asks for besides the PK batch, `ExtraBatch`; MMSI's validation batch):
V distinct training classes x 1 image, also a pure function of (seed, step). By default they are drawn
from the training images themselves (as the MMSI authors do); with `held_out_fraction` > 0, that fraction
of each class's images (at least one, leaving at least two for training) is held out of the PK batches
and extra batches draw only from it.

Small classes. A class with fewer than K images (but at least 2) fills its K slots by drawing its images
with replacement, so an image can appear twice in a batch (as two augmented views). A class with a single
image gives no positive pair and is never drawn. Both cases are reported once, when the sampler is built;
if fewer than P classes remain, building the sampler fails with an error that says what to change.
"""

import dataclasses
import logging
from typing import Sequence

import numpy as np

EXTRA = "extra"  # The key of a train batch's extra batches (whole on every host and device).


@dataclasses.dataclass(frozen=True)
class ExtraBatch:
  """A batch that a component needs every step besides the PK batch.

  Attributes:
    name: its key among the step's extra batches.
    num_classes: V distinct training classes, one image each.
    held_out_fraction: share of each class's images reserved for it and kept out of the PK batches (0:
      drawn from the training images).
  """
  name: str
  num_classes: int
  held_out_fraction: float = 0.0


def held_out_fraction(requests: Sequence[ExtraBatch]) -> float:
  """The share of each class the PK sampler must hold out for `requests` (they must agree)."""
  fractions = {r.held_out_fraction for r in requests if r.held_out_fraction > 0}
  if len(fractions) > 1:
    raise ValueError(f"Extra batches ask for different held-out shares {sorted(fractions)}; one "
                     f"sampler holds out one share.")
  return fractions.pop() if fractions else 0.0


def class_members(labels) -> list[np.ndarray]:
  """The example indices of each class of `labels` [N], classes in increasing order."""
  labels = np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  _, starts = np.unique(labels[order], return_index=True)
  return np.split(order, starts[1:])


class ExtraSampler:
  """Indices of extra batches (`ExtraBatch`): V distinct classes x 1 image, a pure function of
  (seed, step, stream).

  Args:
    members: the example indices of each class the extra batches may draw from.
    seed: the sampling seed.
  """

  def __init__(self, members: Sequence[np.ndarray], seed: int):
    self._members = [m for m in members if len(m)]
    self.seed = seed

  def extra_indices(self, step: int, num_classes: int, stream: int = 0) -> np.ndarray:
    """Example indices [V] of extra batch number `stream` at `step`: V distinct classes, one image
    each."""
    if num_classes > len(self._members):
      raise ValueError(f"Extra batches of V={num_classes} classes need as many classes with images "
                       f"for them; there are {len(self._members)}.")
    rng = np.random.default_rng([self.seed, step, 2 + stream])
    picked = rng.choice(len(self._members), num_classes, replace=False)
    return np.array([rng.choice(self._members[c]) for c in picked])


class PKSampler:
  """Indices of P classes x K images per batch (class-major order: the K images of a class are adjacent).

  Args:
    labels: [N] class label of every example of the split.
    classes_per_batch: P.
    samples_per_class: K.
    seed: the sampling seed.
    held_out_fraction: fraction of each class's images reserved for extra batches (0: none).
  """

  def __init__(self, labels, classes_per_batch: int, samples_per_class: int, seed: int,
               held_out_fraction: float = 0.0):
    labels = np.asarray(labels)
    if classes_per_batch < 1 or samples_per_class < 2:
      raise ValueError(f"PK batches need P >= 1 and K >= 2, got P={classes_per_batch}, "
                       f"K={samples_per_class}: set data.classes_per_batch and data.samples_per_class.")
    classes = np.unique(labels)
    members = class_members(labels)
    extra_members = members
    if held_out_fraction > 0:
      held_out = [min(max(1, int(round(held_out_fraction * len(m)))), len(m) - 2) for m in members]
      extra_members = [m[len(m) - h:] for m, h in zip(members, held_out)]
      members = [m[:len(m) - h] if h > 0 else m for m, h in zip(members, held_out)]
    self._extra = ExtraSampler(extra_members, seed)
    counts = np.array([len(m) for m in members])
    eligible = counts >= 2
    if not eligible.all():
      logging.warning("PK sampler: %d classes have a single image and are never drawn: %s",
                      (~eligible).sum(), classes[~eligible][:20].tolist())
    small = eligible & (counts < samples_per_class)
    if small.any():
      logging.warning("PK sampler: %d classes have fewer than K=%d images; their images are drawn "
                      "with replacement.", small.sum(), samples_per_class)
    self.classes = classes[eligible]
    self._members = [m for m, ok in zip(members, eligible) if ok]
    if len(self.classes) < classes_per_batch:
      raise ValueError(
          f"PK batches need P={classes_per_batch} classes with at least 2 images each, but the split "
          f"has only {len(self.classes)}: lower data.classes_per_batch.")
    self.classes_per_batch = classes_per_batch
    self.samples_per_class = samples_per_class
    self.seed = seed

  @property
  def batch_size(self) -> int:
    return self.classes_per_batch * self.samples_per_class

  def batch_indices(self, step: int) -> np.ndarray:
    """Example indices [P * K] of batch `step`."""
    rng = np.random.default_rng([self.seed, step])
    picked = rng.choice(len(self.classes), self.classes_per_batch, replace=False)
    indices = []
    for c in picked:
      members = self._members[c]
      replace = len(members) < self.samples_per_class
      indices.append(rng.choice(members, self.samples_per_class, replace=replace))
    return np.concatenate(indices)

  def extra_indices(self, step: int, num_classes: int, stream: int = 0) -> np.ndarray:
    """Example indices [V] of extra batch number `stream` at `step` (`ExtraSampler`), from the
    held-out images, if any."""
    return self._extra.extra_indices(step, num_classes, stream)


class RandomSampler(PKSampler):
  """Indices of B = P x K images per batch drawn uniformly without replacement from the images of the
  classes a PK batch may draw (held-out images excluded); a batch may hold any number of images of a
  class, one included. Built as a PKSampler, whose checks and extra batches it shares."""

  def __init__(self, labels, classes_per_batch: int, samples_per_class: int, seed: int,
               held_out_fraction: float = 0.0):
    super().__init__(labels, classes_per_batch, samples_per_class, seed, held_out_fraction)
    self._images = np.concatenate(self._members)
    if len(self._images) < self.batch_size:
      raise ValueError(f"Random batches of {self.batch_size} images need as many training images; "
                       f"there are {len(self._images)}: lower data.classes_per_batch.")

  def batch_indices(self, step: int) -> np.ndarray:
    """Example indices [P * K] of batch `step`, in random order."""
    rng = np.random.default_rng([self.seed, step])
    return rng.choice(self._images, self.batch_size, replace=False)


SAMPLERS = {"pk": PKSampler, "random": RandomSampler}


def build(kind: str, labels, classes_per_batch: int, samples_per_class: int, seed: int,
          held_out_fraction: float = 0.0) -> PKSampler:
  """The sampler `kind` ("pk" or "random", config data.sampler) of a split with these labels."""
  if kind not in SAMPLERS:
    raise ValueError(f"data.sampler={kind!r} is not one of {tuple(SAMPLERS)}.")
  return SAMPLERS[kind](labels, classes_per_batch, samples_per_class, seed, held_out_fraction)
