"""The checks of a config before any work: each key, value and combination that cannot run fails with a
message that names the key and the fix.

It loads no dataset code (TFDS, grain) and no checkpointing, so that `python -m mmsi_jax.main` reports
a config error within seconds of its start.
"""

import functools

import jax
import ml_collections
import numpy as np

from mmsi_jax import batch_policies, losses, mining, models, references
from mmsi_jax.data import catalog, sampler as sampler_lib, transforms


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails with a message naming the key and the fix, before any work, when the config cannot run.

  Each component checks its own settings against its registry (a key its factory does not take stops
  the run), for the selected component and for every other one the config configures.
  """
  def require(ok, message):
    if not ok:
      raise ValueError(f"Invalid config: {message}")

  def checked(check, *args, **kwargs):
    try:
      check(*args, **kwargs)
    except (ValueError, TypeError) as e:  # A wrong key or value; a missing setting.
      require(False, str(e))

  def check_components(where, registry, stand_in, none=None):
    """The selected component and every other one configured under `where`: their keys, then their
    values, by making each with a stand-in context (making a component builds nothing)."""
    selected = config[where].name
    require(selected in registry or selected == none,
            f"{where}.name={selected!r} is not one of {([none] if none else []) + registry.names()}.")
    configured = [key for key in config[where] if key != "name"]
    if selected in registry and selected not in configured:
      configured.append(selected)
    for name in configured:
      require(name in registry, f"{where}.{name} names no {registry.kind}; the {registry.kind} "
                                f"settings are {registry.names()}.")
      checked(registry.build, name, config[where].get(name, {}), f"{where}.{name}", **stand_in)

  require(config.data.name in catalog.names(),
          f"data.name={config.data.name!r} is not one of {catalog.names()}.")
  folds, fold = config.data.validation.folds, config.data.validation.fold
  require(folds == 0 or (folds >= 2 and 0 <= fold < folds),
          f"data.validation.folds={folds}, data.validation.fold={fold}: folds is 0 (no validation) or "
          f"at least 2 (2: half and half), and fold one of 0 .. folds - 1.")
  require(config.data.sampler in sampler_lib.SAMPLERS,
          f"data.sampler={config.data.sampler!r} is not one of {tuple(sampler_lib.SAMPLERS)}.")
  require(config.data.normalization in transforms.NORMALIZATIONS,
          f"data.normalization={config.data.normalization!r} is not one of {transforms.NORMALIZATIONS}.")
  require(config.data.train_crop in ("pad", "random_resized", "center"),
          f"data.train_crop={config.data.train_crop!r} is not 'pad', 'random_resized' or 'center'.")
  require(config.data.train_crop == "pad" or config.data.image_size > 0,
          f"data.train_crop={config.data.train_crop!r} needs data.image_size > 0.")
  require(config.model.name in models.names(),
          f"model.name={config.model.name!r} is not one of {models.names()}.")
  checked(models.MODELS.check_settings, config.model.name,
          {k: v for k, v in config.model.items() if k != "name"}, "model")
  all_losses = losses.names() + losses.proxy_names()
  require(config.loss.name in all_losses, f"loss.name={config.loss.name!r} is not one of {all_losses}.")
  checked(losses.registry_of(config.loss.name).check_settings, config.loss.name, config.loss.hparams,
          "loss.hparams")
  checked(_check_loss_values, config.loss.name, dict(config.loss.hparams))
  check_components("references", references.REFERENCES, {"num_classes": 1})
  loss_kind = "proxy" if losses.is_proxy_loss(config.loss.name) else "pair"
  fitting = [n for n in references.REFERENCES.names() if references.kind_of(n) == loss_kind]
  require(references.kind_of(config.references.name) == loss_kind,
          f"loss.name={config.loss.name!r} is a {loss_kind} loss, which references.name="
          f"{config.references.name!r} does not serve: use one of {fitting}.")
  check_components("miner", mining.MINERS,
                   dict(model=None, pair_loss=None, hparams={}, num_classes=1), none=mining.NONE)
  require(config.miner.name == mining.NONE or loss_kind == "pair",
          f"miner.name={config.miner.name!r} re-weights pair losses; loss.name={config.loss.name!r} is "
          f"a proxy loss: use miner.name='none' or a pair loss.")
  require(config.data.batch_policy in batch_policies.BATCH_POLICIES,
          f"data.batch_policy={config.data.batch_policy!r} is not one of "
          f"{batch_policies.BATCH_POLICIES.names()}.")
  stand_in_labels = np.arange(4096) % config.data.classes_per_batch
  policy = None
  try:
    policy = batch_policies.build(config.data, stand_in_labels, seed=0, held_out_fraction=0.0,
                                  loss_fn=losses.registry_of(config.loss.name).get(config.loss.name),
                                  hparams=dict(config.loss.hparams))
  except (ValueError, TypeError) as e:  # A wrong key or value; a missing setting.
    require(False, str(e))
  layout = getattr(references.REFERENCES.get(config.references.name), "batch_layout", policy.layout)
  require(layout == policy.layout,
          f"references.name={config.references.name!r} reads batches laid out as {layout!r}, which "
          f"data.batch_policy={config.data.batch_policy!r} does not deliver ({policy.layout!r}).")
  train = config.train
  for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    require(train[key] > 0, f"train.{key} must be positive, got {train[key]}.")
  require(train.checkpoint_every % train.log_every == 0,
          f"train.checkpoint_every ({train.checkpoint_every}) must be a multiple of train.log_every "
          f"({train.log_every}) so that a resumed run logs exactly what an uninterrupted one does.")
  batch_size = policy.batch_size
  require(batch_size % jax.device_count() == 0,
          f"The batch of {batch_size} images cannot be split over {jax.device_count()} devices: make "
          f"it (data.classes_per_batch * data.samples_per_class, or 3 * "
          f"data.smart_mining.triplets_per_batch) a multiple of the device count.")
  require(config.optim.name in ("adam", "adamw", "sgd"),
          f"optim.name={config.optim.name!r} is not 'adam', 'adamw' or 'sgd'.")
  require(config.optim.schedule in ("constant", "cosine", "step"),
          f"optim.schedule={config.optim.schedule!r} is not 'constant', 'cosine' or 'step'.")
  boundaries = list(config.optim.step_boundaries)
  require(config.optim.schedule != "step" or (
      boundaries == sorted(boundaries) and all(0 < b < train.num_steps for b in boundaries)),
          f"optim.step_boundaries={tuple(boundaries)} must be increasing steps in (0, "
          f"train.num_steps={train.num_steps}).")
  require(config.optim.step_factor > 0, "optim.step_factor must be positive.")
  require(0 <= config.optim.momentum < 1, "optim.momentum must be in [0, 1).")
  require(0 <= config.data.label_noise <= 1,
          f"data.label_noise={config.data.label_noise} is a fraction of the training images: use a "
          f"value in [0, 1].")
  require(config.optim.learning_rate > 0, "optim.learning_rate must be positive.")
  require(all(value > 0 for value in config.optim.lr_mults.values()),
          f"optim.lr_mults must be positive, got {dict(config.optim.lr_mults)}.")
  require(0 <= config.optim.warmup_steps < train.num_steps,
          f"optim.warmup_steps={config.optim.warmup_steps} must be in [0, train.num_steps="
          f"{train.num_steps}): lower --config.optim.warmup_steps or raise --config.train.num_steps.")
  check_distributed(config)
  ks = tuple(config.eval.ks)
  require(ks and all(isinstance(k, int) and k >= 1 for k in ks),
          f"eval.ks={ks} must be positive integers, e.g. --config.eval.ks=1,2,4,8.")


def check_distributed(config: ml_collections.ConfigDict) -> None:
  """The distributed.* settings, which the command line needs before it joins the other processes
  (and before check_config may ask JAX for the devices)."""
  heartbeat = config.distributed.heartbeat_timeout_seconds
  hang = config.distributed.hang_timeout_seconds
  if not (isinstance(heartbeat, int) and heartbeat >= 1):
    raise ValueError(f"Invalid config: distributed.heartbeat_timeout_seconds={heartbeat!r} must be a "
                     f"whole number of seconds, at least 1 (e.g. 15).")
  if not hang >= 0:
    raise ValueError(f"Invalid config: distributed.hang_timeout_seconds={hang!r} must be at least 0 "
                     f"(0: no limit).")


def _check_loss_values(name: str, hparams: dict) -> None:
  """Raises the loss's own ValueError or TypeError for a refused value of `hparams`, naming the key:
  the loss traced on a stand-in similarity matrix (shapes only, nothing computed)."""
  sim = jax.ShapeDtypeStruct((4, 8), np.float32)
  masks = jax.ShapeDtypeStruct((4, 8), np.bool_)
  try:
    jax.eval_shape(functools.partial(losses.registry_of(name).get(name), **hparams), sim, masks, masks)
  except (ValueError, TypeError) as e:
    named = [key for key in hparams if str(e).startswith((f"{key}=", f"{key} "))]
    where = f"loss.hparams.{named[0]}={hparams[named[0]]!r}" if named else f"loss.hparams={hparams}"
    raise ValueError(f"{where} is refused by the {losses.registry_of(name).kind} {name!r}: {e}") from e
