"""Demo on the built-in Glyphs dataset, a few minutes per run on 2 CPU cores.

Every method has a variant (`--config=configs/demo.py:VARIANT`), all under one protocol: the small CNN
(64-d), 800 steps of 16 classes x 4 images, Adam 2e-3 with 50 warm-up steps and cosine decay.

  ms                multi-similarity (alpha 2, beta 50, lambda 0.5, epsilon 0.1); also the config
                    without a variant (`--config=configs/demo.py`)
  contrastive       contrastive, positives to 1, negatives below 0.5
  triplet           batch-all triplet, margin 0.1
  mmsi_ms, mmsi_contrastive, mmsi_triplet
                    the same with MMSI meta-mining (weighting net, virtual step over all parameters,
                    a per-class dictionary of 5 embeddings)
  xbm_ms, xbm_contrastive
                    the same with XBM's cross-batch memory: 2,048 slots (85% of the 2,400 training
                    images, as XBM's 55,000 of SOP's 59,551), from step 400 (from step 100, while
                    the embedding still moves fast, the memory's stale rows hurt: docs/BENCHMARKS.md)
  norm_softmax, cosface, arcface, proxy_nca, proxy_anchor
                    the proxy losses with 100 learnable class proxies, trained at 100x the learning
                    rate (as Proxy-Anchor and MemVir), and each paper's scale and margin
                    (docs/METHODS.md)
  memvir_norm_softmax, memvir_cosface, memvir_arcface, memvir_proxy_nca, memvir_proxy_anchor
                    the same with MemVir's virtual classes from step 400 (as XBM's memory), the
                    curriculum full 50 steps later: N 10, M 4 (ProxyNCA: N 5, M 9, a longer gap for
                    ProxyNCA as the authors'); P x K batches, as the baselines above
  distance_contrastive, osm, osm_caa
                    the contrastive loss on distances (margin 1.2, mean over pairs) plain, with OSM's
                    soft pair weights, and with OSM + CAA (the classifier over the pooled features):
                    the authors' weights, without the loss's mean (its 1/P and 1/2; docs/METHODS.md).
                    With 10% of the training labels shuffled: --config.data.label_noise=0.1
  bn_inception_distance_contrastive, bn_inception_osm_caa, bn_inception_osm_caa_authors_layout,
  bn_inception_distance_contrastive_authors_layout
                    the OSM rows on a randomly initialised BN-Inception (64-d, 32 px): plain, OSM + CAA
                    over the pooled features, OSM + CAA in the authors' layout (the embedding a branch
                    on inception_4e, three classifiers), and the plain loss on that branch; not in the
                    default comparison (about 3 minutes a run more than the small CNN's): name them
                    with --variants
  triplet_semihard  semi-hard triplet, margin 0.1, on PK batches
  smart_mining_triplet, smart_mining
                    Smart Mining batches (Harwood et al., ICCV 2017): 21 triplets (63 images) per
                    batch, mined from the model's exact neighbours every epoch (115 steps) from epoch 2;
                    smart_mining_triplet trains the margin triplet (0.1) on them with the bound fixed
                    at kappa 1; smart_mining trains the paper's ratio triplet plus global loss with
                    the adaptive controller (target e 0.6, kappa from 4)

`python -m mmsi_jax.compare --config=configs/demo.py` trains every named variant over seeds and writes
the table (docs/RESULTS.md).
"""

import ml_collections

from configs import default

PAIR_LOSSES = {
    "ms": ("multi_similarity", None),  # The defaults of configs/default.py.
    "contrastive": ("contrastive", {"pos_margin": 1.0, "neg_margin": 0.5}),
    "triplet": ("triplet", {"margin": 0.1, "mining": "all"}),
}
PROXY_LOSSES = {
    "norm_softmax": {"temperature": 0.05},
    "cosface": {"scale": 64.0, "margin": 0.35},
    "arcface": {"scale": 64.0, "margin": 0.5},
    # The paper's denominator (the other classes): on the demo it beats MemVir's, the own proxy included
    # (R@1 0.88 against 0.80, docs/BENCHMARKS.md); the real-dataset configs run MemVir's.
    "proxy_nca": {"scale": 12.0, "own_proxy_in_denominator": False},
    "proxy_anchor": {"alpha": 32.0, "margin": 0.1},
}
SMART_MINING = {  # Variant: (loss, its hyperparameters, the batch policy, its settings).
    "triplet_semihard": ("triplet", {"margin": 0.1, "mining": "semihard"}, "pk", {}),
    "smart_mining_triplet": ("triplet", {"margin": 0.1, "mining": "all"}, "smart_mining",
                             {"adaptive": False, "kappa": 1.0}),
    "smart_mining": ("ratio_triplet_global", None, "smart_mining", {}),
}
VARIANTS = ("", *PAIR_LOSSES, *(f"mmsi_{name}" for name in PAIR_LOSSES), "xbm_ms", "xbm_contrastive",
            *PROXY_LOSSES, *SMART_MINING)
MEMVIR_STEPS = {"proxy_nca": (5, 9)}  # (N, M) where not (10, 4): N(M + 1) = 45 to 50 steps.
VARIANTS += tuple(f"memvir_{name}" for name in PROXY_LOSSES)


def memvir(loss_name: str):
  """The proxy loss's variant with MemVir's virtual classes from step 400."""
  config = get_config(loss_name)
  num_steps, step_gap = MEMVIR_STEPS.get(loss_name, (10, 4))
  config.references.name = "memvir"
  config.references.memvir.update(init=config.references.proxies.init,
                                  init_std=config.references.proxies.init_std, num_steps=num_steps,
                                  step_gap=step_gap, warmup_steps=400)
  return config
OSM_VARIANTS = {"distance_contrastive": None, "osm": False, "osm_caa": True}  # CAA's attention.
VARIANTS += tuple(OSM_VARIANTS)
# Named but left out of the comparison's default table (`compare --variants=...` runs them): OSM + CAA
# and its baseline on BN-Inception (randomly initialised, 64-d, average pooling, 32 px), its features
# pooled or in the authors' layout. Variant: (the demo variant, model.layout).
BN_INCEPTION_VARIANTS = {
    "bn_inception_distance_contrastive": ("distance_contrastive", "pooled"),
    "bn_inception_osm_caa": ("osm_caa", "pooled"),
    "bn_inception_osm_caa_authors_layout": ("osm_caa", "osm_caa"),
    "bn_inception_distance_contrastive_authors_layout": ("distance_contrastive", "osm_caa"),
}
EXTRA_VARIANTS = tuple(BN_INCEPTION_VARIANTS)

# Each method's baseline, the run without the method (`compare` tests whether the method helps against
# it): the same loss without MMSI, XBM, MemVir or Smart Mining's batches; OSM's contrastive loss on
# distances without its weights; for Smart Mining's own loss, semi-hard triplets on P x K batches (its
# paper's comparison).
BASELINES = {
    **{f"mmsi_{name}": name for name in PAIR_LOSSES}, "xbm_ms": "ms", "xbm_contrastive": "contrastive",
    **{f"memvir_{name}": name for name in PROXY_LOSSES},
    "osm": "distance_contrastive", "osm_caa": "distance_contrastive",
    "smart_mining_triplet": "triplet", "smart_mining": "triplet_semihard",
    "bn_inception_osm_caa": "bn_inception_distance_contrastive",
    "bn_inception_osm_caa_authors_layout": "bn_inception_distance_contrastive_authors_layout",
}


def get_config(variant: str = ""):
  if variant in BN_INCEPTION_VARIANTS:
    base, layout = BN_INCEPTION_VARIANTS[variant]
    config = get_config(base)
    config.model = ml_collections.ConfigDict(dict(name="bn_inception", embed_dim=64, pooling="avg",
                                                  layout=layout, dtype="float32"))
    return config
  if variant not in VARIANTS:
    raise ValueError(f"configs/demo.py has variants {VARIANTS[1:] + EXTRA_VARIANTS} (or none), got "
                     f"{variant!r}.")
  if variant.startswith("memvir_"):
    return memvir(variant.removeprefix("memvir_"))
  config = default.get_config()
  config.model.widths = (16, 32, 64)
  config.train.num_steps = 800
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 50

  if variant in OSM_VARIANTS:
    return osm_config(config, attention=OSM_VARIANTS[variant])
  if variant in SMART_MINING:
    config.loss.name, hparams, config.data.batch_policy, settings = SMART_MINING[variant]
    config.loss.hparams = hparams or {}  # None: the loss's defaults (the paper's m, lambda, t).
    if config.data.batch_policy == "smart_mining":
      config.references.name = "triplets"
      config.data.smart_mining.update(settings)
    return config

  method, loss_name = "", variant or "ms"
  if variant.startswith(("mmsi_", "xbm_")):
    method, loss_name = variant.split("_", 1)
  if loss_name in PROXY_LOSSES:
    config.loss.name = loss_name
    config.loss.hparams = PROXY_LOSSES[loss_name]
    config.references.name = "proxies"
    config.optim.lr_mults.proxies = 100.0
    return config
  config.loss.name, hparams = PAIR_LOSSES[loss_name]
  if hparams is not None:
    config.loss.hparams = hparams
  if method == "mmsi":
    config.miner.name = "mmsi"
    config.miner.mmsi.memory_size = 5  # The last 5 embeddings of each of the 100 training classes.
  elif method == "xbm":
    config.references.name = "xbm"
    config.references.xbm.size = 2048
    config.references.xbm.start_step = 400
  return config


def osm_config(config, attention):
  """The distance contrastive loss (alpha 1.2), plain (attention None) or OSM-weighted, with CAA when
  `attention`."""
  config.loss.name = "distance_contrastive"
  config.loss.hparams = {"margin": 1.2}
  if attention is not None:
    config.miner.name = "osm_caa"
    config.miner.osm_caa.attention = attention
    # With Adam and L2 decay in the gradient, the authors' 1/P (with the 1/2 of their loss: 1/4,032
    # here) would leave the metric gradient far below the decay term (docs/METHODS.md, OSM + CAA):
    # undo it.
    config.miner.osm_caa.scale = "pair_count"
  return config
