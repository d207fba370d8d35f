"""Embedding models, found by name: `get(name, **kwargs)` returns a Flax linen module whose
`apply(variables, images, train=...)` gives L2-normalised embeddings [N, D], with `features` and
`embed` methods and the head's parameters under "head" (see models/embedding.py)."""

from mmsi_jax.models.bn_inception import bn_inception
from mmsi_jax.models.embedding import (HEAD, MODEL_PARAMS, EmbeddingNet, global_pool, group_slices,
                                       l2_normalize)
from mmsi_jax.models.resnet import resnet18, resnet50
from mmsi_jax.models.small_cnn import small_cnn
from mmsi_jax.registry import Registry

MODELS = Registry("model")
for _name, _factory in {
    "bn_inception": bn_inception,
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
}.items():
  MODELS.register(_name)(_factory)


def names() -> list[str]:
  return MODELS.names()


def get(name: str, **kwargs) -> EmbeddingNet:
  """Builds the model `name` with the given settings (e.g. embed_dim)."""
  return MODELS.build(name, kwargs, where="model")


__all__ = ["HEAD", "MODEL_PARAMS", "MODELS", "EmbeddingNet", "get", "global_pool", "group_slices",
           "l2_normalize", "names"]
