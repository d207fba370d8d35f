"""Backbone throughput at the real input size against the same model in PyTorch, in the same run.

  python -m mmsi_jax.bench backbone --json backbone.json [--models bn_inception resnet50]
      [--image_size 224] [--batch 64] [--warmup 2] [--repeats 3] [--dtypes float32 bfloat16]

For each model: one training-mode forward and backward pass over a batch of random images (BatchNorm
on the batch's statistics, gradients of the mean pooled feature w.r.t. every parameter; no optimizer
update), here (jitted) and in PyTorch (torchvision's resnet50, `pretrainedmodels`' bninception,
mmsi_jax.models.check_torch), each timed in turn round after round so that the machine's load affects
both alike. Figures: images/s of each, and ours over torch's. With --dtypes float32 bfloat16 our
model is also timed with bf16 activations (model.dtype), and `bf16_x_float32` is that speed-up (on a
GPU or TPU; torch stays float32). torch is a benchmark-only dependency, as faiss for `eval`: install it
beside this library (`pip install torch torchvision pretrainedmodels`), on the CPU or, where JAX runs on
a GPU, with CUDA (both then run on that GPU). torch's OpenMP threads are made to sleep while they
wait (OMP_WAIT_POLICY=PASSIVE, unless set), as XLA's do: spinning, they run 10-25x slower on a machine
whose cores are busy with other work. The load average before and after tells how busy it was.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmsi_jax import models
from mmsi_jax.bench import timing
from mmsi_jax.models import check_torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--models", nargs="+", default=["bn_inception", "resnet50"],
                      choices=list(check_torch.POOLING))
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--warmup", type=int, default=2, help="untimed passes of each (after compiling)")
  parser.add_argument("--repeats", type=int, default=3, help="timed passes of each")
  parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                      help="our model's activation dtypes to time")


def jax_pass(name: str, dtype: str, images: jax.Array):
  """Our model's forward + backward pass over `images`, as a no-argument call."""
  model = models.get(name, embed_dim=512, pooling=check_torch.POOLING[name], dtype=dtype)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])

  def loss(params, batch_stats, images):
    features, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"], method="features")
    return jnp.mean(features), updates

  grad = jax.jit(jax.grad(loss, has_aux=True))  # Arguments, not constants folded into the program.
  return lambda: grad(variables["params"], variables["batch_stats"], images)


def torch_pass(name: str, images: np.ndarray):
  """The same pass in PyTorch (on the GPU where JAX runs on one and torch has CUDA)."""
  torch, _ = check_torch.import_torch()
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  model, trunk = check_torch.torch_model(name)
  model.to(device).train()
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  pool = (lambda f: f.amax(dim=(2, 3))) if check_torch.POOLING[name] == "max" else (
      lambda f: f.mean(dim=(2, 3)))

  def step():
    model.zero_grad(set_to_none=True)
    pool(trunk(x)).mean().backward()
    if device == "cuda":
      torch.cuda.synchronize()

  return step


def run(args: argparse.Namespace) -> dict:
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Read when torch loads its OpenMP runtime.
  torch, _ = check_torch.import_torch()
  images = np.random.default_rng(0).normal(
      size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
  figures = {"image_size": args.image_size, "batch": args.batch, "repeats": args.repeats,
             "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
             "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "load_before": os.getloadavg()[0]}
  for name in args.models:
    calls = {dtype: jax_pass(name, dtype, jnp.asarray(images)) for dtype in args.dtypes}
    calls["torch"] = torch_pass(name, images)
    seconds = timing.time_interleaved(calls, repeats=args.repeats, warmup=args.warmup)
    for call, s in seconds.items():
      figures[f"{name}/{call}/images_per_s"] = args.batch / s
    figures[f"{name}/ours_x_torch"] = seconds["torch"] / seconds[args.dtypes[0]]
    if len(args.dtypes) > 1:
      figures[f"{name}/bf16_x_float32"] = seconds["float32"] / seconds["bfloat16"]
    del calls
  figures["load_after"] = os.getloadavg()[0]
  return figures
