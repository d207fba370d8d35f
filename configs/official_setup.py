"""The setup shared by configs/cub200.py, cars196.py and sop.py: the authors' (DESIGN.md section 4).

BN-Inception (ImageNet weights), global max pooling, linear -> 512, L2 norm, frozen BatchNorm; random-resized
crop 227 (scale 0.16 to 1) and flips for training, resize 256 and centre crop 227 for testing; BGR 0-255
with the Caffe mean; batches of 16 classes x 5 images; Adam with weight decay 5e-4.

The ImageNet weights are read from model.pretrained (PRETRAINED below): the `pretrainedmodels` file
bn_inception-52deb4733.pth as published, or that state dict saved as .npz (mmsi_jax/models/
torch_weights.py). Without the file the run stops and says so; `--config.model.pretrained=''` trains
from random initialisation instead.

Variants (`--config=configs/cub200.py:VARIANT`):
  ms           multi-similarity: alpha 2, beta 50, lambda 0.5, epsilon from the MMSI code (0.05; 0.03 on
               SOP); lr 1e-5 from ImageNet (the MMSI code instead fine-tunes an MS checkpoint at 1e-7).
  contrastive  contrastive with margin 0.8 on the similarity (MMSI's official runs); lr 1e-5.
  mmsi_ms, mmsi_contrastive
               the same with MMSI meta-mining as the authors ran it: l2rw weights, virtual step over all
               parameters with the model's learning rate, validation batches of 10 classes x 1 image
               from the training classes, a per-class dictionary of d_size embeddings (1 here; the
               authors tried 1 to 1000), no meta-weighting until it covers every training class.
"""

import ml_collections

from configs import default

VARIANTS = ("ms", "contrastive", "mmsi_ms", "mmsi_contrastive")
PRETRAINED = "data/pretrained/bn_inception-52deb4733.pth"


def official_setup(dataset: str, variant: str, *, num_steps: int, eval_every: int, ks: tuple,
                   pooling: str = "max", ms_epsilon: float = 0.05) -> ml_collections.ConfigDict:
  """The config of `variant` on `dataset`; the training length (num_steps, eval_every) is our choice,
  not the authors'."""
  if variant not in VARIANTS:
    raise ValueError(f"configs/{dataset}.py has variants {VARIANTS}, got {variant!r}.")
  config = default.get_config()

  data = config.data
  data.name = dataset
  data.manual_dir = f"data/manual/{dataset}"  # The official archives go here.
  data.image_size = 227
  data.train_crop = "random_resized"
  data.crop_scale = (0.16, 1.0)
  data.flip = True
  data.resize_size = 256
  data.normalization = "caffe_bgr"
  data.classes_per_batch = 16
  data.samples_per_class = 5
  data.num_threads = 2
  data.num_workers = 8  # 3,000 CUB-sized images/s need 6 to 8 cores (docs/BENCHMARKS.md).
  data.prefetch = 16

  config.model = ml_collections.ConfigDict()
  config.model.name = "bn_inception"  # BN-Inception (models/bn_inception.py).
  config.model.pretrained = PRETRAINED  # Its ImageNet weights (.pth or .npz); "": random init.
  config.model.embed_dim = 512  # Linear 1024 -> 512, then L2 normalisation.
  config.model.pooling = pooling  # Global pooling: "max", or "max_plus_avg" (max + average; SOP).
  config.model.frozen_bn = True  # BatchNorm statistics and affine parameters stay at ImageNet's.

  config.loss = ml_collections.ConfigDict()
  config.loss.hparams = ml_collections.ConfigDict()
  loss_name = variant.removeprefix("mmsi_")
  if loss_name == "ms":
    config.loss.name = "multi_similarity"
    config.loss.hparams.alpha = 2.0
    config.loss.hparams.beta = 50.0
    config.loss.hparams.base = 0.5
    config.loss.hparams.epsilon = ms_epsilon
  else:
    config.loss.name = "contrastive"
    config.loss.hparams.pos_margin = 1.0  # Positives are pulled until their similarity reaches 1.
    config.loss.hparams.neg_margin = 0.8  # Negatives are pushed while their similarity exceeds 0.8.

  config.optim.name = "adam"
  config.optim.learning_rate = 1e-5
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0

  if variant.startswith("mmsi_"):
    mmsi = config.miner.mmsi
    config.miner.name = "mmsi"
    mmsi.mode = "l2rw"
    mmsi.scope = "all"
    mmsi.virtual_lr = 0.0  # The model's learning rate.
    mmsi.validation = "train_classes"
    mmsi.validation_classes = 10
    mmsi.memory_layout = "per_class"
    mmsi.memory_size = 1
    mmsi.wait_for_coverage = True

  config.train.num_steps = num_steps
  config.train.eval_every = eval_every
  config.train.checkpoint_every = eval_every
  config.eval.ks = ks
  return config
