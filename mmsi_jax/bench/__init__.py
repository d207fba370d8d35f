"""Benchmarks: `python -m mmsi_jax.bench NAME [--json PATH] [options]`.

Each benchmark is a module `mmsi_jax.bench.NAME` with `add_arguments(parser)` and `run(args) -> dict`
(a flat dict of figures). Figures are reported as ratios against a baseline measured in the same run,
since absolute times on shared machines are noisy. Results and the commands that produced them are
recorded in docs/BENCHMARKS.md.
"""
