"""The shape every model of the registry has: a backbone, then a linear embedding head, L2-normalised
(or, for a layout whose embedding is a branch of the backbone, that branch's features, L2-normalised)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD = "head"  # Name of the embedding head's parameters in every model.
MODEL_PARAMS = "model"  # The model's parameter group in the TrainState's params (beside e.g. proxies).
# None: the parameters' and inputs' own (float32; float64 where tests enable it).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """The activations' dtype of `model.dtype` (parameters are float32 either way); None: no cast."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"model.dtype={name!r}: use 'float32', or 'bfloat16' for mixed precision (bf16 "
                     f"activations, float32 parameters, embeddings and losses) on GPUs and TPUs.")
  return COMPUTE_DTYPES[name]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of x [N, D] scaled to unit L2 norm."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def group_slices(groups: tuple[tuple[str, int], ...]) -> dict[str, slice]:
  """{name: its columns of the features} for consecutive named groups ((name, width), ...), in order."""
  slices, start = {}, 0
  for name, width in groups:
    slices[name] = slice(start, start + width)
    start += width
  return slices


def global_pool(x: jax.Array, pooling: str) -> jax.Array:
  """[N, H, W, C] -> [N, C] ("max", "avg", "max_plus_avg": their sum) or [N, 2C] ("max_avg": both,
  concatenated)."""
  if pooling == "max":
    return jnp.max(x, axis=(1, 2))
  if pooling == "avg":
    return jnp.mean(x, axis=(1, 2))
  if pooling == "max_avg":
    return jnp.concatenate([jnp.max(x, axis=(1, 2)), jnp.mean(x, axis=(1, 2))], axis=-1)
  if pooling == "max_plus_avg":
    return jnp.max(x, axis=(1, 2)) + jnp.mean(x, axis=(1, 2))
  raise ValueError(f"Unknown pooling {pooling!r}; use 'max', 'avg', 'max_avg' or 'max_plus_avg'.")


class EmbeddingNet(nn.Module):
  """embeddings = l2_normalize(head(backbone(images))).

  `features(images, train)` -> [N, F] runs the backbone and `embed(features)` -> [N, D] the head (its
  parameters under "head"), so a miner can differentiate through the head alone (MMSI's head scope).
  Mixed precision: the backbone computes in `dtype` (its parameters float32); its features are cast to
  float32, so the head, the embeddings, the similarities and the losses are float32.

  Attributes:
    backbone: a module `(images [N, H, W, 3], train) -> features [N, F]` computing in `dtype`.
    embed_dim: D.
    dtype: the backbone's activations (compute_dtype).
    feature_groups: ((name, width), ...): the features as consecutive named groups, for a backbone
      whose features come from several layers (BN-Inception's "osm_caa" layout; a miner's classifier
      per group, mining/osm_caa.py); () for one group.
    embedding_group: the name of the group that is the embedding itself, L2-normalised, with no linear
      head (no "head" parameters); "" for the linear head over all features.
  """
  backbone: nn.Module
  embed_dim: int
  dtype: Any = None
  feature_groups: tuple[tuple[str, int], ...] = ()
  embedding_group: str = ""

  def setup(self):
    if not self.embedding_group:
      self.head = nn.Dense(self.embed_dim)
      return
    slices = group_slices(self.feature_groups)
    if self.embedding_group not in slices:
      raise ValueError(f"embedding_group={self.embedding_group!r} is not one of the feature groups "
                       f"{list(slices)}.")
    self.embedding_columns = slices[self.embedding_group]

  @property
  def has_head(self) -> bool:
    """Whether the embedding is a linear head's (parameters under "head") over the features."""
    return not self.embedding_group

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    if self.dtype is None:
      return self.backbone(images, train)
    return self.backbone(images.astype(self.dtype), train).astype(jnp.float32)

  def embed(self, features: jax.Array) -> jax.Array:
    if self.has_head:
      return l2_normalize(self.head(features))
    return l2_normalize(features[:, self.embedding_columns])

  def features_and_embeddings(self, images: jax.Array, train: bool = False):
    features = self.features(images, train)
    return features, self.embed(features)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.embed(self.features(images, train))
