"""The demo in the papers' regime: every variant of configs/demo.py, fine-tuning a pretrained ResNet-18.

  python -m mmsi_jax.main --config=configs/finetune.py:mmsi_ms --workdir=runs/finetune_mmsi_ms
  python -m mmsi_jax.compare --config=configs/finetune.py --seeds=0,1,2 --workdir=runs/finetune

Every method here is published as fine-tuning: ImageNet weights in, fine-tune on the training classes,
retrieve unseen classes. The demo's ImageNet is the 1,000 pretraining glyphs (none of them a demo class):
ResNet-18 classifies them (configs/pretrain.py) and its backbone, saved as a torchvision-named state dict,
is read through `model.pretrained` as ImageNet files are. A run that finds it missing builds it first
(about 13 minutes on 2 CPU cores, once; runs started meanwhile wait for it: mmsi_jax/pretrain.py).

Each variant is the demo's of the same name (its loss, miner, references and their settings; the
configs/demo.py docstring lists them) with the fine-tuning conventions of its authors' code
(configs/real_datasets.py): the pretrained backbone, 64-d embedding after global average pooling, the
new layers faster (the embedding head at 10x the backbone's rate, the proxies at 100x), BatchNorm's
running statistics frozen where the authors freeze them (MMSI's, MemVir's, Proxy-Anchor's and Smart
Mining's setups: the pretrained statistics, scale and offset trained) and trained where they train them
(XBM, OSM + CAA), the demo's batches, Adam at 5e-5 with 50 warm-up steps and cosine decay over 400
steps: half the demo's steps, each about as long as the small CNN's (docs/BENCHMARKS.md). The step
counts at which a method starts scale with the run: XBM's memory and MemVir's virtual classes from
step 100 (a quarter of the run, as the demo's 400 of 800).

Each run evaluates at step 0 the pretrained backbone's features (L2-normalised, no head): the "ImageNet
features on CUB" row, beside raw pixels (eval.initial_features).

MMSI, in its authors' protocol, starts from a multi-similarity model fine-tuned first (`init_from`
MS_MODEL: the `ms` variant, seed 0, built on first use as the backbone is) and fine-tunes it 400 more
steps at a tenth of the rate:
  mmsi_ms           the demo's MMSI (weighting net, virtual step over all parameters, dictionary of 5
                    embeddings per class) on multi-similarity, from MS_MODEL
  ms_continued      its baseline: the same 400 steps from MS_MODEL with plain multi-similarity
mmsi_contrastive and mmsi_triplet start from the pretrained backbone, as their baselines do.
"""

import ml_collections

from configs import demo

PRETRAINED = "data/pretrained/glyphs_resnet18.npz"  # mmsi_jax/pretrain.py builds it if missing.
MS_MODEL = "data/pretrained/glyphs_resnet18_ms"  # The `ms` variant's workdir, built if missing.
NUM_STEPS = 400
# The backbone's peak rate (the head's 10x, the proxies' 100x): MS on seed 0 ends at R@1 0.808 with 2e-4
# (below the pretrained features' 0.809), 0.816 with 5e-5, 0.811 with 1e-4, 0.763 with 1e-3; 0.818
# with 5e-5 and BatchNorm trained (docs/BENCHMARKS.md).
LEARNING_RATE = 5e-5
START_STEP = 100  # XBM's memory, MemVir's virtual classes: from a quarter of the run.
VARIANTS = (*demo.VARIANTS, "ms_continued")
# Each method's baseline (configs/demo.py); MMSI's continues from the same model.
BASELINES = {method: baseline for method, baseline in {**demo.BASELINES, "mmsi_ms": "ms_continued"}.items()
             if method in VARIANTS}
# BatchNorm trained in their authors' code; every other variant freezes the running statistics.
TRAINED_BN = ("xbm_ms", "xbm_contrastive", "distance_contrastive", "osm", "osm_caa")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"configs/finetune.py has variants {VARIANTS[1:]} (or none), got {variant!r}.")
  continued = variant in ("mmsi_ms", "ms_continued")
  config = demo.get_config("ms" if variant == "ms_continued" else variant)
  config.model = ml_collections.ConfigDict(dict(
      name="resnet18", embed_dim=64, pooling="avg", pretrained=PRETRAINED,
      frozen_bn=variant not in TRAINED_BN, frozen_bn_affine=False, dtype="float32"))
  config.optim.learning_rate = LEARNING_RATE / 10 if continued else LEARNING_RATE
  config.optim.lr_mults["model/head"] = 10.0
  config.train.update(num_steps=NUM_STEPS, log_every=50, eval_every=100, checkpoint_every=100)
  config.eval.initial_features = True
  if continued:
    config.init_from = MS_MODEL
  if config.references.name == "xbm":
    config.references.xbm.start_step = START_STEP
  if config.references.name == "memvir":
    config.references.memvir.warmup_steps = START_STEP
  return config
