"""The demo's "ImageNet pretraining": ResNet-18 learns to classify the 1,000 pretraining glyphs.

  python -m mmsi_jax.pretrain                     # trains, then writes data/pretrained/glyphs_resnet18.npz

The run is an ordinary training run (`python -m mmsi_jax.main --config=configs/pretrain.py` trains the
same and resumes the same): softmax cross-entropy over a classifier head on a 128-d embedding, the
normalised-softmax classifier (cosine logits / 0.05) over 1,000 learnable class weights, batches of 128
images drawn at random from the `glyphs_pretrain` training classes (1000-1999, none of them a demo class),
Adam 2e-3 (the class weights at 100x) with 100 warm-up steps and cosine decay. At the end its features
are evaluated on 100 further pretraining classes it never saw. `mmsi_jax.pretrain` keeps the backbone
(torchvision's names, as an ImageNet state dict) and drops the embedding head and the classifier, as
a torchvision ImageNet file drops `fc`: configs/finetune.py starts every variant from it.

ResNet-18 at the demo's 32 px (a 1x1 map after layer4) trains at about 0.45 s a step of 128 on 2 CPU
cores, only 1.5x the small CNN's (16, 32, 64), which runs its convolutions at full resolution:
docs/BENCHMARKS.md has the pretraining's time and its features' retrieval.
"""

from configs import default

NUM_STEPS = 1_000


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"configs/pretrain.py has no variants, got {variant!r}.")
  config = default.get_config()
  config.data.name = "glyphs_pretrain"
  config.data.sampler = "random"
  config.data.classes_per_batch = 32  # 32 x 4 = 128 images, drawn at random from the 24,000.
  config.model.name = "resnet18"
  config.model.embed_dim = 128
  del config.model["widths"]
  config.loss.name = "norm_softmax"
  config.loss.hparams = {"temperature": 0.05}
  config.references.name = "proxies"
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.lr_mults.proxies = 100.0
  config.train.num_steps = NUM_STEPS
  config.train.log_every = 100
  config.train.eval_every = NUM_STEPS
  config.train.checkpoint_every = 200
  config.eval.nmi = False
  return config
