"""Builds one dataset from its official archives:

  python -m mmsi_jax.data.prepare --dataset=cub200|cars196|sop --manual_dir=DIR --data_dir=DIR

then prints, per split, the images written and the corrupt images skipped.
"""

import argparse
import sys

from mmsi_jax.data import pipeline


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmsi_jax.data.prepare", description=__doc__)
  parser.add_argument("--dataset", required=True, choices=pipeline.names())
  parser.add_argument("--manual_dir", default=None, help="the directory holding the official archives")
  parser.add_argument("--data_dir", required=True, help="where the prepared dataset is written")
  args = parser.parse_args(argv)
  try:
    summary = pipeline.prepare(args.dataset, args.data_dir, args.manual_dir)
  except FileNotFoundError as e:
    print(e, file=sys.stderr)
    return 1
  for split, report in summary.items():
    corrupt = report["corrupt"]
    print(f"{args.dataset} {split}: {report['images']} images"
          + (f"; {len(corrupt)} corrupt images skipped: {', '.join(corrupt)}" if corrupt else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
