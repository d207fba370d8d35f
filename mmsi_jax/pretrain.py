"""The demo's pretrained models, built on first use: the regime every method is published in, in miniature.

Every method here is published as fine-tuning: an ImageNet backbone (MMSI: a converged multi-similarity
model) fine-tuned on the classes of a retrieval dataset. configs/finetune.py runs the demo that way from
two models this module builds, each by an ordinary, resumable training run:

  glyphs_resnet18.npz  ResNet-18 trained to classify the 1,000 pretraining glyphs (configs/pretrain.py),
                       its backbone saved as a state dict with torchvision's names, loaded through
                       `model.pretrained` like torchvision's ImageNet files (the head and classifier
                       dropped, as torchvision's `fc`);
  glyphs_resnet18_ms   the workdir of configs/finetune.py:ms, seed 0: the multi-similarity model MMSI
                       fine-tunes further (`init_from`), as the MMSI authors start from theirs.

  python -m mmsi_jax.pretrain [--out=data/pretrained/glyphs_resnet18.npz]

builds one (the backbone by default; the run resumes where it stopped). A training run whose
`model.pretrained` or `init_from` names one of them (by its file name), while it is missing, builds it
first and says so. The build holds `<path>.lock` (an exclusive `fcntl` lock): runs started meanwhile,
e.g. by `compare --parallel`, wait for it and then use it. A model is complete once its file (or its
workdir's `BUILT` mark) is there, written last; a build that was stopped resumes from its run's
checkpoints.
"""

import contextlib
import dataclasses
import fcntl
import os
import time
from typing import Optional, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging

from mmsi_jax import config_cli

BUILT_MARK = "BUILT"  # In a workdir model once its run has finished.


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a pretrained model is made: the run of `config` ("FILE" or "FILE:VARIANT"), then either its
  backbone as a state dict (`export_backbone`, for model.pretrained) or its workdir (for init_from)."""
  config: str
  export_backbone: bool
  what: str  # For the messages: what the model is and how long it takes.


RECIPES = {
    "glyphs_resnet18.npz": Recipe(
        "configs/pretrain.py", True,
        "ResNet-18 classifying the 1,000 pretraining glyphs (configs/pretrain.py; about 13 minutes on 2 "
        "CPU cores)"),
    "glyphs_resnet18_ms": Recipe(
        "configs/finetune.py:ms", False,
        "the multi-similarity model MMSI fine-tunes (configs/finetune.py:ms, seed 0; a few minutes on 2 "
        "CPU cores)"),
}


def recipe_of(path: str) -> Optional[Recipe]:
  """The recipe of the model at `path` (by its name), None for any other file or workdir."""
  return RECIPES.get(os.path.basename(path.rstrip(os.sep))) if path else None


def run_dir(path: str, recipe: Recipe) -> str:
  """The workdir of the run that builds `path`: beside the .npz for a backbone, `path` itself else."""
  return os.path.splitext(path)[0] + ".run" if recipe.export_backbone else path


def is_built(path: str, recipe: Recipe) -> bool:
  return os.path.isfile(path if recipe.export_backbone else os.path.join(path, BUILT_MARK))


def export_backbone(workdir: str, path: str) -> None:
  """Writes the backbone of `workdir`'s latest checkpoint (parameters and BatchNorm statistics) to `path`
  as a torch-named state dict (.npz), atomically: the embedding head and any classifier are left out."""
  from mmsi_jax import checkpointing  # pylint: disable=g-import-not-at-top  (orbax: a build only)
  from mmsi_jax.models import torch_weights  # pylint: disable=g-import-not-at-top
  weights = checkpointing.read_weights(workdir)
  modules = dict(weights["params"]["backbone"])
  for module, stats in weights["batch_stats"].get("backbone", {}).items():
    modules[module] = {**modules.get(module, {}), **stats}
  state_dict = torch_weights.to_state_dict(modules)
  partial = f"{path}.partial.npz"
  np.savez(partial, **state_dict)
  os.replace(partial, path)


@contextlib.contextmanager
def _build_lock(path: str):
  """Holds `<path>.lock` exclusively; says so when another process holds it and waits for it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(f"{path}.lock", "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"Waiting for {path}: another process is building it (it holds {path}.lock).", flush=True)
      started = time.perf_counter()
      fcntl.flock(lock, fcntl.LOCK_EX)
      print(f"  ... its build ended after {time.perf_counter() - started:.0f} s of waiting.", flush=True)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def recipe_config(recipe: Recipe, data_dir: str,
                  overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The recipe's config, reading and writing its datasets under `data_dir`, with `overrides`
  (--config.KEY=VALUE)."""
  config, _ = config_cli.resolve(recipe.config, [f"--config.data.data_dir={data_dir}", *overrides])
  return config


def ensure(path: str, data_dir: str = "data", overrides: Sequence[str] = ()) -> None:
  """Builds the model at `path` if it is one of RECIPES and not there yet (module docstring), its run
  with `overrides`; waits while another process builds it. Anything else is left to the caller's own
  checks."""
  recipe = recipe_of(path)
  if recipe is None or is_built(path, recipe):
    return
  with _build_lock(path):
    if is_built(path, recipe):  # Built by the process that held the lock.
      return
    workdir = run_dir(path, recipe)
    print(f"{path} is missing: building it once, {recipe.what}; its run is {workdir}.", flush=True)
    from mmsi_jax import train  # pylint: disable=g-import-not-at-top  (train imports this module)
    started = time.perf_counter()
    train.train_and_evaluate(recipe_config(recipe, data_dir, overrides), workdir)
    if recipe.export_backbone:
      export_backbone(workdir, path)
    else:
      with open(os.path.join(workdir, BUILT_MARK), "w") as f:
        f.write(f"{recipe.config}\n")
    print(f"Built {path} in {time.perf_counter() - started:.0f} s.\n", flush=True)


def trained_on_run_dataset(path: str, config: ml_collections.ConfigDict) -> bool:
  """Whether `path` is a model of RECIPES trained on the dataset of the run of `config`."""
  recipe = recipe_of(path)
  return recipe is not None and (
      recipe_config(recipe, config.data.data_dir).data.name == config.data.name)


def for_validation(path: str, config: ml_collections.ConfigDict, directory: str) -> str:
  """The model a run validating on `config.data.validation`'s fold starts from in place of `path`.

  A model of RECIPES trained on the run's own dataset (glyphs_resnet18_ms: the `ms` run on every
  training class) has seen the fold's validation classes: the same recipe is built (once, as `ensure`
  builds) under `directory`/validation_<folds>_<fold>/, trained on the fold's training classes alone and
  evaluated on its validation classes. Any other path (a backbone pretrained on other classes, a user's
  own model) is returned as it is."""
  validation = config.data.validation
  if not validation.folds or not trained_on_run_dataset(path, config):
    return path
  fold_path = os.path.join(directory, f"validation_{validation.folds}_{validation.fold}",
                           os.path.basename(path.rstrip(os.sep)))
  ensure(fold_path, config.data.data_dir, [f"--config.data.validation.folds={validation.folds}",
                                           f"--config.data.validation.fold={validation.fold}"])
  return fold_path


def ensure_inputs(config: ml_collections.ConfigDict) -> None:
  """Builds the pretrained models a run starts from (`model.pretrained`, `init_from`) if missing."""
  ensure(config.model.get("pretrained", ""), config.data.data_dir)
  ensure(config.init_from, config.data.data_dir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Our progress goes to stdout; libraries stay quiet.
  out = flags.FLAGS.out
  if recipe_of(out) is None:
    raise app.UsageError(f"--out={out}: the models this command builds are named {sorted(RECIPES)} (in "
                         f"any directory).")
  if is_built(out, recipe_of(out)):
    print(f"{out} is already built; delete it to build it again.")
    return
  ensure(out, flags.FLAGS.data_dir)


if __name__ == "__main__":  # The flags are the command's: a training run imports this module too.
  flags.DEFINE_string("out", "data/pretrained/glyphs_resnet18.npz",
                      f"The model to build; its file name is one of {sorted(RECIPES)}.")
  flags.DEFINE_string("data_dir", "data", "Where the datasets are (built there if missing).")
  app.run(main)
