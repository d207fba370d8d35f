"""The train step and its components: XBM against NumPy across the ring's wrap-around, the step's
gradient against the objective's own, learning-rate multipliers, every loss training, a miner that
needs no extra data, and config checks by each component."""

import dataclasses

import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import demo
from mmsi_jax import config_cli, losses, mining, references, reporting, step, train
from mmsi_jax.data import pipeline, transforms
from mmsi_jax.data.sampler import PKSampler
from mmsi_jax.mining import MINERS
from mmsi_jax.models import MODEL_PARAMS
from tests.test_every_loss import np_contrastive, np_multi_similarity, unit
from tests.test_train import latest_params, tiny_config

# ---------------------------------------------------------------------------------------------------
# XBM against an explicit NumPy computation.

XBM_LOSSES = {
    "contrastive": (dict(pos_margin=1.0, neg_margin=0.5), np_contrastive),
    "multi_similarity": (dict(alpha=2.0, beta=10.0, base=0.5, epsilon=0.1), np_multi_similarity),
}


def np_xbm_loss(batch, labels, memory, memory_labels, own_slot, np_loss, weight, on, **hparams):
  """L(batch, batch) + weight * L(batch, memory without each anchor's own copy), one anchor at a time."""
  batch_sets, memory_sets = [], []
  for i in range(len(batch)):
    sims = batch @ batch[i]
    others = np.arange(len(batch)) != i
    batch_sets.append((sims[others & (labels == labels[i])], sims[labels != labels[i]]))
    mem_sims = memory @ batch[i] if len(memory) else np.zeros(0)
    not_own = np.arange(len(memory)) != own_slot[i]
    memory_sets.append((mem_sims[not_own & (memory_labels == labels[i])],
                        mem_sims[memory_labels != labels[i]]))
  total = np_loss(batch_sets, **hparams)
  if on:
    total += weight * np_loss(memory_sets, **hparams)
  return total


@pytest.mark.parametrize("loss_name", sorted(XBM_LOSSES))
@pytest.mark.parametrize("size, batch", [(10, 4), (3, 4)])  # Wraps mid-batch; a batch larger than K.
def test_xbm_loss_over_steps_equals_numpy_across_the_wrap_around(loss_name, size, batch):
  hparams, np_loss = XBM_LOSSES[loss_name]
  weight, start_step = 0.7, 2
  xbm = references.CrossBatchMemory(num_classes=3, size=size, weight=weight, start_step=start_step)
  loss_fn = losses.get_pair_loss(loss_name)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    _, state = xbm.init(jax.random.PRNGKey(0), 5)
    state = state.replace(embeddings=state.embeddings.astype(jnp.float64))

    @jax.jit
    def xbm_step(state, embeddings, labels, step_number):
      state = xbm.update(state, {}, embeddings, labels, step_number)
      pairs = xbm.pairs(state, {}, embeddings, labels)
      loss, _ = xbm.objective(state, step_number, pairs, loss_fn, hparams)
      return state, loss

    written = []  # Every (embedding, label) enqueued so far, oldest first.
    for step_number in range(7):
      embeddings = unit(rng.normal(size=(batch, 5)))
      labels = rng.integers(0, 3, batch)
      state, loss = xbm_step(state, jnp.asarray(embeddings), jnp.asarray(labels),
                             jnp.asarray(step_number))
      on = step_number >= start_step
      if on:
        written.extend(zip(embeddings, labels))
      # An exact FIFO: the memory holds the last `size` rows written; its order is immaterial.
      kept = written[-size:]
      memory = np.array([e for e, _ in kept]).reshape(-1, 5)
      memory_labels = np.array([y for _, y in kept])
      # Anchor i's own copy is the (batch - i)-th newest row, if still kept.
      own_slot = [len(kept) - (batch - i) if on and batch - i <= len(kept) else -1
                  for i in range(batch)]
      expected = np_xbm_loss(embeddings, labels, memory, memory_labels, own_slot, np_loss, weight,
                             on, **hparams)
      np.testing.assert_allclose(loss, expected, rtol=1e-10, atol=1e-12)
      np.testing.assert_array_equal(np.asarray(state.valid).sum(), len(kept))
      np.testing.assert_allclose(np.sort(np.asarray(state.embeddings)[np.asarray(state.valid)], 0),
                                 np.sort(memory, 0), rtol=1e-12)


def test_xbm_gradient_matches_finite_differences_with_the_memory_held_constant():
  xbm = references.CrossBatchMemory(num_classes=3, size=6, weight=0.5, start_step=0)
  loss_fn = losses.get_pair_loss("multi_similarity")
  hparams = dict(alpha=2.0, beta=10.0, base=0.5, epsilon=0.1)
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    _, state = xbm.init(jax.random.PRNGKey(0), 4)
    state = state.replace(embeddings=state.embeddings.astype(jnp.float64))
    state = xbm.update(state, {}, jnp.asarray(unit(rng.normal(size=(4, 4)))),
                       jnp.asarray([0, 1, 2, 0]), 0)
    labels = jnp.asarray([0, 0, 1, 2])
    x = jnp.asarray(unit(rng.normal(size=(4, 4))))
    # The memory holds detached copies of the batch: the gradient reaches the anchors only.
    updated = xbm.update(state, {}, x, labels, 1)

    def loss_of(embeddings):
      return xbm.objective(updated, 1, xbm.pairs(updated, {}, embeddings, labels), loss_fn,
                           hparams)[0]

    check_grads(jax.jit(loss_of), (x,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The step: its gradient is the objective's, with every references component.

def tiny_demo_config(variant, data_dir="data"):
  config = demo.get_config(variant)
  config.data.data_dir = data_dir
  config.data.classes_per_batch = 4
  config.data.samples_per_class = 3
  config.model.widths = (4, 8)
  config.model.embed_dim = 8
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.references.xbm.size = 20
  config.references.xbm.start_step = 0
  return config


def demo_batches(glyphs_dir, config, num_steps, start_step=0, extra_batches=()):
  source = pipeline.load_split("glyphs", "train", glyphs_dir, decode_images=False)
  sampler = PKSampler(pipeline.split_labels(source), config.data.classes_per_batch,
                      config.data.samples_per_class, seed=0)
  return pipeline.train_batches(source, sampler, transform=transforms.train_transform(config.data),
                                start_step=start_step, num_steps=start_step + num_steps, seed=0,
                                extra_batches=extra_batches, num_threads=1, prefetch=2)


@pytest.mark.parametrize("variant", ["ms", "xbm_contrastive", "proxy_anchor"])
def test_step_without_miner_applies_exactly_the_objectives_gradient(glyphs_dir, variant):
  config = tiny_demo_config(variant)
  # An "optimizer" that keeps the step's gradient as its state (and changes no parameter).
  keep_gradient = optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
  components = dataclasses.replace(step.build(config, num_classes=100), tx=keep_gradient)
  state = step.create_train_state(jax.random.PRNGKey(0), components, (32, 32, 3))
  train_step = step.make_train_step(components)
  batches = demo_batches(glyphs_dir, config, 3)
  state, _ = train_step(state, next(batches))  # XBM's memory now holds a batch.
  batch = next(batches)
  images = transforms.normalize(batch["images"], config.data.normalization)

  def objective(params):  # Differentiated directly, not through W = dL/dS.
    (_, embeddings), _ = components.model.apply(
        {"params": params[MODEL_PARAMS], "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], method="features_and_embeddings")
    refs = components.references
    refs_state = refs.update(state.references, state.params, jax.lax.stop_gradient(embeddings),
                             batch["labels"], state.step)
    pairs = refs.pairs(refs_state, params, embeddings, batch["labels"])
    return refs.objective(refs_state, state.step, pairs, components.loss_fn, components.hparams)[0]

  loss, grads = jax.jit(jax.value_and_grad(objective))(state.params)
  new_state, metrics = train_step(state, batch)
  np.testing.assert_allclose(metrics["train/loss"], loss, rtol=1e-6)
  assert float(optax.tree.norm(grads)) > 0
  for got, want in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(grads)):
    # float32: the two sum in different orders; 1e-4 of each leaf's largest entry.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
  if variant == "proxy_anchor":  # The proxies get their gradient through S too.
    assert np.abs(np.asarray(new_state.opt_state["proxies"])).max() > 0


@pytest.mark.parametrize("scope", ["all", "head"])
def test_mmsi_weights_the_pairs_of_xbms_memory_too(glyphs_dir, scope):
  config = tiny_demo_config("xbm_contrastive")
  config.miner.name = "mmsi"
  config.miner.mmsi.update(scope=scope, wait_for_coverage=False, validation_classes=4)
  components = step.build(config, num_classes=100)
  state = step.create_train_state(jax.random.PRNGKey(0), components, (32, 32, 3))
  train_step = step.make_train_step(components)
  seen = []
  real_multipliers = components.miner.multipliers

  def recording(miner_state, inputs):
    mined = real_multipliers(miner_state, inputs)
    m = mined.multipliers
    seen.append(m.shape)
    memory_columns = jnp.where(inputs.pairs.neg[:, 12:], m[:, 12:], jnp.nan)
    spread = jnp.nanmax(memory_columns) - jnp.nanmin(memory_columns)
    return mined._replace(metrics={**mined.metrics, "memory_spread": spread})

  object.__setattr__(components.miner, "multipliers", recording)
  for batch in demo_batches(glyphs_dir, config, 3, extra_batches=components.extra_batches):
    state, metrics = train_step(state, batch)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["mmsi/meta_loss"])
  assert seen == [(12, 12 + 20)]  # Traced once: the batch's 12 columns, then the memory's 20.
  assert np.asarray(state.references.valid).sum() == 20  # XBM's memory, full after 36 rows.
  assert np.asarray(state.miner.memory.valid).sum() > 0  # MMSI's own dictionary, apart.
  # Meta-weighting is on and tells the memory's negative pairs apart.
  assert metrics["mmsi/ready"] == 1 and metrics["memory_spread"] > 0.01


def test_learning_rate_multipliers_scale_each_groups_adam_step():
  optim = ml_collections.ConfigDict(dict(
      name="adam", weight_decay=0.1, eps=1e-8, lr_mults={"proxies": 100.0, "model/head": 10.0}))
  tx = step.create_optimizer(optim, lambda count: 0.01)
  params = {"model": {"head": {"kernel": jnp.array([1.0, -2.0])}, "conv": jnp.array([0.5])},
            "proxies": jnp.array([[3.0, -1.0]])}
  grads = {"model": {"head": {"kernel": jnp.array([0.2, 0.3])}, "conv": jnp.array([-1.0])},
           "proxies": jnp.array([[0.5, 0.25]])}
  updates, _ = tx.update(grads, tx.init(params), params)
  # One Adam step by hand: g' = g + wd * p (L2 in the gradient); m^ = g', v^ = g'^2 after bias
  # correction, so the update is -lr * mult * g' / (|g'| + 1e-8).
  for path, mult in ((("model", "head", "kernel"), 10.0), (("model", "conv"), 1.0),
                     (("proxies",), 100.0)):
    p, g, u = params, grads, updates
    for key in path:
      p, g, u = p[key], g[key], u[key]
    g_total = np.asarray(g) + 0.1 * np.asarray(p)
    # (float32: 1 - 0.999 alone is off by 5e-5 relative.)
    np.testing.assert_allclose(u, -0.01 * mult * g_total / (np.abs(g_total) + 1e-8), rtol=1e-4)
  with pytest.raises(ValueError, match="optim.lr_mults.proxy=100.0 applies to no parameter"):
    step.check_lr_multipliers(params, {"proxy": 100.0})


# ---------------------------------------------------------------------------------------------------
# Every registered loss trains.

EVERY_LOSS = ["ms", "contrastive", "triplet", "lifted_structure", "binomial_deviance", "ntxent",
              "ratio_triplet", "global_loss", "ratio_triplet_global", *demo.PROXY_LOSSES,
              "distance_contrastive"]


def test_every_registered_loss_is_covered():
  covered = {demo.PAIR_LOSSES.get(v, (v,))[0] for v in EVERY_LOSS}
  assert covered == set(losses.names()) | set(losses.proxy_names())


@pytest.mark.parametrize("variant", EVERY_LOSS)
def test_every_loss_trains_30_steps_on_the_demo_with_falling_loss(glyphs_dir, variant):
  config = tiny_demo_config(variant if variant in demo.VARIANTS else "ms")
  if variant not in demo.VARIANTS:  # Chosen with one flag: the loss with its default hyperparameters.
    notes = config_cli.apply_overrides(config, [f"--config.loss.name={variant}"])
    assert dict(config.loss.hparams) == {} and len(notes) == 1, notes
  config.data.classes_per_batch = 8
  config.model.widths, config.model.embed_dim = (8, 16), 16
  config.optim.learning_rate = 5e-3
  components = step.build(config, num_classes=100)
  state = step.create_train_state(jax.random.PRNGKey(0), components, (32, 32, 3))
  train_step = step.make_train_step(components)
  # Batch-all triplet and multi-similarity average over the pairs their mining keeps, a mean that holds
  # level (triplet's rises) as the easy pairs drop out; what falls is the share of pairs still mined.
  tracked = "train/active_pairs" if variant in ("triplet", "ms") else "train/loss"
  history = []
  for batch in demo_batches(glyphs_dir, config, 30):
    state, metrics = train_step(state, batch)
    history.append(float(metrics[tracked]))
  assert np.all(np.isfinite(history))
  assert np.mean(history[-5:]) < 0.97 * np.mean(history[:5]), history


# ---------------------------------------------------------------------------------------------------
# A miner with no extra data; config checks by each component.

class NegativesTwice(mining.Miner):
  """A test miner: doubles the weight of every negative pair; needs nothing but the batch (the
  protocol's default capabilities)."""

  def __init__(self, model, pair_loss, hparams, num_classes, *, factor):
    del model, pair_loss, hparams, num_classes
    self.factor = factor

  def init(self, rng, embed_dim, feature_dim):
    del rng, embed_dim, feature_dim
    return {}, {"calls": jnp.zeros((), jnp.int32)}

  def multipliers(self, state, inputs):
    m = jnp.where(inputs.pairs.neg, self.factor, 1.0)
    return mining.MinerStep(m, {"calls": state["calls"] + 1},
                            {"twice/negative_weight": jnp.asarray(self.factor)})


def test_a_miner_without_extra_batches_trains_end_to_end(glyphs_dir, tmp_path):
  config = tiny_config(glyphs_dir, num_steps=10)
  config.miner.name = "twice"
  config.miner.twice = ml_collections.ConfigDict({"factor": 2.0})
  with MINERS.registered("twice", NegativesTwice):
    final = train.train_and_evaluate(config, str(tmp_path / "run"))
  records = reporting.read_metrics(str(tmp_path / "run"))
  assert [r["twice/negative_weight"] for r in records if "twice/negative_weight" in r] == [2.0, 2.0]
  assert np.isfinite(final["test/recall@1"])
  assert int(latest_params(str(tmp_path / "run"))[1]["miner"]["calls"]) == 10


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.references.xbm.update(sise=5), "references.xbm.sise is not a setting of the "
                                                "references 'xbm'"),
    (lambda c: c.miner.update(xbm=ml_collections.ConfigDict({"size": 5})),
     "miner.xbm names no miner"),
    (lambda c: c.miner.mmsi.update(modee="l2rw"), "miner.mmsi.modee is not a setting of the miner"),
    (lambda c: setattr(c, "loss", ml_collections.ConfigDict(dict(name="norm_softmax", hparams={}))),
     "norm_softmax' is a proxy loss, which references.name='batch' does not serve: use one of "
     r"\[.*'proxies'\]"),
    (lambda c: c.references.update(name="proxies"), "'multi_similarity' is a pair loss"),
    (lambda c: c.optim.lr_mults.update(proxies=-1.0), "optim.lr_mults must be positive"),
    (lambda c: c.references.proxies.update(init="zeros"), "references.proxies.init='zeros'"),
])
def test_each_component_checks_its_own_settings_before_any_work(tmp_path, edit, message):
  config = tiny_config(str(tmp_path / "data"))
  edit(config)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "data").exists()


def test_mmsi_refuses_a_proxy_loss(tmp_path):
  config = tiny_demo_config("norm_softmax", str(tmp_path / "data"))
  config.miner.name = "mmsi"
  with pytest.raises(ValueError, match="re-weights pair losses"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_every_variant_of_every_config_passes_the_checks():
  from configs import cars196, cub200, real_datasets, sop  # pylint: disable=import-outside-toplevel
  for variant in demo.VARIANTS:
    train.check_config(demo.get_config(variant))
  for module in (cub200, cars196, sop):
    for variant in real_datasets.VARIANTS:
      train.check_config(module.get_config(variant))
