#!/bin/bash
# A sweep on this machine: every run is a glp-train subprocess; finished runs are skipped, interrupted ones resume.
#   launch/local.sh                                   # the demo sweep (configs/sweep.py:runlocal) into runs/sweep
#   launch/local.sh configs/sweep.py:runlocal runs/sweep --parallel=2
# One run at a time sees every local device; with --parallel=N each run gets its own equal share of the GPUs
# (CUDA_VISIBLE_DEVICES set per run; N must divide the GPU count), on CPU they share the host.
set -euo pipefail
CONFIG="${1:-configs/sweep.py:runlocal}"
ROOT="${2:-runs/sweep}"
shift $(( $# < 2 ? $# : 2 ))
exec glp-sweep --config="$CONFIG" --root="$ROOT" "$@"
