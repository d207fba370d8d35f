"""MMSI: meta-mining with semiglobal information (docs/METHODS.md).

Per-pair multipliers m [B, M] are chosen by asking which pairs, if trained on, would lower a loss on
other data. With W = dL/dS the batch's pair weights and J = dS/dtheta,

    theta'(m) = theta - alpha * grad_theta L_m(theta) = theta - alpha * J^T (m * W)      (virtual step)
    L_meta(m) = L(S(theta'(m); validation batch, memory dictionary))                    (meta loss)

and d L_meta / dm (or / dphi, through m = phi(pair features)) is a gradient through a gradient:
dL_meta/dm = -alpha * W * (J grad L_val(theta')). The inner gradient J^T is the VJP of S(theta) that the
train step computes anyway, so the meta step costs one more backward pass (the virtual step; none at
l2rw's m = 0, where theta' = theta: `MMSI.meta_grad_at_zero`), the validation batch's forward and
backward at theta', and one tangent pass (J, the VJP transposed); the real update reuses the same VJP
with the chosen m.

Modes:
  weighting_net  m = phi(S_ij, W_ij, positive or negative, rank of the pair within its anchor) in (0, 1),
                 an MLP trained with its own optax optimizer on L_meta; m is then recomputed with the
                 updated phi and rescaled, over the positive and separately over the negative pairs, so
                 that sum m|W| = sum |W|: phi redistributes the loss's own pull and push among the
                 pairs, without changing how hard the loss pulls or pushes in all. (Without this, the
                 one-step look-ahead learns to push hard negatives many times harder and to silence
                 hard positives, and the embedding collapses.)
  l2rw           as the authors' code: m = 0 as a differentiable input, weights relu(-dL_meta/dm)
                 normalised to max 1; when every meta-gradient is >= 0 the step falls back to uniform
                 weights (m = 1) and counts it, instead of dividing by zero.
Scope of the virtual step: `all` parameters (the authors' choice) or the embedding `head` only, with the
backbone features computed once and reused (far cheaper).

Warm-up: until the dictionary holds `min_classes` classes (0: every training class) and `warmup_steps`
have passed, steps only fill the dictionary and take either plain-loss updates (m = 1) or, as the
authors, no update at all (`warmup_update`).

The authors' exact step (docs/METHODS.md, MMSI) is a setting of five more switches: `enqueue` ("before":
the batch joins the dictionary before the meta loss), `meta_references` ("dictionary": the validation
batch against the dictionary only), `meta_mining` (False: the meta loss unmined), `warmup_update`
("none": no update until T classes are held, nor when the meta loss is exactly 0) and, for MS,
`multipliers_in_loss` (True: m scales S inside MS's exponents, L(m S), instead of re-weighting dL/dS).
A step without an update says so to the train step (`MinerStep.apply_update`, mining/base.py).
"""

import inspect
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmsi_jax import losses
from mmsi_jax.data.sampler import ExtraBatch
from mmsi_jax.mining import memory as memory_lib
from mmsi_jax.mining.base import Miner, MinerStep, StepInputs
from mmsi_jax.models import HEAD, MODEL_PARAMS
from mmsi_jax.search_space import Float, Int, tunable

MODES = ("weighting_net", "l2rw")
SCOPES = ("all", "head")
VALIDATIONS = ("train_classes", "held_out")
META_REFERENCES = ("dictionary", "dictionary_and_validation")
ENQUEUES = ("before", "after")
WARMUP_UPDATES = ("plain", "none")
VALIDATION = "validation"  # The name of the validation batch among the step's extra batches.


class WeightingNet(nn.Module):
  """phi: per-pair features [..., F] -> multipliers [...] in (0, 1)."""
  hidden: Sequence[int] = (32, 32)

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = features
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return jax.nn.sigmoid(nn.Dense(1)(x))[..., 0]


@flax.struct.dataclass
class MMSIState:
  """The miner's part of the TrainState.

  Attributes:
    memory: the dictionary of past embeddings.
    net_params, net_opt_state: phi and its optimizer state (empty in l2rw mode).
    fallbacks: l2rw steps whose meta-gradients were all >= 0 (uniform weights used).
  """
  memory: memory_lib.Memory
  net_params: Any
  net_opt_state: Any
  fallbacks: jax.Array


def pair_features(pairs: losses.Pairs, weights: jax.Array) -> jax.Array:
  """Inputs of phi [B, M, 4]: S_ij, W_ij / max|W|, +1 positive / -1 negative, and the pair's rank among
  its anchor's valid pairs by decreasing similarity, scaled to [0, 1]."""
  valid = pairs.pos | pairs.neg
  sim = jax.lax.stop_gradient(pairs.sim)
  scaled_w = weights / jnp.maximum(jnp.max(jnp.abs(weights)), 1e-12)
  order = jnp.argsort(jnp.where(valid, -sim, jnp.inf), axis=-1)
  rank = jnp.argsort(order, axis=-1).astype(sim.dtype)
  rank = rank / jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True) - 1, 1)
  sign = jnp.where(pairs.pos, 1.0, jnp.where(pairs.neg, -1.0, 0.0))
  return jnp.stack([sim, scaled_w, sign, jnp.where(valid, rank, 0.0)], axis=-1)


@tunable(net_learning_rate=Float(1e-4, 1e-2, log=True), memory_size=Int(1, 100, log=True))
class MMSI(Miner):
  """The MMSI miner (the miner protocol: mmsi_jax/mining/base.py), pure and jittable.

  Args:
    model: the embedding model (features / embed methods, head parameters under "head").
    pair_loss, hparams: the loss family, used unweighted for the meta loss.
    num_classes: number of training classes (labels are 0 .. num_classes - 1).
    The keyword-only settings are the `miner.mmsi` config, documented in configs/default.py.
  """

  def __init__(self, model, pair_loss: Callable, hparams: dict, num_classes: int, *, mode: str,
               scope: str, virtual_lr: float, validation: str, validation_classes: int,
               held_out_fraction: float, memory_layout: str, memory_size: int,
               wait_for_coverage: bool, warmup_steps: int, net_hidden: Sequence[int],
               net_learning_rate: float, min_classes: int, meta_references: str, enqueue: str,
               warmup_update: str, meta_mining: bool, multipliers_in_loss: bool):
    if mode not in MODES:
      raise ValueError(f"miner.mmsi.mode={mode!r} is not one of {MODES}.")
    if scope not in SCOPES:
      raise ValueError(f"miner.mmsi.scope={scope!r} is not one of {SCOPES}.")
    if scope == "head" and not getattr(model, "has_head", True):
      raise ValueError("miner.mmsi.scope='head' steps the embedding head alone, but this model's "
                       "embedding is a branch of its backbone with no head (model.layout): use "
                       "scope='all' or a model with a linear head.")
    if validation not in VALIDATIONS:
      raise ValueError(f"miner.mmsi.validation={validation!r} is not one of {VALIDATIONS}.")
    if meta_references not in META_REFERENCES:
      raise ValueError(f"miner.mmsi.meta_references={meta_references!r} is not one of "
                       f"{META_REFERENCES}.")
    if enqueue not in ENQUEUES:
      raise ValueError(f"miner.mmsi.enqueue={enqueue!r} is not one of {ENQUEUES}.")
    if warmup_update not in WARMUP_UPDATES:
      raise ValueError(f"miner.mmsi.warmup_update={warmup_update!r} is not one of {WARMUP_UPDATES}.")
    if min_classes < 0:
      raise ValueError(f"miner.mmsi.min_classes={min_classes} must be >= 0 (0: every class).")
    if multipliers_in_loss and mode != "l2rw":
      raise ValueError("miner.mmsi.multipliers_in_loss=True (the authors' MS weighting) is defined for "
                       "mode='l2rw' only; set miner.mmsi.mode='l2rw' or multipliers_in_loss=False.")
    if multipliers_in_loss and callable(pair_loss) and not losses.takes_multipliers(pair_loss):
      raise ValueError(f"miner.mmsi.multipliers_in_loss=True needs a loss that takes per-pair "
                       f"multipliers inside it (multi_similarity); {pair_loss.__name__} does not. "
                       f"Set miner.mmsi.multipliers_in_loss=False.")
    if validation_classes < 2:
      raise ValueError("miner.mmsi.validation_classes must be at least 2 (the meta loss needs "
                       "negatives).")
    self.config = ml_collections.ConfigDict(dict(
        mode=mode, scope=scope, virtual_lr=virtual_lr, memory_layout=memory_layout,
        memory_size=memory_size, wait_for_coverage=wait_for_coverage, warmup_steps=warmup_steps,
        min_classes=min_classes, meta_references=meta_references, enqueue=enqueue,
        warmup_update=warmup_update, meta_mining=meta_mining,
        multipliers_in_loss=multipliers_in_loss))
    self.model = model
    self.pair_loss = pair_loss
    self.hparams = hparams
    # The meta loss's hyperparameters: the training loss's, with its pair mining off if so asked (a
    # loss without a `mine` switch, e.g. contrastive, mines nothing anyway).
    self.meta_hparams = dict(hparams)
    if (not meta_mining and callable(pair_loss)
        and "mine" in inspect.signature(pair_loss).parameters):
      self.meta_hparams["mine"] = False
    self.num_classes = num_classes
    self.net = WeightingNet(tuple(net_hidden))
    self.net_tx = optax.adam(net_learning_rate)
    # The validation batch of the meta loss: V classes x 1 image, from the training images or from a
    # held-out share of each class.
    self.extra_batches = (ExtraBatch(
        VALIDATION, validation_classes,
        held_out_fraction=held_out_fraction if validation == "held_out" else 0.0),)

  @property
  def multipliers_in_loss(self) -> bool:
    """Whether m goes inside the loss (a capability of the miner protocol, mining/base.py)."""
    return self.config.multipliers_in_loss

  def init(self, rng: jax.Array, embed_dim: int, feature_dim: int):
    del feature_dim
    memory = memory_lib.init(self.config.memory_layout, self.config.memory_size, embed_dim,
                             self.num_classes)
    net_params, net_opt_state = {}, {}
    if self.config.mode == "weighting_net":
      net_params = self.net.init(rng, jnp.zeros((1, 1, 4)))
      net_opt_state = self.net_tx.init(net_params)
    return {}, MMSIState(memory=memory, net_params=net_params, net_opt_state=net_opt_state,
                         fallbacks=jnp.zeros((), jnp.int32))

  def _scoped_problem(self, inputs: StepInputs):
    """(theta_scope, grad_of(cotangent) -> d(sum cot * S)/dtheta_scope, embed_validation(theta_scope))."""
    model_params = inputs.params[MODEL_PARAMS]
    variables = {"params": model_params, "batch_stats": inputs.batch_stats}
    val_images = inputs.extras[VALIDATION]["images"]
    if self.config.scope == "all":
      def embed_validation(params):
        return self.model.apply({**variables, "params": params[MODEL_PARAMS]}, val_images,
                                train=False)
      return inputs.params, lambda cot: inputs.sim_vjp(cot)[0], embed_validation

    features = jax.lax.stop_gradient(inputs.features)
    val_features = jax.lax.stop_gradient(self.model.apply(
        variables, val_images, train=False, method="features"))

    def embed_with_head(head, x):
      return self.model.apply({**variables, "params": {**model_params, HEAD: head}}, x,
                              method="embed")

    def batch_sim(head):
      params = {**inputs.params, MODEL_PARAMS: {**model_params, HEAD: head}}
      return inputs.pairs_of(params, embed_with_head(head, features), inputs.labels).sim

    _, head_vjp = jax.vjp(batch_sim, model_params[HEAD])
    return (model_params[HEAD], lambda cot: head_vjp(cot)[0],
            lambda head: embed_with_head(head, val_features))

  def _alpha(self, inputs: StepInputs) -> jax.Array:
    return self.config.virtual_lr if self.config.virtual_lr > 0 else inputs.learning_rate

  def _validation_loss(self, memory: memory_lib.Memory, inputs: StepInputs, embed_validation):
    """theta_scope -> L_val: the validation batch against the dictionary (and, with meta_references
    "dictionary_and_validation", against itself too), unweighted."""
    labels = inputs.extras[VALIDATION]["labels"]

    def validation_loss(theta):
      embeddings = embed_validation(theta)
      if self.config.meta_references == "dictionary_and_validation":
        val = losses.build_pairs(embeddings, labels, ref_embeddings=memory.embeddings,
                                 ref_labels=memory.labels, ref_valid=memory.valid)
      else:  # The authors': the dictionary's columns only.
        same = labels[:, None] == memory.labels[None, :]
        val = losses.Pairs(embeddings @ memory.embeddings.astype(embeddings.dtype).T,
                           same & memory.valid[None, :], ~same & memory.valid[None, :])
      return self.pair_loss(val.sim, val.pos, val.neg, **self.meta_hparams)
    return validation_loss

  def meta_loss_fn(self, memory: memory_lib.Memory, inputs: StepInputs) -> Callable:
    """m [B, M] -> L_meta(theta'(m)): the validation batch against the dictionary after a virtual step.

    Differentiated by autodiff (a gradient through the virtual step's gradient: its backward pass
    transposed, i.e. one tangent pass), except at l2rw's m = 0 (`meta_grad_at_zero`).
    """
    theta, grad_of, embed_validation = self._scoped_problem(inputs)
    alpha = self._alpha(inputs)
    validation_loss = self._validation_loss(memory, inputs, embed_validation)

    def meta_loss(multipliers):
      cotangent = inputs.cotangent_of(multipliers)
      return validation_loss(jax.tree.map(lambda p, g: p - alpha * g, theta, grad_of(cotangent)))
    return meta_loss

  def meta_grad_at_zero(self, memory: memory_lib.Memory, inputs: StepInputs):
    """(L_meta, dL_meta/dm [B, M]) at m = 0 (l2rw), in closed form.

    With theta'(m) = theta - alpha J^T c(m), c(m) = dL_m/dS the update's cotangent (m * W, or with the
    multipliers inside the loss m * W(m S)), c(0) = 0 and dc_ij/dm_kl = 0 for ij != kl at m = 0, so
    the chain rule gives

        dL_meta/dm = -alpha * W0 * (J g'),   W0 = dc/dm (0) [1...1],   g' = grad L_val(theta),

    W0 = W, or W(0) (the loss's pair weights at S = 0: constant per anchor, the authors' MS). J g' is
    the transpose of the linear map J^T (`jax.linear_transpose` of the train step's VJP): the
    convolutions of differentiating `meta_loss_fn`, without its virtual step, a backward pass on a
    zero cotangent that XLA does not fold away.
    """
    theta, grad_of, embed_validation = self._scoped_problem(inputs)
    zeros = jnp.zeros_like(inputs.weights)
    _, weights = jax.jvp(inputs.cotangent_of, (zeros,), (jnp.ones_like(zeros),))
    weights = jax.lax.stop_gradient(weights)
    loss, val_grad = jax.value_and_grad(self._validation_loss(memory, inputs, embed_validation))(theta)
    (jacobian_product,) = jax.linear_transpose(grad_of, weights)(val_grad)  # J g'
    return loss, -self._alpha(inputs) * weights * jacobian_product

  def net_multipliers(self, net_params, pairs: losses.Pairs, weights: jax.Array) -> jax.Array:
    """m = phi(pair features) [B, M], rescaled so that sum m|W| = sum |W| over the positives and over
    the negatives."""
    m = self.net.apply(net_params, pair_features(pairs, weights))
    magnitude = jnp.abs(weights)
    scale = jnp.ones_like(m)
    for group in (pairs.pos, pairs.neg):
      total = jnp.sum(jnp.where(group, magnitude, 0.0))
      weighted = jnp.sum(jnp.where(group, m * magnitude, 0.0))
      scale = jnp.where(group, total / jnp.maximum(weighted, 1e-12), scale)
    return m * scale

  def _meta_step(self, state: MMSIState, inputs: StepInputs):
    if self.config.mode == "l2rw":
      loss, meta_grad = self.meta_grad_at_zero(state.memory, inputs)
      raw = jax.nn.relu(-meta_grad)
      largest = jnp.max(raw)
      fallback = largest <= 0
      multipliers = jnp.where(fallback, 1.0, raw / jnp.where(fallback, 1.0, largest))
      return multipliers, state.replace(fallbacks=state.fallbacks + fallback), loss, fallback

    meta_loss = self.meta_loss_fn(state.memory, inputs)
    loss, net_grad = jax.value_and_grad(lambda net: meta_loss(
        self.net_multipliers(net, inputs.pairs, inputs.weights)))(state.net_params)
    updates, net_opt_state = self.net_tx.update(net_grad, state.net_opt_state, state.net_params)
    net_params = optax.apply_updates(state.net_params, updates)
    multipliers = self.net_multipliers(net_params, inputs.pairs, inputs.weights)
    return (multipliers, state.replace(net_params=net_params, net_opt_state=net_opt_state), loss,
            jnp.zeros((), bool))

  @property
  def class_threshold(self) -> int:
    """T: the classes the dictionary must hold before meta-weighting starts (min_classes, 0 or more
    than there are: every training class)."""
    return min(self.config.min_classes or self.num_classes, self.num_classes)

  def ready(self, state: MMSIState, step: jax.Array) -> jax.Array:
    """Whether meta-weighting is on: past the warm-up steps and, if required, the dictionary holds
    at least T classes (`class_threshold`)."""
    ready = step >= self.config.warmup_steps
    if self.config.wait_for_coverage:
      ready &= memory_lib.covered_classes(state.memory, self.num_classes) >= self.class_threshold
    return ready

  def _enqueue(self, state: MMSIState, inputs: StepInputs) -> MMSIState:
    return state.replace(memory=memory_lib.enqueue(state.memory, inputs.embeddings, inputs.labels))

  def multipliers(self, state: MMSIState, inputs: StepInputs):
    """MinerStep(m [B, M], new state with the batch enqueued, metrics, apply_update) for one step.

    With warmup_update "none" the step's update is applied only once meta-weighting has started and
    the meta loss is not exactly 0, as the authors' code skips those steps (apply_update, also logged
    as `mmsi/update`); otherwise apply_update is None (always).
    """
    if self.config.enqueue == "before":  # The authors': the dictionary holds this batch already.
      state = self._enqueue(state, inputs)
    ready = self.ready(state, inputs.step)
    # The meta step runs every step and its outcome is kept only when used: XLA on the CPU compiles
    # convolutions inside a lax.cond branch to a path tens of times slower, and warm-up is short.
    meta_multipliers, meta_state, meta_loss, fallback = self._meta_step(state, inputs)
    skip_update = self.config.warmup_update == "none"
    update = ready & (meta_loss != 0) if skip_update else jnp.ones((), bool)
    keep_meta = ready & update
    state = jax.tree.map(lambda new, old: jnp.where(keep_meta, new, old), meta_state, state)
    multipliers = jnp.where(ready, meta_multipliers, 1.0)
    fallback &= keep_meta
    meta_loss = jnp.where(ready, meta_loss, 0.0)
    multipliers = jax.lax.stop_gradient(multipliers)
    pos, neg = inputs.pairs.pos & (inputs.weights != 0), inputs.pairs.neg & (inputs.weights != 0)
    metrics = {
        "mmsi/ready": ready.astype(jnp.float32),
        "mmsi/meta_loss": meta_loss,
        "mmsi/fallback": fallback.astype(jnp.float32),
        "mmsi/fallbacks_total": state.fallbacks,
        "mmsi/pos_weight": jnp.sum(jnp.where(pos, multipliers, 0.0)) / jnp.maximum(pos.sum(), 1),
        "mmsi/neg_weight": jnp.sum(jnp.where(neg, multipliers, 0.0)) / jnp.maximum(neg.sum(), 1),
        "mmsi/covered_classes": memory_lib.covered_classes(state.memory, self.num_classes),
    }
    if skip_update:
      metrics["mmsi/update"] = update.astype(jnp.float32)
    if self.config.enqueue == "after":
      state = self._enqueue(state, inputs)
    return MinerStep(multipliers, state, metrics, update if skip_update else None)
