"""The datasets by name, each with the module and class of its TFDS builder.

A builder module loads TFDS (about 1.5 s): checking a config needs only the names, and pipeline.py
imports the builders when it builds or reads a dataset.
"""

import importlib

BUILDERS = {
    "glyphs": ("mmsi_jax.data.glyphs", "Glyphs"),
    "glyphs_pretrain": ("mmsi_jax.data.glyphs", "GlyphsPretrain"),
    "cub200": ("mmsi_jax.data.cub200", "Cub200"),
    "cars196": ("mmsi_jax.data.cars196", "Cars196"),
    "sop": ("mmsi_jax.data.sop", "StanfordOnlineProducts"),
}


def names() -> list[str]:
  return list(BUILDERS)


def builder_class(name: str) -> type:
  module, class_name = BUILDERS[name]
  return getattr(importlib.import_module(module), class_name)
