"""Smart Mining batches (Harwood et al., "Smart Mining for Deep Metric Learning", ICCV 2017).

Every refresh (once per epoch by default) the policy embeds the whole training split with the current
parameters, finds each sample's exact nearest neighbours (eval/retrieval.py, blockwise on the device,
where the paper builds an approximate FANNG graph) and assembles the batches of the period up to the next
refresh. A batch is T triplets laid out as rows (anchor, positive, negative) (references/triplets.py).

The rule, per anchor a (`assemble_triplets`):
  - the nearest positive p_NN sets the bound kappa * d^2(a, p_NN); the negatives of a's list (its
    `neighbors` nearest of other classes, nearest first) lying beyond it are valid;
  - the negative is the first valid one in list order: the hardest the bound allows;
  - the positive is the first of a's positives, nearest first, that is nearer to a than the negative,
    i.e. p_NN when d^2(a, p_NN) < d^2(a, n), else a random positive of a's class;
  - no valid negative in the list: a random triplet (a, random positive, random negative).
The lists are exact and ties rank the lower sample index first (eval/retrieval.py); a random positive
is uniform over the anchor's other samples, a random negative uniform over the samples of the other
classes (so a class is drawn in proportion to its size).
Each epoch every sample of a class with two or more images is an anchor exactly once (a permutation), so
each negative is used at most once per anchor per epoch; the epochs' permutations are read one after
another, T anchors a step, so an epoch's last anchors and the next epoch's first share a step. In each
batch the first round(mined_fraction * T) triplets are mined, the others random; while a step's first
anchor belongs to one of the first `start_epoch` epochs every triplet is random (no embedding, no
search).

kappa comes from the adaptive controller (batch_policies/controller.py): after assembling a period's triplets
the policy measures e, the share of its mined triplets whose loss (the configured loss on the triplet
alone) is non-zero at the refresh's embedding (a slot left without a valid negative counts as zero
loss), and the controller sets the kappa of the next refresh.

Everything a period's batches depend on is (seed, step, the refresh's state): anchors are a permutation
of the epoch seeded by (seed, epoch), random choices are seeded by (seed, refresh step), and the state
(the period's batches, the controller) is part of the TrainState, so a resumed run draws the same
batches, also across a refresh.
"""

import functools
from typing import Callable

import jax
import numpy as np

from mmsi_jax.batch_policies import controller as controller_lib
from mmsi_jax.data.sampler import ExtraSampler, class_members
from mmsi_jax.eval.retrieval import nearest_by_class
from mmsi_jax.references.triplets import TRIPLETS, triplet_losses
from mmsi_jax.search_space import Float, tunable

KAPPA, ERROR, MINED = "batches/kappa", "batches/error", "batches/mined"  # The refresh's metrics.


class ClassIndex:
  """The samples of each class, for drawing random positives and negatives.

  Args:
    labels: [N] class of every sample.
  """

  def __init__(self, labels):
    self.labels = np.asarray(labels)
    self.order = np.argsort(self.labels, kind="stable")
    classes, starts, counts = np.unique(self.labels[self.order], return_index=True,
                                        return_counts=True)
    position = np.searchsorted(classes, self.labels)
    self.start, self.count = starts[position], counts[position]  # Of each sample's class, [N].
    self.rank = np.empty(len(self.labels), np.int64)  # Each sample's place among its class's.
    self.rank[self.order] = np.arange(len(self.labels)) - np.repeat(starts, counts)

  def random_positives(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random other sample of each anchor's class [T] (the class has two or more)."""
    draw = rng.integers(0, self.count[anchors] - 1)
    return self.order[self.start[anchors] + draw + (draw >= self.rank[anchors])]

  def random_negatives(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random sample of another class than each anchor's [T]."""
    draw = rng.integers(0, len(self.labels) - self.count[anchors])
    return self.order[draw + np.where(draw >= self.start[anchors], self.count[anchors], 0)]


def assemble_triplets(anchors: np.ndarray, mine: np.ndarray, positive_d2: np.ndarray,
                      negatives: np.ndarray, negative_d2: np.ndarray, nearest_positive: np.ndarray,
                      kappa: float, classes: ClassIndex,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Triplets [T, 3] (anchor, positive, negative) and which were mined [T] (module docstring).

  Args:
    anchors: [T] sample indices; mine: [T] bool, the slots to mine (the others are random triplets).
    positive_d2: [N] squared distance of each sample to its nearest positive p_NN.
    negatives: [N, k] each sample's nearest samples of other classes, nearest first (-1: none).
    negative_d2: [N, k] their squared distances.
    nearest_positive: [N] p_NN of each sample.
    kappa: the bound factor.
    classes: the samples by class, for the random choices; rng: their generator.
  """
  d2 = negative_d2[anchors]
  valid = (negatives[anchors] >= 0) & (d2 > kappa * positive_d2[anchors, None])
  first = np.argmax(valid, axis=1)
  mined = mine & valid.any(axis=1)
  chosen_d2 = d2[np.arange(len(anchors)), first]
  positives = np.where(mined & (positive_d2[anchors] < chosen_d2), nearest_positive[anchors],
                       classes.random_positives(anchors, rng))
  negatives = np.where(mined, negatives[anchors, first], classes.random_negatives(anchors, rng))
  return np.stack([anchors, positives, negatives], axis=1), mined


class PeriodSampler:
  """The batches of one refresh period, in the pipeline's sampler interface: batch `step` is row
  step - first_step of `batches` [R, 3T]; extra batches (a miner's) come from `extra`."""

  def __init__(self, batches: np.ndarray, first_step: int, extra: ExtraSampler):
    self.batches = batches
    self.first_step = first_step
    self.extra = extra
    self.batch_size = batches.shape[1]

  def batch_indices(self, step: int) -> np.ndarray:
    row = step - self.first_step
    if not 0 <= row < len(self.batches):
      raise IndexError(f"Step {step} is outside the refresh period of steps {self.first_step}.."
                       f"{self.first_step + len(self.batches) - 1}.")
    return self.batches[row]

  def extra_indices(self, step: int, num_classes: int, stream: int = 0) -> np.ndarray:
    return self.extra.extra_indices(step, num_classes, stream)


@tunable(target_error=Float(0.5, 0.75))
class SmartMiningPolicy:
  """Batches of T mined triplets, refreshed from the model's embedding of the training split.

  Args (context, from the trainer):
    labels: [N] training labels; classes_per_batch, samples_per_class: unused (no PK batches); seed;
      held_out_fraction: must be 0 (every image is an anchor);
    loss_fn, hparams: the training loss, whose per-triplet value gives the controller's e;
    sampler: data.sampler, which must be "pk" (the policy builds its own batches).
  Settings (config data.smart_mining):
    triplets_per_batch: T; the batch has 3T images.
    refresh_every: steps between refreshes; 0: ceil(A / T) steps for the A anchors, one epoch (the
      paper).
    start_epoch: epochs of random triplets before mining starts (the paper: 2).
    mined_fraction: share of each batch that is mined (the paper: 0.5 to 1).
    neighbors: length k of each sample's list of nearest negatives.
    adaptive: kappa from the controller (True) or fixed at `kappa`.
    kappa: the initial (or fixed) bound factor; the paper starts it large.
    target_error: e_t, the controller's target share of triplets with a non-zero loss.
    window, step_gain, kappa_range: the controller's (batch_policies/controller.py).
    chunk_size: the side of a block of the exact neighbour search.
  """
  layout = TRIPLETS

  def __init__(self, labels, classes_per_batch: int, samples_per_class: int, seed: int,
               held_out_fraction: float, loss_fn: Callable, hparams: dict, sampler: str, *,
               triplets_per_batch: int, refresh_every: int, start_epoch: int,
               mined_fraction: float, neighbors: int, adaptive: bool, kappa: float,
               target_error: float, window: int, step_gain: float, kappa_range: tuple,
               chunk_size: int):
    del classes_per_batch, samples_per_class

    def require(ok, message):
      if not ok:
        raise ValueError(f"data.smart_mining: {message}")

    require(sampler == "pk", f"it builds its own batches; data.sampler={sampler!r} must be 'pk'.")
    require(held_out_fraction == 0, "every training image may be an anchor; a miner's held-out share "
                                    f"({held_out_fraction}) is not supported: hold nothing out.")
    require(triplets_per_batch >= 1, f"triplets_per_batch must be positive, got {triplets_per_batch}.")
    require(refresh_every >= 0, f"refresh_every must be >= 0 (0: once per epoch), got {refresh_every}.")
    require(start_epoch >= 0, f"start_epoch must be >= 0, got {start_epoch}.")
    require(0 < mined_fraction <= 1, f"mined_fraction must be in (0, 1], got {mined_fraction}.")
    require(neighbors >= 1, f"neighbors must be positive, got {neighbors}.")
    require(0 < kappa_range[0] <= kappa <= kappa_range[1],
            f"kappa ({kappa}) must lie in kappa_range {tuple(kappa_range)}, whose low end is > 0.")
    require(0 < target_error < 1, f"target_error must be in (0, 1), got {target_error}.")
    require(window >= 2, f"window must hold at least 2 observations, got {window}.")
    self.classes = ClassIndex(labels)
    self.anchors = np.nonzero(self.classes.count >= 2)[0]  # Samples with a positive.
    require(len(self.anchors) >= triplets_per_batch,
            f"triplets_per_batch={triplets_per_batch} exceeds the {len(self.anchors)} samples of "
            f"classes with two or more images: lower it.")
    self.steps_per_epoch = -(-len(self.anchors) // triplets_per_batch)
    self.refresh_every = refresh_every or self.steps_per_epoch
    self.triplets_per_batch = triplets_per_batch
    self.batch_size = 3 * triplets_per_batch
    self.num_mined = max(1, round(mined_fraction * triplets_per_batch))
    self.seed = seed
    self.settings = dict(start_epoch=start_epoch, neighbors=neighbors, adaptive=adaptive,
                         kappa=kappa, target_error=target_error, window=window, step_gain=step_gain,
                         kappa_range=tuple(kappa_range), chunk_size=chunk_size)
    self._extra = ExtraSampler(class_members(labels), seed)
    self._triplet_losses = jax.jit(functools.partial(triplet_losses, loss_fn, dict(hparams)))

  def init_state(self) -> dict:
    """The state before the first refresh: no batches yet, the controller at the initial kappa."""
    return {"first_step": np.zeros((), np.int32),
            "batches": np.zeros((self.refresh_every, self.batch_size), np.int32),
            "controller": jax.device_get(controller_lib.init(self.settings["kappa"],
                                                             self.settings["window"]))}

  def due(self, completed_steps: int) -> bool:
    """Whether the batches are refreshed before the step after `completed_steps`."""
    return completed_steps % self.refresh_every == 0

  def period_end(self, completed_steps: int, num_steps: int) -> int:
    """The step count at which the period that contains the next step ends."""
    return min((completed_steps // self.refresh_every + 1) * self.refresh_every, num_steps)

  def sampler(self, state: dict) -> PeriodSampler:
    state = jax.device_get(state)
    return PeriodSampler(np.asarray(state["batches"]), int(state["first_step"]), self._extra)

  def epoch_anchors(self, epoch: int) -> np.ndarray:
    """The anchors of an epoch, in order: a permutation of the samples with a positive."""
    return np.random.default_rng([self.seed, epoch, 3]).permutation(self.anchors)

  def step_anchors(self, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The anchors [S, T] of steps [S] and the epoch of each step's first anchor [S]: the epochs'
    permutations read one after another, T anchors a step."""
    slots = steps[:, None] * self.triplets_per_batch + np.arange(self.triplets_per_batch)
    epochs, offsets = np.divmod(slots, len(self.anchors))
    anchors = np.empty_like(slots)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      anchors[here] = self.epoch_anchors(epoch)[offsets[here]]
    return anchors, epochs[:, 0]

  def refresh(self, state: dict, completed_steps: int,
              embed_split: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[dict, dict]:
    """(the state of the period that starts after `completed_steps`, its metrics). `embed_split()`
    embeds the training split with the current parameters: [N, D] unit rows and [N] labels."""
    settings, size = self.settings, self.triplets_per_batch
    anchors, epochs = self.step_anchors(completed_steps + np.arange(self.refresh_every))
    anchors = anchors.reshape(-1)
    mine = ((epochs >= settings["start_epoch"])[:, None]
            & (np.arange(size) < self.num_mined)[None, :]).reshape(-1)
    rng = np.random.default_rng([self.seed, completed_steps, 4])
    controller = jax.device_get(state["controller"])
    if not mine.any():
      triplets = np.stack([anchors, self.classes.random_positives(anchors, rng),
                           self.classes.random_negatives(anchors, rng)], axis=1)
      metrics = {MINED: 0.0}
    else:
      embeddings, labels = embed_split()
      if not np.array_equal(labels, self.classes.labels):
        raise ValueError("The embedded split's labels differ from the policy's: embed the training "
                         "split in order.")
      negative_sim, negatives = nearest_by_class(embeddings, labels, settings["neighbors"],
                                                 same_class=False,
                                                 chunk_size=settings["chunk_size"])
      positive_sim, nearest_positive = nearest_by_class(embeddings, labels, 1, same_class=True)
      kappa = float(controller.kappa)
      triplets, mined = assemble_triplets(
          anchors, mine, 2.0 - 2.0 * positive_sim[:, 0], negatives, 2.0 - 2.0 * negative_sim,
          nearest_positive[:, 0], kappa, self.classes, rng)
      error = self.error(embeddings, triplets, mine, mined)
      if settings["adaptive"]:
        low, high = settings["kappa_range"]
        controller = jax.device_get(controller_lib.update(
            controller, error, target=settings["target_error"], step_gain=settings["step_gain"],
            kappa_min=low, kappa_max=high))
      metrics = {KAPPA: kappa, ERROR: error, MINED: float(mined.mean())}
    new_state = {"first_step": np.asarray(completed_steps, np.int32),
                 "batches": triplets.reshape(self.refresh_every, self.batch_size).astype(np.int32),
                 "controller": controller}
    return new_state, metrics

  def error(self, embeddings: np.ndarray, triplets: np.ndarray, mine: np.ndarray,
            mined: np.ndarray) -> float:
    """e: the share of the slots to mine (mine [T]) whose triplet (triplets [T, 3]) was mined (mined
    [T]) and has a non-zero loss on its own. A slot that found no valid negative counts as a zero
    loss: nothing as hard as the bound asks for was within reach, so the bound is too loose."""
    anchor, positive, negative = (embeddings[triplets[:, i]] for i in range(3))
    losses = self._triplet_losses(np.sum(anchor * positive, axis=1), np.sum(anchor * negative, axis=1))
    return float(np.sum(mined & (np.asarray(losses) > 0)) / np.sum(mine))
