"""OSM + CAA: online soft mining with class-aware attention (Wang et al., AAAI 2019; docs/METHODS.md).

Pair weights over the batch's pairs, from the distances d_ij = sqrt(2 - 2 S_ij) of the unit embeddings:

    OSM    w_ij = exp(-d_ij^2 / (2 sigma^2))     positive pairs (sigma = pos_sigma, 0.8)
           w_ij = [alpha - d_ij]_+               negative pairs (alpha = margin, 1.2)
    CAA    w_ij <- w_ij * min(a_i, a_j),   a_i = exp(-(p_i - 1)^2 / (2 * 0.68^2))

p_i is the probability that a softmax classifier over the pooled backbone features gives sample i's own
class, held constant: a sample the classifier finds unlike its class (an outlier, a mislabelled image)
gets a small attention and its pairs count less. Each set is then normalised to lambda (set_weight):

    w^_ij = lambda * w_ij / (sum_{i<j in the same set} w_ij + 1e-12)

and the weights are constants of the step: the method trains on sum_{i<j} w^_ij 1/P 1/2 l_ij, the
contrastive loss on distances (losses/distance_contrastive.py) with weights. Here they are the miner's
multipliers m = w^ of that loss's pair weights W = dL/dS: the loss is the mean over the B (B - 1)
entries of S, each unordered pair twice, so sum_ij m_ij W_ij dS_ij is exactly the authors' gradient
(scale "authors"). Scale "pair_count" multiplies m by the number of entries the loss averages over,
N = B (B - 1) = 2P ordered pairs, cancelling its mean: the step trains on sum_{i<j} w^_ij l_ij, 2P
times the authors' loss (each set's pair losses averaged with the weights w^ / lambda, times lambda).

The classifier (with attention on) is a head of this miner, trained by the model optimizer on the
auxiliary loss that the train step adds to the objective: one linear softmax classifier per feature
group of the model (models/embedding.py; one group, "features", for the pooled features of any
backbone; three on BN-Inception's "osm_caa" layout, after inception_5b's pooling, inception_4e and
inception_3c, as the authors), params["classifier"][group] = {kernel [F_g, C], bias [C]}, each on

    L_cls = classifier_weight * sum_i v_i (-log p_i),   v_i = g_i / sum_k g_k,
    g_i = exp(-(p_i - 0.5)^2 / (2 * 0.18^2)),

a cross-entropy focused on the samples the classifier is unsure of (v held constant); their gradients
reach the backbone through the features. The attention's p_i is the first group's classifier's (pool5).
"""

import jax
import jax.numpy as jnp

from mmsi_jax.mining.base import Miner, MinerStep, StepInputs
from mmsi_jax.models.embedding import group_slices
from mmsi_jax.search_space import Float, tunable

CLASSIFIER_PARAMS = "classifier"  # The classifiers' parameter group in TrainState.params.
ALL_FEATURES = "features"  # The classifier's name for a model whose features are one group.
SCALES = ("authors", "pair_count")
NORMALISER_EPS = 1e-12  # Added to each set's weight sum, as the authors' code does.


def gaussian(x: jax.Array, mean: float, sigma: float) -> jax.Array:
  """exp(-(x - mean)^2 / (2 sigma^2)): a Gaussian without its constant, which normalising cancels."""
  return jnp.exp(-jnp.square(x - mean) / (2.0 * sigma * sigma))


def osm_weights(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, pos_sigma: float,
                margin: float) -> jax.Array:
  """OSM's raw weights [B, M]: exp(-d^2 / (2 pos_sigma^2)) on positives, [margin - d]_+ on negatives,
  0 elsewhere (d from the similarities of unit embeddings)."""
  squared = jnp.maximum(2.0 - 2.0 * sim, 0.0)  # Held constant: no gradient, so no floor needed.
  return (jnp.where(pos, jnp.exp(-squared / (2.0 * pos_sigma * pos_sigma)), 0.0)
          + jnp.where(neg, jax.nn.relu(margin - jnp.sqrt(squared)), 0.0))


def normalise_sets(weights: jax.Array, pos: jax.Array, neg: jax.Array, set_weight: float) -> jax.Array:
  """w^ = set_weight * w / (sum of w over the unordered pairs of its set + 1e-12), for the positive and
  the negative set of a symmetric [B, B] matrix (each unordered pair is two of its entries)."""
  normalised = jnp.zeros_like(weights)
  for group in (pos, neg):
    pair_total = 0.5 * jnp.sum(jnp.where(group, weights, 0.0))
    normalised = jnp.where(group, set_weight * weights / (pair_total + NORMALISER_EPS), normalised)
  return normalised


def own_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """p_i = softmax(logits_i)[label_i], [B]."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.exp(jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0])


def focused_cross_entropy(logits: jax.Array, labels: jax.Array, *, mean: float,
                          sigma: float) -> jax.Array:
  """sum_i v_i (-log p_i), v = Gaussian(p; mean, sigma) normalised to sum 1 over the batch, held
  constant (the authors' weighted softmax loss)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  own = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  focus = jax.lax.stop_gradient(gaussian(jnp.exp(own), mean, sigma))
  return -jnp.sum(focus * own) / jnp.sum(focus)


@tunable(pos_sigma=Float(0.2, 2.0, log=True), attention_sigma=Float(0.2, 2.0, log=True))
class OSMCAA(Miner):
  """The OSM + CAA miner (the miner protocol: mmsi_jax/mining/base.py), pure and jittable.

  Args:
    model: the embedding model; its `feature_groups` name the classifiers' inputs.
    pair_loss, hparams: unused (the weights depend on the pairs and the classifiers only).
    num_classes: C, the training classes: each classifier's outputs.
    The keyword-only settings are the `miner.osm_caa` config, documented in configs/default.py.
  """

  def __init__(self, model, pair_loss, hparams, num_classes: int, *, pos_sigma: float, margin: float,
               set_weight: float, attention: bool, attention_sigma: float, classifier_weight: float,
               classifier_focus_mean: float, classifier_focus_sigma: float, scale: str):
    del pair_loss, hparams
    for name, value in (("pos_sigma", pos_sigma), ("margin", margin), ("set_weight", set_weight),
                        ("attention_sigma", attention_sigma),
                        ("classifier_focus_sigma", classifier_focus_sigma)):
      if value <= 0:
        raise ValueError(f"miner.osm_caa.{name}={value} must be positive.")
    if attention and classifier_weight <= 0:
      raise ValueError(f"miner.osm_caa.classifier_weight={classifier_weight} must be positive with "
                       f"attention on: the attention reads a classifier that this loss trains.")
    if scale not in SCALES:
      raise ValueError(f"miner.osm_caa.scale={scale!r} is not one of {SCALES}.")
    self.num_classes = num_classes
    self.model_groups = tuple(getattr(model, "feature_groups", ()))
    self.pos_sigma, self.margin, self.set_weight = pos_sigma, margin, set_weight
    self.attention, self.attention_sigma = attention, attention_sigma
    self.classifier_weight = classifier_weight
    self.focus_mean, self.focus_sigma = classifier_focus_mean, classifier_focus_sigma
    self.scale = scale
    # The miner's auxiliary loss, which the step adds to the objective (mining/base.py); no classifier
    # without attention.
    self.auxiliary_loss = self.classifier_loss if attention else None

  def feature_groups(self, feature_dim: int) -> tuple[tuple[str, int], ...]:
    """The classifiers' (name, input width), in the features' order."""
    groups = self.model_groups or ((ALL_FEATURES, feature_dim),)
    if sum(width for _, width in groups) != feature_dim:
      raise ValueError(f"The model's feature groups {groups} do not add up to its {feature_dim} "
                       f"features.")
    return groups

  def init(self, rng: jax.Array, embed_dim: int, feature_dim: int):
    """The classifiers {group: {kernel [F_g, C] (LeCun normal), bias [C] (0)}} with attention on; no
    state."""
    del embed_dim
    if not self.attention:
      return {}, None
    groups = self.feature_groups(feature_dim)
    classifiers = {}
    for (name, width), key in zip(groups, jax.random.split(rng, len(groups))):
      classifiers[name] = {"kernel": jax.nn.initializers.lecun_normal()(key, (width, self.num_classes)),
                           "bias": jnp.zeros((self.num_classes,))}
    return {CLASSIFIER_PARAMS: classifiers}, None

  def logits(self, params, features: jax.Array) -> dict:
    """{group: the logits [B, C] of its classifier over its columns of features [B, F]}, in the groups'
    order (the first is the attention's)."""
    columns = group_slices(self.feature_groups(features.shape[-1]))
    return {name: features[:, group] @ params[CLASSIFIER_PARAMS][name]["kernel"].astype(features.dtype)
                  + params[CLASSIFIER_PARAMS][name]["bias"]
            for name, group in columns.items()}

  def classifier_loss(self, params, features: jax.Array, labels: jax.Array):
    """(classifier_weight * the sum of the classifiers' L_cls, metrics): the auxiliary loss (module
    docstring)."""
    total, metrics = 0.0, {}
    for index, (name, logits) in enumerate(self.logits(params, features).items()):
      loss = focused_cross_entropy(logits, labels, mean=self.focus_mean, sigma=self.focus_sigma)
      total = total + loss
      suffix = "" if index == 0 else f"/{name}"  # The first (attention's) classifier: no suffix.
      metrics[f"osm_caa/classifier_loss{suffix}"] = loss
      metrics[f"osm_caa/classifier_accuracy{suffix}"] = jnp.mean(
          (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return self.classifier_weight * total, metrics

  def attention_weights(self, params, features: jax.Array, labels: jax.Array) -> jax.Array:
    """a_i = Gaussian(p_i; 1, attention_sigma) [B] from the first classifier's p_i, held constant.
    (The other classifiers' logits are not used: XLA drops them.)"""
    logits = next(iter(self.logits(params, jax.lax.stop_gradient(features)).values()))
    p = own_class_probability(logits, labels)
    return jax.lax.stop_gradient(gaussian(p, 1.0, self.attention_sigma))

  def multipliers(self, state, inputs: StepInputs):
    """MinerStep(m = w^ [B, B], state, metrics) for the batch's pairs (module docstring)."""
    pairs = inputs.pairs
    batch = inputs.labels.shape[0]
    if pairs.sim.shape != (batch, batch):
      raise ValueError(f"miner.osm_caa weighs the pairs of the batch with itself, but S is "
                       f"{pairs.sim.shape}: use references.name='batch'.")
    sim = jax.lax.stop_gradient(pairs.sim)
    raw = osm_weights(sim, pairs.pos, pairs.neg, pos_sigma=self.pos_sigma, margin=self.margin)
    metrics = {}
    if self.attention:
      attention = self.attention_weights(inputs.params, inputs.features, inputs.labels)
      raw = raw * jnp.minimum(attention[:, None], attention[None, :])
      metrics["osm_caa/attention"] = jnp.mean(attention)
    multipliers = normalise_sets(raw, pairs.pos, pairs.neg, self.set_weight)
    if self.scale == "pair_count":
      multipliers = multipliers * jnp.sum(pairs.pos | pairs.neg)
    metrics["osm_caa/active_negatives"] = (jnp.sum(pairs.neg & (raw > 0))
                                           / jnp.maximum(jnp.sum(pairs.neg), 1))
    return MinerStep(jax.lax.stop_gradient(multipliers), state, metrics)
