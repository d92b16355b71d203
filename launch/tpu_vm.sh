#!/bin/bash
# One glp-train run on a multi-host TPU VM slice: every worker runs the same command; jax.distributed reads the
# slice from the TPU metadata. The workdir and store must be on storage every worker sees: a gs:// bucket
# (pip install 'glp_jax[gcs]'), or a gcsfuse / Filestore mount. A whole sweep: `glp-sweep --config=...
# --root=gs://... --emit=tpu` writes these lines per run.
#   TPU_NAME=glp-v5e-32 ZONE=us-west4-a launch/tpu_vm.sh --config=configs/train.py:model=llama1b-d12 \
#       --config.data.store=gs://glp/stores/llama1b_l07 --workdir=gs://glp/runs/d12
# The run lasts only as long as this ssh session: a dropped connection or a closed terminal ends glp-train on every
# worker (it resumes from its last checkpoint when started again). Start it where it outlives your login, e.g.
#   tmux new -s glp 'TPU_NAME=... ZONE=... launch/tpu_vm.sh --config=... --workdir=...'
#   TPU_NAME=... ZONE=... nohup launch/tpu_vm.sh --config=... --workdir=... > tpu_train.log 2>&1 &
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
SETUP="${SETUP:-cd ~/glp_jax && source .venv/bin/activate}"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="$SETUP && GLP_DISTRIBUTED=1 glp-train $(printf '%q ' "$@")"
