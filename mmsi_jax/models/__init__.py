"""Embedding models, found by name: `get(name, **kwargs)` returns a Flax linen module whose
`apply(variables, images, train=...)` gives L2-normalised embeddings [N, D]."""

from mmsi_jax.models.small_cnn import SmallCNN, l2_normalize

HEAD = "head"  # Name of the embedding head's parameters in every model.

_MODELS = {
    "small_cnn": SmallCNN,
}


def names() -> list[str]:
  return sorted(_MODELS)


def get(name: str, **kwargs):
  """Builds the model `name` with the given attributes (e.g. embed_dim)."""
  if name not in _MODELS:
    raise KeyError(f"Unknown model {name!r}; known models: {', '.join(names())}.")
  return _MODELS[name](**kwargs)


__all__ = ["HEAD", "SmallCNN", "get", "l2_normalize", "names"]
