"""The configs of CUB-200-2011, Cars196 and Stanford Online Products: every method in its authors' setup.

configs/cub200.py, cars196.py and sop.py call `get_config(dataset, variant)`. Every variant trains
BN-Inception (ImageNet weights of `pretrainedmodels`, read from model.pretrained = PRETRAINED) with BGR
0-255 input minus the Caffe mean; without the weights file the run stops and says so
(`--config.model.pretrained=''` trains from random initialisation instead). Where a setup below departs
from its authors' code, docs/METHODS.md lists the departure and its switch.

MMSI's authors' setup (their released code):
  ms, contrastive, mmsi_ms, mmsi_contrastive
    global max pooling (max + average on SOP), linear -> 512, BatchNorm with its running statistics and
    trained scale and offset; random-resized crop 227 (scale 0.16 to 1) and flips, resize 256 and
    centre crop 227 for testing; 16 classes x 5 images; Adam, weight decay 5e-4, lr 1e-5 from the
    first step. MS: alpha 2, beta 40, lambda 0.5, epsilon 0.05 (0.03 on SOP); contrastive: margin 0.8
    on the similarity. MMSI, the authors' step: l2rw weights, virtual step over all parameters at the
    model's learning rate, validation batches of 10 classes x 1 image from the training classes, a
    per-class dictionary (1 embedding per class for contrastive, 100 for MS; 12 on SOP, the most
    images an SOP class has) into which the batch is enqueued before the meta loss, the meta loss
    against the dictionary only and unmined, and no update at all until the dictionary holds 98
    classes (CUB, Cars) or 1,000 (SOP), nor when the meta loss is exactly 0; for MS, the authors'
    weighting: the multipliers scale S inside MS's exponents, with the prefactor 2/alpha, 2/beta. The
    MMSI code fine-tunes MS checkpoints at lr 1e-7; here every variant starts from ImageNet at 1e-5.

XBM's setup (Wang et al., CVPR 2020; msight-tech/research-xbm, configs/sample_config.yaml and
ret_benchmark/config/defaults.py):
  xbm_contrastive, xbm_ms
    the batch's loss plus weight 1 times its loss against a memory of past embeddings from iteration
    1,000 on; memory 55,000 on SOP (the sample config); on CUB and Cars, for which the code gives no size,
    the same share of the training split (92%): 5,400 and 7,400. Contrastive with negatives pushed above
    0.5 (positives to 1); MS as XBM's code: alpha 2, beta 40, lambda 0.5, epsilon 0.1. 16 classes x 4
    images; Adam lr 1e-4, weight decay 5e-4; random-resized crop 224 (scale 0.2 to 1) and flips;
    BatchNorm trained. XBM's code trains ResNet-50 (128-d, max pooling); the BN-Inception 512-d figures
    it is compared with (65.8 / 82.0 / 79.5 R@1) are those quoted by MemVir (Ko et al., ICCV 2021).
    35,000 iterations on SOP (the sample config); CUB and Cars: 5,000 and 7,000 (our choice).

MemVir's baseline setup for the softmax-type proxy losses (Ko et al., ICCV 2021; navervision/MemVir,
main.py and README.md):
  norm_softmax, cosface, arcface, proxy_nca
    global average pooling, linear -> 512, BatchNorm with frozen statistics and trained scale and
    offset; random-resized crop 224 (scale 0.08 to 1)
    and flips, resize 256 and centre crop 224 for testing; batches of 128; Adam, eps 0.01, weight decay
    1e-4, lr 1e-4 and 1e-2 for the proxies (x100), x0.1 from epoch 50; 130 epochs of ceil(images / 128)
    steps (their loader keeps an epoch's last partial batch). NormSoftmax scale 23 (temperature 1/23),
    proxies U(+-1/sqrt(C)); ProxyNCA scale 12 (README, Cars) with the own proxy in the softmax's
    denominator (their code's log-softmax over all proxies), proxies N(0, 2/D). CosFace (s 64, m 0.35)
    and ArcFace (s 64, m 0.5) take their papers' values and insightface's N(0, 0.01) proxies: MemVir's
    code holds neither loss.

Proxy-Anchor's setup (Kim et al., CVPR 2020; tjddus9597/Proxy-Anchor-CVPR2020, train.py, README.md):
  proxy_anchor
    global average plus max pooling, linear -> 512, BatchNorm frozen on CUB and Cars, trained on SOP;
    proxies drawn N(0, 2/C); batches of 180; AdamW, weight decay 1e-4, lr 1e-4 (6e-4 on SOP) and 100x
    for the proxies; alpha 32, delta 0.1; 60 epochs of floor(images / 180) steps (drop_last).

ResNet-50, which XBM and Proxy-Anchor also report (torchvision's ImageNet weights, read from
model.pretrained = RESNET50_PRETRAINED, resnet50-0676ba61.pth; RGB input normalised with ImageNet's mean
and standard deviation; everything else as the BN-Inception variant of the same name):
  xbm_contrastive_resnet50, xbm_ms_resnet50
    as XBM's ResNet-50 runs (research-xbm, ret_benchmark/modeling/backbone/resnet.py): 128-d, global
    max pooling, the last stage with stride 1 (a 14x14 map at 224 px) and no ReLU after the stem's
    BatchNorm.
  proxy_anchor_resnet50
    as Proxy-Anchor's net/resnet.py: torchvision's network unchanged, average plus max pooling, 512-d.
MemVir's setup (Ko et al., ICCV 2021; navervision/MemVir, main.py and README.md):
  memvir_norm_softmax, memvir_cosface, memvir_arcface, memvir_proxy_nca, memvir_proxy_anchor
    the baseline setup above (each loss's scale and proxies; Proxy-Anchor alpha 32, delta 0.1, proxies
    N(0, 2/C)) with random batches of 128 (not P x K; each drawn on its own, where the authors shuffle
    the split once an epoch), 2,000 epochs of ceil(images / 128) steps at a constant rate but for the
    last, at x0.1 (the README's decay_step = decay_stop = 2,000), and the virtual classes from epoch
    40: NormSoftmax N 45, M 10; ProxyNCA N 20, M 25 (the README's Cars settings, the only ones
    published); the others N 45, M 10 (our choice: the code holds no other loss). On SOP the queues
    are stored in bfloat16: 5.8 GB instead of 11.6 GB in float32.
OSM + CAA's setup (Wang et al., AAAI 2019; their Caffe code on GoogLeNet-BN), cub200 and cars196 only:
  osm_caa
    the contrastive loss on distances (margin 1.2) weighted by OSM (sigma 0.8, alpha 1.2) times the
    class-aware attention (sigma 0.68), each set normalised to 0.5, the loss's 1/P kept; the authors'
    network (model.layout "osm_caa"): the 1024-d embedding is a branch on inception_4e (average pool
    5/3, 1x1 conv 128, FC 1024, each with BatchNorm and ReLU), and three classifiers, on the pooled
    inception_5b features (the attention's), that branch and a like branch on inception_3c, each trained
    with the focused cross-entropy (Gaussian 0.5, 0.18), loss weight 1; 8 classes x 7 images; no
    augmentation (resize 256, centre crop 224); BatchNorm trained; SGD momentum 0.9, CUB lr 5e-4,
    weight decay 3e-4, 3,000 iterations, x0.5 at 500, 1,000, 1,500 and 2,000; Cars lr 1e-3, weight
    decay 5e-5, 10,000 iterations, x0.5 every 1,500. --config.model.layout=pooled gives the method on
    the plain backbone: a linear head and one classifier over the pooled features (docs/METHODS.md).
Smart Mining's setup (Harwood et al., ICCV 2017; no public code), as the paper ran it on CUB and Cars
(on SOP, which the paper does not report, the same setup):
  smart_mining
    batches of 40 triplets (anchor, positive, negative) mined every epoch from the exact nearest
    neighbours of the training split's embedding, from epoch 2 on, with the adaptive controller of the
    bound kappa (target share of triplets with a non-zero loss 0.6); the ratio triplet loss (m 0.2)
    plus the global loss (t 0.01, lambda 1); a 64-d embedding whose new layer learns at 10x the rate;
    weight decay 5e-4; 20 epochs. The paper trains GoogLeNet with SGD at 0.1, halved every 3 epochs;
    here BN-Inception (average pooling, BatchNorm frozen) with Adam at a constant 1e-5, random-resized
    crops 224 (scale 0.16 to 1) and flips (docs/METHODS.md lists the departures).

Batches are P x K here (K = 4 where the authors draw images at random: 32 x 4 for 128, 45 x 4 for 180).
Proxy-Anchor's step decays (x0.5 every 10 or 20 epochs), its one warm-up epoch with the backbone fixed
and its gradient clipping are not reproduced: its schedule is constant.
"""

import dataclasses

import ml_collections

from configs import default

PRETRAINED = "data/pretrained/bn_inception-52deb4733.pth"


@dataclasses.dataclass(frozen=True)
class Dataset:
  train_images: int
  mmsi_steps: int  # Our choice of training length for MMSI's setup, and its evaluation interval.
  eval_every: int
  ks: tuple
  xbm_size: int
  xbm_steps: int
  ms_epsilon: float = 0.05  # The MMSI code's MS epsilon.
  pooling: str = "max"  # Pooling in MMSI's setup.
  mmsi_min_classes: int = 98  # T: MMSI's authors update nothing until their dictionary holds T classes.
  # Their MS dictionary keeps 100 embeddings per class. SOP's classes have at most 12 images: 12 slots
  # keep every image's newest embedding, where 100 x 11,318 x 512 slots (2.3 GB) would hold older ones.
  mmsi_ms_memory_size: int = 100
  proxy_anchor_lr: float = 1e-4
  proxy_anchor_frozen_bn: bool = True


DATASETS = {
    "cub200": Dataset(train_images=5_864, mmsi_steps=3_000, eval_every=500, ks=(1, 2, 4, 8),
                      xbm_size=5_400, xbm_steps=5_000),
    "cars196": Dataset(train_images=8_054, mmsi_steps=6_000, eval_every=1_000, ks=(1, 2, 4, 8),
                       xbm_size=7_400, xbm_steps=7_000),
    "sop": Dataset(train_images=59_551, mmsi_steps=30_000, eval_every=5_000, ks=(1, 10, 100, 1000),
                   xbm_size=55_000, xbm_steps=35_000, ms_epsilon=0.03, pooling="max_plus_avg",
                   mmsi_min_classes=1_000, mmsi_ms_memory_size=12,
                   proxy_anchor_lr=6e-4, proxy_anchor_frozen_bn=False),
}
MMSI_VARIANTS = ("ms", "contrastive", "mmsi_ms", "mmsi_contrastive")
XBM_VARIANTS = ("xbm_contrastive", "xbm_ms")
MEMVIR_BASELINES = {  # Loss hyperparameters and the proxies' initialisation.
    "norm_softmax": ({"temperature": 1 / 23}, dict(init="uniform")),
    "cosface": ({"scale": 64.0, "margin": 0.35}, dict(init="normal", init_std=0.01)),
    "arcface": ({"scale": 64.0, "margin": 0.5}, dict(init="normal", init_std=0.01)),
    # MemVir's ProxyNCA: a log-softmax over every proxy, the own one included.
    "proxy_nca": ({"scale": 12.0, "own_proxy_in_denominator": True},
                  dict(init="normal", init_std=(2 / 512) ** 0.5)),
}
MEMVIR_BATCH = 128
VARIANTS = (*MMSI_VARIANTS, *XBM_VARIANTS, *MEMVIR_BASELINES, "proxy_anchor", "smart_mining")
SMART_MINING_TRIPLETS = 40  # Triplets per batch of the smart_mining variant (120 images).
# The setups above on torchvision's ImageNet ResNet-50 (module docstring).
RESNET50_PRETRAINED = "data/pretrained/resnet50-0676ba61.pth"
RESNET50_VARIANTS = ("xbm_contrastive_resnet50", "xbm_ms_resnet50", "proxy_anchor_resnet50")
VARIANTS = (*VARIANTS, *RESNET50_VARIANTS)
MEMVIR_STEPS = {"proxy_nca": (20, 25)}  # (N, M) where not (45, 10).
# Classes per block of MemVir on SOP (references.memvir.class_block): S is [(N + 1) 128, 2048] at a time
# instead of [5,888, 520,628] whole, 0.3 GB beyond the queues instead of 39 GB (docs/BENCHMARKS.md).
SOP_CLASS_BLOCK = 2048
MEMVIR_VARIANTS = tuple(f"memvir_{name}" for name in (*MEMVIR_BASELINES, "proxy_anchor"))
VARIANTS += MEMVIR_VARIANTS
# Each method's baseline, the run without it (`compare` tests whether the method helps against it).
BASELINES = {"mmsi_ms": "ms", "mmsi_contrastive": "contrastive", "xbm_ms": "ms",
             "xbm_contrastive": "contrastive", **{v: v.removeprefix("memvir_") for v in MEMVIR_VARIANTS}}


@dataclasses.dataclass(frozen=True)
class OSMSetup:
  """OSM + CAA's authors' solver on one dataset."""
  learning_rate: float
  weight_decay: float
  num_steps: int
  step_boundaries: tuple


OSM_SETUPS = {
    "cub200": OSMSetup(5e-4, 3e-4, 3_000, (500, 1_000, 1_500, 2_000)),
    "cars196": OSMSetup(1e-3, 5e-5, 10_000, tuple(range(1_500, 10_000, 1_500))),
}
OSM_VARIANTS = ("osm_caa",)


def _bn_inception(dataset: str, *, image_size: int, crop_scale: tuple, pooling: str, frozen_bn: bool,
                  classes_per_batch: int, samples_per_class: int) -> ml_collections.ConfigDict:
  """The shared part: dataset, BN-Inception 512-d, crops, Caffe input, PK batches."""
  config = default.get_config()
  data = config.data
  data.name = dataset
  data.manual_dir = f"data/manual/{dataset}"  # The official archives go here.
  data.image_size = image_size
  data.train_crop = "random_resized"
  data.crop_scale = crop_scale
  data.flip = True
  data.resize_size = 256
  data.normalization = "caffe_bgr"
  data.classes_per_batch = classes_per_batch
  data.samples_per_class = samples_per_class
  data.num_threads = 2
  data.num_workers = 8  # 3,000 CUB-sized images/s need 6 to 8 cores (docs/BENCHMARKS.md).
  data.prefetch = 16

  config.model = ml_collections.ConfigDict()
  config.model.name = "bn_inception"  # BN-Inception (models/bn_inception.py).
  config.model.pretrained = PRETRAINED  # Its ImageNet weights (.pth or .npz); "": random init.
  config.model.embed_dim = 512
  config.model.pooling = pooling
  config.model.frozen_bn = frozen_bn

  config.optim.name = "adam"
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  return config


def _set_loss(config: ml_collections.ConfigDict, name: str, hparams: dict) -> None:
  config.loss = ml_collections.ConfigDict({"name": name, "hparams": hparams})


def _epochs(epochs: int, train_images: int, batch_size: int) -> int:
  """Steps of `epochs` epochs of a loader that drops its last partial batch (Proxy-Anchor's)."""
  return epochs * (train_images // batch_size)


def _memvir_epochs(epochs: int, train_images: int) -> int:
  """Steps of `epochs` epochs of MemVir's loader: batches of 128 that keep the epoch's last partial
  batch, ceil(images / 128) steps an epoch."""
  return epochs * -(-train_images // MEMVIR_BATCH)


def _memvir_schedule(config: ml_collections.ConfigDict, train_images: int, epochs: int,
                     decay_epoch: int) -> None:
  """MemVir's main.py: the rate times 0.1 from the start of epoch `decay_epoch` (1-based; its
  decay_step = decay_stop), `epochs` epochs in all."""
  config.optim.update(schedule="step", step_factor=0.1,
                      step_boundaries=(_memvir_epochs(decay_epoch - 1, train_images),))
  config.train.num_steps = _memvir_epochs(epochs, train_images)


def mmsi_authors(dataset: str, variant: str) -> ml_collections.ConfigDict:
  spec = DATASETS[dataset]
  config = _bn_inception(dataset, image_size=227, crop_scale=(0.16, 1.0), pooling=spec.pooling,
                         frozen_bn=True, classes_per_batch=16, samples_per_class=5)
  config.model.frozen_bn_affine = False  # Running statistics, trained scale and offset.
  ms = variant.removeprefix("mmsi_") == "ms"
  if ms:
    _set_loss(config, "multi_similarity",
              dict(alpha=2.0, beta=40.0, base=0.5, epsilon=spec.ms_epsilon))
  else:
    _set_loss(config, "contrastive", dict(pos_margin=1.0, neg_margin=0.8))
  config.optim.learning_rate = 1e-5
  config.optim.weight_decay = 5e-4
  if variant.startswith("mmsi_"):
    if ms:  # The authors' MS weighting (docs/METHODS.md, MMSI).
      config.loss.hparams.prefactor = 2.0
    config.miner.name = "mmsi"
    config.miner.mmsi.update(
        mode="l2rw", scope="all", virtual_lr=0.0, validation="train_classes", validation_classes=10,
        memory_layout="per_class", memory_size=spec.mmsi_ms_memory_size if ms else 1,
        wait_for_coverage=True, min_classes=spec.mmsi_min_classes, warmup_steps=0,
        warmup_update="none", enqueue="before", meta_references="dictionary", meta_mining=False,
        multipliers_in_loss=ms)
  config.train.num_steps = spec.mmsi_steps
  return config


def xbm(dataset: str, variant: str) -> ml_collections.ConfigDict:
  spec = DATASETS[dataset]
  config = _bn_inception(dataset, image_size=224, crop_scale=(0.2, 1.0), pooling="max",
                         frozen_bn=False, classes_per_batch=16, samples_per_class=4)
  if variant == "xbm_ms":
    _set_loss(config, "multi_similarity", dict(alpha=2.0, beta=40.0, base=0.5, epsilon=0.1))
  else:
    _set_loss(config, "contrastive", dict(pos_margin=1.0, neg_margin=0.5))
  config.references.name = "xbm"
  config.references.xbm.update(size=spec.xbm_size, weight=1.0, start_step=1_000)
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 5e-4
  config.train.num_steps = spec.xbm_steps
  return config


def memvir_baseline(dataset: str, variant: str) -> ml_collections.ConfigDict:
  spec = DATASETS[dataset]
  config = _bn_inception(dataset, image_size=224, crop_scale=(0.08, 1.0), pooling="avg",
                         frozen_bn=True, classes_per_batch=32, samples_per_class=4)
  config.model.frozen_bn_affine = False  # MemVir freezes the statistics only (main.py).
  hparams, proxies = MEMVIR_BASELINES[variant]
  _set_loss(config, variant, hparams)
  config.references.name = "proxies"
  config.references.proxies.update(proxies)
  config.optim.update(learning_rate=1e-4, eps=0.01, weight_decay=1e-4)
  config.optim.lr_mults.proxies = 100.0
  _memvir_schedule(config, spec.train_images, epochs=130, decay_epoch=50)
  return config


def memvir(dataset: str, variant: str) -> ml_collections.ConfigDict:
  spec = DATASETS[dataset]
  loss_name = variant.removeprefix("memvir_")
  config = memvir_baseline(dataset, "norm_softmax")
  if loss_name == "proxy_anchor":
    _set_loss(config, "proxy_anchor", dict(alpha=32.0, margin=0.1))
    proxies = dict(init="kaiming_fan_out", init_std=1.0)
  else:
    hparams, proxies = MEMVIR_BASELINES[loss_name]
    _set_loss(config, loss_name, hparams)
  num_steps, step_gap = MEMVIR_STEPS.get(loss_name, (45, 10))
  config.data.sampler = "random"  # 32 x 4 = 128 images drawn at random.
  config.references.name = "memvir"
  config.references.memvir.update(
      init=proxies["init"], init_std=proxies.get("init_std", 1.0), num_steps=num_steps,
      step_gap=step_gap, warmup_steps=_memvir_epochs(40, spec.train_images),
      dtype="bfloat16" if dataset == "sop" else "float32")
  _memvir_schedule(config, spec.train_images, epochs=2_000, decay_epoch=2_000)  # The last epoch.
  return config


def proxy_anchor(dataset: str) -> ml_collections.ConfigDict:
  spec = DATASETS[dataset]
  config = _bn_inception(dataset, image_size=224, crop_scale=(0.08, 1.0), pooling="max_plus_avg",
                         frozen_bn=spec.proxy_anchor_frozen_bn, classes_per_batch=45,
                         samples_per_class=4)
  _set_loss(config, "proxy_anchor", dict(alpha=32.0, margin=0.1))
  config.references.name = "proxies"
  config.references.proxies.init = "kaiming_fan_out"
  config.optim.update(name="adamw", learning_rate=spec.proxy_anchor_lr, weight_decay=1e-4)
  config.optim.lr_mults.proxies = 100.0
  config.train.num_steps = _epochs(60, spec.train_images, 180)
  return config


def resnet50_variant(dataset: str, variant: str) -> ml_collections.ConfigDict:
  """`variant` without its "_resnet50", with ResNet-50 as its authors' code runs it (module docstring)."""
  base = variant.removesuffix("_resnet50")
  config = get_config(dataset, base)
  config.model.update(name="resnet50", pretrained=RESNET50_PRETRAINED)
  config.data.normalization = "imagenet"
  if base in XBM_VARIANTS:
    config.model.update(embed_dim=128, last_stride=1, stem_relu=False)
  return config


def osm_caa(dataset: str) -> ml_collections.ConfigDict:
  setup = OSM_SETUPS[dataset]
  config = _bn_inception(dataset, image_size=224, crop_scale=(1.0, 1.0), pooling="avg",
                         frozen_bn=False, classes_per_batch=8, samples_per_class=7)
  config.data.train_crop = "center"  # No online augmentation.
  config.data.flip = False
  config.model.embed_dim = 1024
  config.model.layout = "osm_caa"  # The authors' branches (models/bn_inception.py).
  _set_loss(config, "distance_contrastive", dict(margin=1.2))
  config.miner.name = "osm_caa"
  config.miner.osm_caa.update(
      pos_sigma=0.8, margin=1.2, set_weight=0.5, attention=True, attention_sigma=0.68,
      classifier_weight=1.0, classifier_focus_mean=0.5, classifier_focus_sigma=0.18, scale="authors")
  config.optim.update(name="sgd", momentum=0.9, learning_rate=setup.learning_rate,
                      weight_decay=setup.weight_decay, schedule="step",
                      step_boundaries=setup.step_boundaries, step_factor=0.5)
  config.train.num_steps = setup.num_steps
  return config


def smart_mining(dataset: str) -> ml_collections.ConfigDict:
  spec = DATASETS[dataset]
  config = _bn_inception(dataset, image_size=224, crop_scale=(0.16, 1.0), pooling="avg",
                         frozen_bn=True, classes_per_batch=16, samples_per_class=4)
  config.model.embed_dim = 64
  _set_loss(config, "ratio_triplet_global", {})  # m 0.2, t 0.01, lambda 1: the losses' defaults.
  config.references.name = "triplets"
  config.data.batch_policy = "smart_mining"
  config.data.smart_mining.update(triplets_per_batch=SMART_MINING_TRIPLETS, start_epoch=2,
                                  adaptive=True, target_error=0.6)
  config.optim.update(learning_rate=1e-5, weight_decay=5e-4)
  config.optim.lr_mults["model/head"] = 10.0  # The new embedding layer at 10x the rate.
  config.train.num_steps = 20 * -(-spec.train_images // SMART_MINING_TRIPLETS)  # 20 epochs.
  return config


def get_config(dataset: str, variant: str) -> ml_collections.ConfigDict:
  """The config of `variant` on `dataset` (module docstring)."""
  variants = VARIANTS + (OSM_VARIANTS if dataset in OSM_SETUPS else ())
  if variant not in variants:
    raise ValueError(f"configs/{dataset}.py has variants {variants}, got {variant!r}.")
  if variant in RESNET50_VARIANTS:
    return resnet50_variant(dataset, variant)
  if variant in OSM_VARIANTS:
    config = osm_caa(dataset)
  elif variant in MMSI_VARIANTS:
    config = mmsi_authors(dataset, variant)
  elif variant in XBM_VARIANTS:
    config = xbm(dataset, variant)
  elif variant in MEMVIR_VARIANTS:
    config = memvir(dataset, variant)
  elif variant in MEMVIR_BASELINES:
    config = memvir_baseline(dataset, variant)
  elif variant == "smart_mining":
    config = smart_mining(dataset)
  else:
    config = proxy_anchor(dataset)
  spec = DATASETS[dataset]
  if dataset == "sop":  # MemVir over class blocks (docs/METHODS.md, MemVir); the plain proxy losses
    config.references.memvir.class_block = SOP_CLASS_BLOCK  # hold S [B, 11,318] whole: 67 MB.
  config.train.eval_every = min(spec.eval_every, config.train.num_steps)
  config.train.checkpoint_every = config.train.eval_every
  config.eval.ks = spec.ks
  return config
