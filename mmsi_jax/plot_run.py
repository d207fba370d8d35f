"""Plots metrics of a run's metrics.jsonl against the step, one chart per group of keys, stacked.

    python -m mmsi_jax.plot_run runs/demo_smart_mining batches/kappa batches/error,triplets/active \
        --out docs/figures/smart_mining_kappa_error.png
"""

import argparse
import sys

import numpy as np

from mmsi_jax import reporting
from mmsi_jax.eval import figures


def series_of(records: list[dict], keys: list[str]) -> dict[str, tuple]:
  """{key: (steps, values)} of the records that hold each key."""
  series = {}
  for key in keys:
    points = [(r["step"], r[key]) for r in records if key in r]
    if not points:
      raise SystemExit(f"No record of the run holds {key!r}; its keys are "
                       f"{sorted({k for r in records for k in r} - {'step'})}.")
    series[key] = tuple(np.array(column) for column in zip(*points))
  return series


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmsi_jax.plot_run")
  parser.add_argument("workdir")
  parser.add_argument("groups", nargs="+", help="comma-separated metric keys, one chart per group")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--title", default="", help="prefix of each chart's title")
  args = parser.parse_args(argv)
  records = reporting.read_metrics(args.workdir)
  panels = {f"{args.title}{group.replace(',', ', ')}": series_of(records, group.split(","))
            for group in args.groups}
  figures.line_charts(panels).savefig(args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
