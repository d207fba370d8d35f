#!/usr/bin/env bash
# A Cloud TPU pod slice (TPU VMs): copies this checkout to every worker, installs the TPU build of the
# pinned JAX, and starts one training process per worker (--multihost: JAX finds the other workers).
# WORKDIR must be a directory every worker sees (e.g. a Filestore or gcsfuse mount): all processes take
# part in the checkpoints, process 0 writes the reports. The checkout is copied without data/, except
# data/pretrained (the ImageNet weights the real-dataset configs read): the datasets are built on each
# worker from --config.data.manual_dir, or shared through --config.data.data_dir, on the same mount.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/sop.py:mmsi_ms /mnt/shared/runs/sop_mmsi
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
cd "$(dirname "$0")/.."
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
package=$(mktemp -d)/mmsi_jax_src.tar
tar cf "${package}" --exclude=./data --exclude=./runs --exclude=./.git --exclude=./.venv \
  --exclude=__pycache__ .
if [[ -d data/pretrained ]]; then
  tar rf "${package}" ./data/pretrained
fi
gzip "${package}"
gcloud compute tpus tpu-vm scp "${package}.gz" "${tpu}":~/mmsi_jax_src.tgz --zone="${zone}" --worker=all
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all --command="
  set -e; mkdir -p ~/mmsi_jax && tar xzf ~/mmsi_jax_src.tgz -C ~/mmsi_jax && cd ~/mmsi_jax &&
  pip install -q -r requirements.txt 'jax[tpu]==${jax_version}' &&
  python -m mmsi_jax.main --multihost --config=${config} --workdir=${workdir}${overrides}"
