"""One training step: the TrainState, the optimizer, and the jitted step, built from a config.

The step (docs/ARCHITECTURE.md draws it): embed the batch; the references component takes in the
detached batch (`update`) and supplies the columns of S(params) [B, M] (`pairs`); its objective gives
the loss and the pair weights W = dL/dS; a miner may multiply W by m [B, M]; the gradient of the
weighted pair sum L_m = sum_ij m_ij stop_gradient(W_ij) S_ij, the VJP of S(params) with the cotangent
m * W, updates every parameter group (the model's, the proxies, ...). Without a miner m = 1 and it is the
objective's own gradient.

`build(config, num_classes)` makes the components from a config and `make_train_step` the jitted step;
the trainer (train.py) and the benchmarks (bench/) both go through them.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from mmsi_jax import losses, mining, models, parallel, references
from mmsi_jax.data import transforms
from mmsi_jax.data.sampler import EXTRA
from mmsi_jax.losses.masked import masked_mean
from mmsi_jax.models import MODEL_PARAMS
from mmsi_jax.references.proxies import PROXY_PARAMS
from mmsi_jax.search_space import Around


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  Attributes:
    step: number of completed steps.
    params: parameter groups trained by the optimizer: {"model": the network's, and those of the
      references component or the miner, e.g. "proxies": [C, D]}.
    batch_stats: BatchNorm running statistics.
    opt_state: optax state of the optimizer.
    rng: PRNG key, advanced every step.
    references: the references component's state (e.g. XBM's memory), None when it has none.
    miner: the miner's state (e.g. MMSI's dictionary and weighting net), None without one.
    batches: the batch policy's state (mmsi_jax/batch_policies; Smart Mining's batches of the current
      refresh period and its controller), None when it has none; the step passes it through.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  references: Any = None
  miner: Any = None
  batches: Any = None


@dataclasses.dataclass(frozen=True)
class Components:
  """What a step is made of, built from a config by `build`."""
  model: Any
  loss_fn: Callable  # S-level loss (S, pos, neg, **hparams) -> scalar, pair or proxy.
  hparams: dict
  references: Any
  miner: Optional[Any]
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  lr_mults: dict
  normalization: str

  @property
  def extra_batches(self) -> tuple:
    """The extra batches the miner asks the input pipeline for."""
    return () if self.miner is None else tuple(self.miner.extra_batches)


def create_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Learning rate by step: linear warm-up from 0, then constant, cosine decay to 0, or step decay
  (times step_factor at each of step_boundaries). Without warm-up (warmup_steps 0) the first step takes
  the full rate."""
  if optim.schedule == "step":
    return step_schedule(optim.learning_rate, optim.step_boundaries, optim.step_factor,
                         optim.warmup_steps)
  if optim.schedule == "cosine":
    if optim.warmup_steps == 0:
      return optax.cosine_decay_schedule(optim.learning_rate, num_steps, alpha=0.0)
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate, optim.warmup_steps, num_steps, end_value=0.0)
  if optim.warmup_steps == 0:
    return optax.constant_schedule(optim.learning_rate)
  return optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)


def step_schedule(learning_rate: float, boundaries, factor: float,
                  warmup_steps: int = 0) -> optax.Schedule:
  """lr(t) = learning_rate * factor^(number of boundaries <= t), ramped linearly from 0 over the
  warm-up steps: Caffe's "multistep" policy (OSM + CAA's authors: x0.5 at each boundary)."""
  boundaries = jnp.asarray(tuple(boundaries), jnp.int32).reshape(-1)

  def schedule(step):
    decays = jnp.sum(step >= boundaries)
    rate = learning_rate * jnp.asarray(factor, jnp.float32) ** decays
    if warmup_steps:
      rate = rate * jnp.minimum(step / warmup_steps, 1.0)
    return rate
  return schedule


def _path_name(path) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def lr_multiplier(path: str, lr_mults: Mapping[str, float]) -> float:
  """The multiplier of the parameter at `path` ("proxies", "model/head/kernel"): that of the longest
  key of lr_mults that is the path or a prefix of it ending at a "/", else 1."""
  matches = [key for key in lr_mults if path == key or path.startswith(key + "/")]
  return float(lr_mults[max(matches, key=len)]) if matches else 1.0


def scale_by_lr_multipliers(lr_mults: Mapping[str, float]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its `lr_multiplier`: with Adam and L2 weight decay (or
  AdamW) that is torch's per-group learning rate, decay included."""
  def scale(updates, params):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * lr_multiplier(_path_name(path), lr_mults), updates)
  return optax.stateless(scale)


# The optimizer's settings a tuning study searches (search_space.py), at their config paths: the peak
# learning rate, within 10x of the config's either way.
OPTIMIZER_SPACE = {"optim.learning_rate": Around(10.0)}


def create_optimizer(optim: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam with weight decay (L2 in the gradient, as torch's Adam, or decoupled: AdamW), or SGD with
  momentum and L2 weight decay, then the per-group learning-rate multipliers `optim.lr_mults`.

  SGD is Caffe's: v <- momentum * v + lr(t) * (g + weight_decay * theta), theta <- theta - v (the
  learning rate inside the momentum buffer, so a step decay takes effect gradually, as in Caffe)."""
  if optim.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(optim.weight_decay),
                     optax.scale_by_learning_rate(schedule),
                     optax.trace(decay=optim.momentum))
  elif optim.name == "adamw":
    tx = optax.adamw(schedule, eps=optim.eps, weight_decay=optim.weight_decay)
  else:
    tx = optax.chain(optax.add_decayed_weights(optim.weight_decay),
                     optax.adam(schedule, eps=optim.eps))
  lr_mults = dict(optim.lr_mults)
  if any(value != 1 for value in lr_mults.values()):
    tx = optax.chain(tx, scale_by_lr_multipliers(lr_mults))
  return tx


def check_lr_multipliers(params, lr_mults: Mapping[str, float]) -> None:
  """Every multiplier other than 1 must apply to some parameter."""
  paths = [_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for key, value in lr_mults.items():
    if value != 1 and not any(p == key or p.startswith(key + "/") for p in paths):
      groups = sorted({p.split("/")[0] for p in paths})
      raise ValueError(f"optim.lr_mults.{key}={value} applies to no parameter; the parameter groups "
                       f"are {groups} (a key is a group or a path inside it, e.g. 'model/head').")


def build(config: ml_collections.ConfigDict, num_classes: int, model=None) -> Components:
  """The components of the config's step for a training split of `num_classes` classes; `model`, if
  given, is the config's model already built."""
  if model is None:
    model = models.get(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})
  loss_fn = losses.registry_of(config.loss.name).get(config.loss.name)
  hparams = dict(config.loss.hparams)
  schedule = create_schedule(config.optim, config.train.num_steps)
  return Components(
      model=model, loss_fn=loss_fn, hparams=hparams,
      references=references.build(config.references, num_classes),
      miner=mining.build(config.miner, model, loss_fn, hparams, num_classes),
      schedule=schedule, tx=create_optimizer(config.optim, schedule),
      lr_mults=dict(config.optim.lr_mults), normalization=config.data.normalization)


def create_train_state(rng: jax.Array, components: Components, image_shape: tuple) -> TrainState:
  """The state before the first step: model, references and miner initialised from `rng`."""
  init_rng, miner_rng, state_rng = jax.random.split(rng, 3)
  references_rng = jax.random.fold_in(init_rng, 1)
  model = components.model
  images = jnp.zeros((1, *image_shape), jnp.float32)
  # Jitted: one compilation instead of one per initializer's shape (same values as eager).
  variables = jax.jit(model.init, static_argnames="train")(init_rng, images, train=False)
  features, embeddings = jax.eval_shape(
      lambda: model.apply(variables, images, method="features_and_embeddings"))
  feature_dim, embed_dim = features.shape[-1], embeddings.shape[-1]
  params = {MODEL_PARAMS: variables["params"]}
  references_params, references_state = components.references.init(references_rng, embed_dim)
  params.update(references_params)
  miner_state = None
  if components.miner is not None:
    miner_params, miner_state = components.miner.init(miner_rng, embed_dim, feature_dim)
    params.update(miner_params)
  check_lr_multipliers(params, components.lr_mults)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=components.tx.init(params), rng=state_rng,
                    references=references_state, miner=miner_state)


def similarities(components: Components, state: TrainState, images: jax.Array, labels: jax.Array):
  """S(params) [B, M] of a training batch (train mode) and its VJP.

  Returns (sim, sim_vjp, (pairs, features [B, F], embeddings [B, D], new batch_stats, the references'
  state with this batch taken in)); sim_vjp maps a cotangent [B, M] of S, and optionally one [B, F] of
  the features (a miner's auxiliary loss), to (gradient w.r.t. params,).
  """
  model, refs = components.model, components.references

  def sim_of(params):
    (features, embeddings), updates = model.apply(
        {"params": params[MODEL_PARAMS], "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], method="features_and_embeddings")
    references_state = refs.update(state.references, state.params,
                                   jax.lax.stop_gradient(embeddings), labels, state.step)
    pairs = refs.pairs(references_state, params, embeddings, labels)
    return (pairs.sim, features), (pairs, features, embeddings,
                                   updates.get("batch_stats", state.batch_stats), references_state)

  (sim, features), outputs_vjp, aux = jax.vjp(sim_of, state.params, has_aux=True)
  # A jax.tree_util.Partial, as jax.vjp's own, so that StepInputs can cross a jit boundary.
  return sim, jax.tree_util.Partial(_sim_vjp, outputs_vjp, features), aux


def _sim_vjp(outputs_vjp, features, cotangent, features_cotangent=None):
  """The VJP of S(params) (and of the features, with a features cotangent [B, F])."""
  if features_cotangent is None:
    features_cotangent = jnp.zeros_like(features)
  return outputs_vjp((cotangent, features_cotangent))


def _objective(refs, loss_fn, hparams: dict, references_state, step: jax.Array, pairs: losses.Pairs,
               sim: jax.Array, multipliers: Optional[jax.Array] = None):
  return refs.objective(references_state, step, pairs.replace(sim=sim), loss_fn, hparams, multipliers)


def objective_of(components: Components, references_state, step: jax.Array,
                 pairs: losses.Pairs) -> jax.tree_util.Partial:
  """(sim [B, M], multipliers [B, M] or None) -> (L, metrics): the step's objective (the references'
  loss over `pairs` with S = sim), as a jax.tree_util.Partial that can cross a jit boundary."""
  return jax.tree_util.Partial(
      functools.partial(_objective, components.references, components.loss_fn, components.hparams),
      references_state, step, pairs)


def _multiplied_cotangent(multipliers_in_loss: bool, objective, sim: jax.Array, weights: jax.Array,
                          multipliers: Optional[jax.Array]) -> jax.Array:
  if multipliers is None:
    return weights
  if multipliers_in_loss:
    return jax.grad(lambda s: objective(s, multipliers)[0])(sim)
  return jax.grad(losses.weighted_pair_loss)(sim, weights, multipliers)


def multiplied_cotangent(objective: jax.tree_util.Partial, sim: jax.Array, weights: jax.Array,
                         multipliers_in_loss: bool) -> jax.tree_util.Partial:
  """multipliers m [B, M] (or None: m = 1) -> dL_m/dS [B, M], the cotangent of the update.

  m re-weights the pair gradients, dL_m/dS = m * W (the unified form, losses.weighted_pair_loss), or,
  with `multipliers_in_loss`, goes inside the loss: dL_m/dS = grad_S L(S; m) (`objective_of`; MMSI's
  authors' MS, docs/METHODS.md). A jax.tree_util.Partial, like StepInputs' other functions.
  """
  return jax.tree_util.Partial(functools.partial(_multiplied_cotangent, multipliers_in_loss),
                               objective, sim, weights)


def class_shards(components: Components) -> int:
  """k, the references' class shards (0: none; references/proxies.py)."""
  return getattr(components.references, "class_shards", 0)


def _under_proxies(path) -> bool:
  return any(getattr(key, "key", getattr(key, "name", None)) == PROXY_PARAMS for key in path)


def state_sharding(components: Components, state: TrainState, mesh):
  """The TrainState's sharding over `mesh`: replicated (parallel.py), except with class shards every
  array of two or more axes under a "proxies" key (the proxies [C', D], the optimizer's moments of
  them, MemVir's past proxies [Q, C', D]) split along its class axis, the second to last, over the
  mesh's data axis. Raises ValueError when the device count does not divide the class shards."""
  shards = class_shards(components)
  if not shards:
    return parallel.replicated(mesh)
  if shards % mesh.size:
    raise ValueError(f"The references' class_shards={shards} is not a multiple of the {mesh.size} "
                     f"devices: set it to a multiple of every device count the run will use (e.g. 8 "
                     f"for 1, 2, 4 or 8 devices).")

  def sharding(path, leaf):
    if _under_proxies(path) and np.ndim(leaf) >= 2:
      return NamedSharding(mesh, losses.class_spec(parallel.DATA_AXIS, np.ndim(leaf)))
    return parallel.replicated(mesh)
  return jax.tree_util.tree_map_with_path(sharding, state)


def make_train_step(components: Components, mesh=None, donate: bool = False,
                    sharding=None) -> Callable:
  """The jitted step `(state, batch) -> (state, metrics)` for one batch of uint8 images, normalised on
  the device (transforms.normalize). With a mesh, the step is traced with it as the current mesh (a
  loss over class shards runs in shard_map over it), the metrics come out replicated, and the new state
  with `sharding` (`state_sharding`; replicated by default, see parallel.py). With `donate`, the step
  reuses the input state's buffers for the new one (no copy of memories and queues each step; the
  caller must not read the old state afterwards)."""
  refs, miner = components.references, components.miner

  def normalize(images):
    return transforms.normalize(images, components.normalization)

  def train_step(state: TrainState, batch: dict):
    labels = batch["labels"]
    sim, sim_vjp, (pairs, features, embeddings, batch_stats, references_state) = similarities(
        components, state, normalize(batch["images"]), labels)

    objective = objective_of(components, references_state, state.step, pairs)
    (loss, metrics), weights = jax.value_and_grad(objective, has_aux=True)(sim)
    # Every way a miner acts on the step (its protocol, mining/base.py): the multipliers, where they
    # enter the loss, an auxiliary loss, and whether the update is applied.
    cotangent_of = multiplied_cotangent(objective, sim, weights,
                                        miner is not None and miner.multipliers_in_loss)

    metrics = {"train/loss": loss, **metrics}
    if isinstance(pairs, losses.Pairs):  # Over ClassBlocks the objective reports the similarities.
      metrics.update({"train/active_pairs": jnp.mean((weights != 0).astype(jnp.float32)),
                      "train/pos_sim": masked_mean(sim, pairs.pos),
                      "train/neg_sim": masked_mean(sim, pairs.neg)})
    multipliers, miner_state, update = None, state.miner, None
    if miner is not None:
      inputs = mining.StepInputs(
          step=state.step, params=state.params, batch_stats=state.batch_stats, labels=labels,
          features=features, embeddings=embeddings, pairs=pairs, weights=weights,
          cotangent_of=cotangent_of, sim_vjp=sim_vjp,
          pairs_of=jax.tree_util.Partial(refs.pairs, references_state),
          extras={name: {"images": normalize(extra["images"]), "labels": extra["labels"]}
                  for name, extra in batch.get(EXTRA, {}).items()},
          learning_rate=components.schedule(state.step))
      multipliers, miner_state, miner_metrics, update = miner.multipliers(state.miner, inputs)
      metrics.update(miner_metrics)
    features_cotangent, auxiliary_grads = None, None
    if miner is not None and miner.auxiliary_loss is not None:
      (auxiliary_loss, auxiliary_metrics), (auxiliary_grads, features_cotangent) = jax.value_and_grad(
          miner.auxiliary_loss, argnums=(0, 1), has_aux=True)(state.params, features, labels)
      metrics.update(auxiliary_metrics)
      metrics["train/auxiliary_loss"] = auxiliary_loss
      metrics["train/loss"] = metrics["train/loss"] + auxiliary_loss
    (grads,) = sim_vjp(cotangent_of(multipliers), features_cotangent)
    if auxiliary_grads is not None:
      grads = jax.tree.map(jnp.add, grads, auxiliary_grads)
    updates, opt_state = components.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if update is not None:  # Selected, not branched: see mining/mmsi.py on lax.cond on the CPU.
      params, opt_state, batch_stats = jax.tree.map(
          lambda new, old: jnp.where(update, new, old), (params, opt_state, batch_stats),
          (state.params, state.opt_state, state.batch_stats))
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    rng, _ = jax.random.split(state.rng)
    return dataclasses.replace(state, step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state, rng=rng, references=references_state,
                               miner=miner_state), metrics

  def step_on_mesh(state: TrainState, batch: dict):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return train_step(state, batch)

  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,) if donate else ())
  return jax.jit(step_on_mesh, donate_argnums=(0,) if donate else (),
                 out_shardings=(sharding or parallel.replicated(mesh), parallel.replicated(mesh)))
