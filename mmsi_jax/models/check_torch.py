"""The backbones against their PyTorch definitions, where torch is installed (it is not a dependency):

  python -m mmsi_jax.models.check_torch [--models resnet18 resnet50 bn_inception] [--image_size 224]

For each model: the PyTorch definition (torchvision's resnet18/resnet50, `pretrainedmodels`'
bninception) with random weights, random BatchNorm scales and offsets, and running statistics that
are not the identity (accumulated over random images, then perturbed); its state dict saved with
torch.save in both formats (zip and legacy), each loaded here through `model.pretrained`; the pooled
features of the same random images (torch in eval mode, ours with train=False) compared by their
largest difference relative to the largest feature, max |ours - torch| / max |torch|, which should be
below 1e-4 in float32. Exits with 1 if any model is above --tolerance.
"""

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np

from mmsi_jax import models

# Each model: its pooling here and in torch (the DML codes' usual one: average for ResNets, max for
# BN-Inception).
POOLING = {"resnet18": "avg", "resnet50": "avg", "bn_inception": "max"}


def import_torch():
  """torch (and torchvision), imported here only: they are not dependencies of this library."""
  try:
    import torch
    import torchvision
  except ImportError as e:
    raise SystemExit(f"This check needs PyTorch and torchvision ({e}). Install them in a separate "
                     f"environment, e.g. `pip install torch torchvision pretrainedmodels`.") from None
  return torch, torchvision


def torch_model(name: str, seed: int = 0):
  """The PyTorch definition of model `name` with random weights, and its trunk: images [N, 3, H, W]
  -> feature map [N, C, h, w]."""
  torch, torchvision = import_torch()
  torch.manual_seed(seed)
  if name == "bn_inception":
    try:
      import pretrainedmodels
    except ImportError:
      raise SystemExit("bn_inception needs `pretrainedmodels` (pip install pretrainedmodels).") from None
    model = pretrainedmodels.bninception(num_classes=1000, pretrained=None)
    return model, model.features
  model = getattr(torchvision.models, name)(weights=None)
  return model, torch.nn.Sequential(*list(model.children())[:-2])


def randomize_batch_norm(model, image_size: int, seed: int = 0) -> None:
  """Random BatchNorm scales and offsets; running statistics accumulated over a batch of random images
  in training mode (so activations keep their scale through the depth), then perturbed."""
  torch, _ = import_torch()
  generator = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in norms:
      bn.weight.uniform_(0.5, 1.5, generator=generator)
      bn.bias.normal_(0.0, 0.1, generator=generator)
      bn.momentum = None  # Cumulative average over the calibration pass.
      bn.reset_running_stats()
    model.train()
    model(torch.randn(4, 3, image_size, image_size, generator=generator))
    for bn in norms:
      bn.running_mean.add_(0.1 * torch.randn(bn.running_mean.shape, generator=generator))
      bn.running_var.mul_(torch.empty(bn.running_var.shape).uniform_(0.8, 1.25, generator=generator))
  model.eval()


def compare(name: str, image_size: int, batch: int, workdir: str) -> dict:
  """Saves model `name`'s random torch weights in both torch.save formats, loads each here, and returns
  the relative difference of the pooled features for each."""
  torch, _ = import_torch()
  model, trunk = torch_model(name)
  randomize_batch_norm(model, image_size)
  images = np.random.default_rng(1).normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  with torch.no_grad():
    feature_map = trunk(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  pooled = (feature_map.amax if POOLING[name] == "max" else feature_map.mean)(dim=(2, 3)).numpy()
  figures = {"model": name, "image_size": image_size, "feature_size": pooled.shape[1],
             "max_abs_feature": float(np.abs(pooled).max())}
  for fmt, zip_format in (("zip", True), ("legacy", False)):
    path = os.path.join(workdir, f"{name}_{fmt}.pth")
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    ours = models.get(name, embed_dim=8, pooling=POOLING[name], pretrained=path)
    variables = jax.jit(ours.init)(jax.random.PRNGKey(0), images[:1])
    features = np.asarray(jax.jit(lambda v, x: ours.apply(v, x, method="features"))(variables, images))
    figures[f"rel_diff_{fmt}"] = float(np.abs(features - pooled).max() / np.abs(pooled).max())
  return figures


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmsi_jax.models.check_torch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=list(POOLING), choices=list(POOLING))
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--tolerance", type=float, default=1e-4)
  parser.add_argument("--json", dest="json_path", default=None, help="write the figures here")
  args = parser.parse_args(argv)
  import_torch()
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for name in args.models:
      figures = compare(name, args.image_size, args.batch, workdir)
      results.append(figures)
      print(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()),
            flush=True)
  if args.json_path:
    with open(args.json_path, "w") as f:
      json.dump(results, f, indent=2)
  worst = max(v for r in results for k, v in r.items() if k.startswith("rel_diff"))
  print(f"largest relative difference {worst:.3g} (tolerance {args.tolerance:g}): "
        f"{'OK' if worst < args.tolerance else 'FAILED'}")
  return 0 if worst < args.tolerance else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
