#!/usr/bin/env bash
# One host with one or more NVIDIA GPUs: installs the CUDA build of the pinned JAX and trains.
# Every local GPU is used data-parallel (the batch must split evenly over them).
#
#   launch/gpu.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/gpu.sh configs/cub200.py:mmsi_ms runs/cub_mmsi --config.data.manual_dir=data/manual/cub200
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
pip install -r requirements.txt "jax[cuda12]==${jax_version}"
python -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else
  "No GPU visible to JAX (backend: " + jax.default_backend() + "): check nvidia-smi and the CUDA driver.")'
exec python -m mmsi_jax.main --config="${config}" --workdir="${workdir}" "$@"
