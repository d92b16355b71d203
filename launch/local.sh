#!/bin/bash
# A sweep on this machine: every run is a glp-train subprocess; finished runs are skipped, interrupted ones resume.
#   launch/local.sh                                   # the demo sweep (configs/sweep.py:runlocal) into runs/sweep
#   launch/local.sh configs/sweep.py:runlocal runs/sweep --parallel=2
# One process sees all local devices; on a multi-GPU host give each parallel run its own GPUs with
# CUDA_VISIBLE_DEVICES instead, or run one at a time.
set -euo pipefail
CONFIG="${1:-configs/sweep.py:runlocal}"
ROOT="${2:-runs/sweep}"
shift $(( $# < 2 ? $# : 2 ))
exec glp-sweep --config="$CONFIG" --root="$ROOT" "$@"
