"""Embedding models, found by name: `get(name, **kwargs)` returns a Flax linen module whose
`apply(variables, images, train=...)` gives L2-normalised embeddings [N, D], with `features` and
`embed` methods and the head's parameters under "head" (see models/embedding.py)."""

from mmsi_jax.models.bn_inception import bn_inception
from mmsi_jax.models.embedding import HEAD, EmbeddingNet, global_pool, l2_normalize
from mmsi_jax.models.resnet import resnet18, resnet50
from mmsi_jax.models.small_cnn import small_cnn

_MODELS = {
    "bn_inception": bn_inception,
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


def names() -> list[str]:
  return sorted(_MODELS)


def get(name: str, **kwargs) -> EmbeddingNet:
  """Builds the model `name` with the given settings (e.g. embed_dim)."""
  if name not in _MODELS:
    raise KeyError(f"Unknown model {name!r}; known models: {', '.join(names())}.")
  return _MODELS[name](**kwargs)


__all__ = ["HEAD", "EmbeddingNet", "get", "global_pool", "l2_normalize", "names"]
