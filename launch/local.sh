#!/bin/bash
# A sweep on this machine: every run is a glp-train subprocess; finished runs are skipped, interrupted ones resume.
#   launch/local.sh                                   # the demo sweep (configs/sweep.py:runlocal) into runs/sweep
#   launch/local.sh configs/sweep.py:runlocal runs/sweep --parallel=2
#   launch/local.sh configs/sweep.py --parallel=2     # CONFIG and ROOT are optional; flags go to glp-sweep
# One run at a time sees every local device; with --parallel=N each run gets its own equal share of the GPUs
# (CUDA_VISIBLE_DEVICES set per run; N must divide the GPU count), on CPU they share the host.
set -euo pipefail
# CONFIG and ROOT are taken only from leading arguments that are not flags, so a flag is never read as a folder.
CONFIG="configs/sweep.py:runlocal"
ROOT="runs/sweep"
if [[ $# -gt 0 && "$1" != -* ]]; then CONFIG="${1:-$CONFIG}"; shift; fi
if [[ $# -gt 0 && "$1" != -* ]]; then ROOT="${1:-$ROOT}"; shift; fi
exec glp-sweep --config="$CONFIG" --root="$ROOT" "$@"
