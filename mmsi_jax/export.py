"""A trained model as one file, loadable without the training code's state:

    python -m mmsi_jax.export --workdir=runs/demo --out=demo_model.npz

writes the model of the workdir's latest finished checkpoint (parameters and BatchNorm statistics; no
optimizer, memory or miner) with the run's config, as a NumPy .npz read with allow_pickle=False
(inference.py: the format). `mmsi_jax.load("demo_model.npz")`, python -m mmsi_jax.embed
--workdir=demo_model.npz and python -m mmsi_jax.search --model=demo_model.npz use it as they use the
workdir.
"""

import argparse
import os
import sys

from mmsi_jax import inference


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmsi_jax.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="The run's workdir.")
  parser.add_argument("--out", required=True, help="The model file to write (.npz).")
  args = parser.parse_args(argv)
  try:
    inference.export_model(args.workdir, args.out)
  except (ValueError, FileNotFoundError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB).")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
