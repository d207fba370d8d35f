"""References: the columns of the similarity matrix S that the loss sees, and the loss over them.

A references component, found by name in `REFERENCES` (config `references.name`, settings under
`references.<name>`), decides what the B anchors of a step are compared with:

  batch    the batch itself (every pair loss's default)
  xbm      the batch and a cross-batch memory of past embeddings (Wang et al., CVPR 2020)
  proxies  C learnable class proxies (every proxy loss's default)
  memvir   the proxies and past steps' embeddings and proxies as virtual classes (Ko et al., ICCV 2021)
  triplets a batch of (anchor, positive, negative) rows: each anchor against its own two (Smart Mining)

Each is an object with pure, jittable methods (docs/ARCHITECTURE.md draws how the step calls them):

  kind                                      "pair" or "proxy": the losses it serves
  init(rng, embed_dim) -> (params, state)   parameter groups it adds to TrainState.params (e.g.
                                            {"proxies": [C, D]}, trained by the model optimizer) and
                                            its own state (e.g. a memory), kept in TrainState.references
  update(state, params, embeddings, labels, step) -> state
                                            takes in this step's detached batch; the step calls it
                                            before `pairs`, so the loss sees the updated state (XBM
                                            enqueues the batch before its memory term)
  pairs(state, params, embeddings, labels) -> Pairs
                                            S [N, M] and its masks, differentiable in the embeddings and
                                            the params
  objective(state, step, pairs, loss_fn, hparams) -> (loss, metrics)
                                            the loss as a function of pairs.sim (one or several terms)

Built with `build(config, num_classes)`; the component's settings are its factory's keyword-only
arguments, checked against the config before any work.
"""

import ml_collections

from mmsi_jax.references.batch import BatchReferences
from mmsi_jax.references.memvir import MemoryVirtualClasses
from mmsi_jax.references.proxies import ClassProxies
from mmsi_jax.references.triplets import TripletReferences
from mmsi_jax.references.xbm import CrossBatchMemory
from mmsi_jax.registry import Registry

REFERENCES = Registry("references")
REFERENCES.register("batch")(BatchReferences)
REFERENCES.register("proxies")(ClassProxies)
REFERENCES.register("xbm")(CrossBatchMemory)
REFERENCES.register("memvir")(MemoryVirtualClasses)
REFERENCES.register("triplets")(TripletReferences)

DEFAULTS = ("batch", "proxies")  # The plain references of a pair and of a proxy loss.


def kind_of(name: str) -> str:
  """"pair" or "proxy": the kind of loss the references component `name` serves."""
  return REFERENCES.get(name).kind


def build(config: ml_collections.ConfigDict, num_classes: int):
  """The references component `config.name` with its settings `config[config.name]`."""
  settings = config.get(config.name, {})
  return REFERENCES.build(config.name, settings, where=f"references.{config.name}",
                          num_classes=num_classes)


__all__ = ["BatchReferences", "ClassProxies", "CrossBatchMemory", "DEFAULTS", "MemoryVirtualClasses",
           "REFERENCES", "TripletReferences", "build", "kind_of"]
