"""Runs one benchmark and prints its figures; `--json PATH` also writes them as a flat JSON object."""

import argparse
import importlib
import json
import pkgutil
import sys

import mmsi_jax.bench as bench_package
from mmsi_jax.bench import timing

_NOT_BENCHMARKS = {"timing"}


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(bench_package.__path__)
                if not m.name.startswith("_") and m.name not in _NOT_BENCHMARKS)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmsi_jax.bench")
  parser.add_argument("name", choices=available(), help="which benchmark")
  parser.add_argument("--json", dest="json_path", default=None, help="write the figures here")
  name = parser.parse_known_args(argv)[0].name
  module = importlib.import_module(f"mmsi_jax.bench.{name}")
  module.add_arguments(parser)
  args = parser.parse_args(argv)
  figures = {"benchmark": name, "device": timing.device_description(), **module.run(args)}
  width = max(len(k) for k in figures)
  for key, value in figures.items():
    print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
  if args.json_path:
    with open(args.json_path, "w") as f:
      json.dump(figures, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
