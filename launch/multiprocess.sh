#!/bin/bash
# Starts N copies of a command on this machine as ONE jax.distributed job (a local stand-in for srun / a TPU slice).
#   bash launch/multiprocess.sh N CMD [ARGS...]
#   bash launch/multiprocess.sh 2 glp-train --config=configs/train.py --workdir=runs/mp   # 2 processes
#   XLA_FLAGS=--xla_force_host_platform_device_count=8 bash launch/multiprocess.sh 2 python prog.py  # 2 x 4 CPU
#
# Every child i (0..N-1) gets:
#   GLP_DISTRIBUTED=1  GLP_COORDINATOR_ADDRESS=localhost:PORT  GLP_NUM_PROCESSES=N  GLP_PROCESS_ID=i
#   JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID   (same values; jax itself only reads
#                                                                   JAX_COORDINATOR_ADDRESS, so pass the count
#                                                                   and id to jax.distributed.initialize())
#   GPU:  CUDA_VISIBLE_DEVICES = its contiguous share of the G GPUs (G/N each; G must be divisible by N).
#         The GPUs are the inherited CUDA_VISIBLE_DEVICES list if set and non-empty, else 0..G-1 from nvidia-smi -L.
#   CPU:  XLA_FLAGS = the inherited XLA_FLAGS with --xla_force_host_platform_device_count=K (other flags kept),
#         K = GLP_DEVICES_PER_PROCESS, else the inherited device count M / N (must divide), else 1;
#         JAX_PLATFORMS=cpu unless already set.
#   CPU mode is used when nvidia-smi lists no GPU, when CUDA_VISIBLE_DEVICES is set but empty, or when
#   JAX_PLATFORMS is set and names no GPU platform (cuda/gpu/rocm). JAX_PLATFORMS naming a GPU platform when no
#   GPU is found that way (no nvidia-smi on PATH, e.g. ROCm) is an error: nothing would split the GPUs.
#
# Launcher settings (env):
#   GLP_COORDINATOR_PORT      coordinator port (default: a free port picked on localhost)
#   GLP_DEVICES_PER_PROCESS   CPU devices per process (see above)
#   GLP_KILL_GRACE_S          seconds between SIGTERM and SIGKILL for the survivors of a failed child (default 30)
#
# Output: every line a child writes to stdout / stderr goes to the launcher's stdout / stderr prefixed "[p<i>] ".
# Launcher messages go to stderr prefixed "[multiprocess] ".
# Each child runs in its own session/process group (setsid, when available), so signals reach its whole tree.
# Signals: SIGTERM / SIGINT to the launcher are forwarded to every running child (each time they arrive); the
#   children's exit statuses then decide the launcher's status (all exit 0 after the signal -> exit 0).
# Failure: when a child exits non-zero, the others still running get SIGTERM, and SIGKILL after GLP_KILL_GRACE_S
#   (after a forwarded signal they only get the SIGKILL deadline, so their own shutdown is not interrupted).
# Exit status: 0 if every child exits 0, else the status of the first child seen failing (128+n if killed by
#   signal n); 2 for usage / configuration errors (nothing started).
set -euo pipefail

PREFIX="[multiprocess]"
usage() { echo "usage: bash launch/multiprocess.sh N CMD [ARGS...]   (N: number of processes, a positive integer)"; }
die2() { echo "$PREFIX error: $*" >&2; exit 2; }
log() { echo "$PREFIX $*" >&2; }

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
if ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then echo "$PREFIX error: N must be a positive integer, got '$1'" >&2; usage >&2; exit 2; fi
NPROC=$((10#$1))
shift
if [[ "$1" == "--" ]]; then shift; fi
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi

GRACE="${GLP_KILL_GRACE_S:-30}"
[[ "$GRACE" =~ ^[0-9]+([.][0-9]+)?$ ]] || die2 "GLP_KILL_GRACE_S must be a non-negative number of seconds, got '$GRACE'"

# ---- coordinator port ----
if [[ -n "${GLP_COORDINATOR_PORT:-}" ]]; then
  PORT="$GLP_COORDINATOR_PORT"
  [[ "$PORT" =~ ^[0-9]+$ ]] && (( 10#$PORT >= 1 && 10#$PORT <= 65535 )) \
    || die2 "GLP_COORDINATOR_PORT must be a port number (1-65535), got '$PORT'"
  PORT=$((10#$PORT))
else
  PY=""
  for c in python3 python; do if command -v "$c" >/dev/null 2>&1; then PY="$c"; break; fi; done
  [[ -n "$PY" ]] || die2 "python3 is needed to pick a free port; set GLP_COORDINATOR_PORT instead"
  # jax's coordinator binds [::]:PORT, so prefer a dual-stack probe; fall back to IPv4.
  PORT="$("$PY" - <<'EOF'
import socket
try:
  s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
  s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
  s.bind(("::", 0))
except OSError:
  s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  s.bind(("", 0))
print(s.getsockname()[1])
s.close()
EOF
)" || die2 "could not pick a free port; set GLP_COORDINATOR_PORT"
fi
COORD="localhost:$PORT"

# ---- devices ----
MODE=cpu
GPU_IDS=()
if [[ -n "${JAX_PLATFORMS:-}" && ! "${JAX_PLATFORMS,,}" =~ (cuda|gpu|rocm) ]]; then
  MODE=cpu
elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" && -z "${CUDA_VISIBLE_DEVICES}" ]]; then
  MODE=cpu
elif command -v nvidia-smi >/dev/null 2>&1; then
  if command -v timeout >/dev/null 2>&1; then SMI=(timeout 60 nvidia-smi -L); else SMI=(nvidia-smi -L); fi
  G="$("${SMI[@]}" 2>/dev/null | grep -c '^GPU ' || true)"
  G="${G:-0}"
  if (( G > 0 )); then
    MODE=gpu
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      IFS=',' read -r -a GPU_IDS <<< "$CUDA_VISIBLE_DEVICES"
    else
      for ((g = 0; g < G; g++)); do GPU_IDS+=("$g"); done
    fi
  fi
fi

PLATFORMS="${JAX_PLATFORMS:-}"
if [[ "$MODE" == cpu && "${PLATFORMS,,}" =~ (cuda|gpu|rocm) ]]; then
  # CPU mode would pass JAX_PLATFORMS on unchanged, and every child would then take every GPU of the machine.
  die2 "JAX_PLATFORMS=$JAX_PLATFORMS asks for GPUs, but none were found to split between the processes" \
    "(nvidia-smi missing from PATH or listing none, or CUDA_VISIBLE_DEVICES empty): put nvidia-smi on PATH," \
    "or set JAX_PLATFORMS=cpu"
fi

if [[ "$MODE" == gpu ]]; then
  G=${#GPU_IDS[@]}
  (( G % NPROC == 0 )) || die2 "$G GPUs (${GPU_IDS[*]}) cannot be split evenly over $NPROC processes"
  PER=$((G / NPROC))
  DEV_DESC="$PER GPU(s) per process"
else
  OTHER_FLAGS=()
  INHERITED=""
  read -r -a XLA_TOKENS <<< "${XLA_FLAGS:-}"
  for t in ${XLA_TOKENS[@]+"${XLA_TOKENS[@]}"}; do
    if [[ "$t" == --xla_force_host_platform_device_count=* ]]; then
      INHERITED="${t#*=}"
    else
      OTHER_FLAGS+=("$t")
    fi
  done
  if [[ -n "${GLP_DEVICES_PER_PROCESS:-}" ]]; then
    [[ "$GLP_DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] \
      || die2 "GLP_DEVICES_PER_PROCESS must be a positive integer, got '$GLP_DEVICES_PER_PROCESS'"
    PER=$((10#$GLP_DEVICES_PER_PROCESS))
  elif [[ -n "$INHERITED" ]]; then
    [[ "$INHERITED" =~ ^[1-9][0-9]*$ ]] \
      || die2 "cannot read --xla_force_host_platform_device_count=$INHERITED in XLA_FLAGS"
    (( 10#$INHERITED % NPROC == 0 )) \
      || die2 "--xla_force_host_platform_device_count=$INHERITED in XLA_FLAGS cannot be split over $NPROC processes (set GLP_DEVICES_PER_PROCESS)"
    PER=$((10#$INHERITED / NPROC))
  else
    PER=1
  fi
  CHILD_XLA_FLAGS="${OTHER_FLAGS[*]+${OTHER_FLAGS[*]} }--xla_force_host_platform_device_count=$PER"
  CHILD_JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  DEV_DESC="$PER CPU device(s) per process"
fi

# A child in its own session / process group, so SIGTERM/SIGKILL reach everything it started.
SETSID=()
if command -v setsid >/dev/null 2>&1; then SETSID=(setsid); fi

log "$NPROC processes, coordinator $COORD, $DEV_DESC: $*"

PIDS=()       # child pids (== their process group ids when setsid is used)
SED_PIDS=()   # the prefixing filters
LIVE=()       # indices of children not yet reaped
FINISHED=0    # the main loop ran to the end
SIGNALLED=""  # the last signal forwarded (TERM / INT), if any
SIGNALLED_UPTO=0

signal_child() {  # signal pid: the child's process group if it leads one, else the child itself
  kill -s "$1" -- "-$2" 2>/dev/null || kill -s "$1" "$2" 2>/dev/null || true
}
signal_live() {
  local i
  for i in ${LIVE[@]+"${LIVE[@]}"}; do signal_child "$1" "${PIDS[$i]}"; done
}
on_signal() {
  SIGNALLED="$1"
  SIGNALLED_UPTO=${#LIVE[@]}  # while starting: children 0..SIGNALLED_UPTO-1 get it here, the rest after the loop
  log "got SIG$1; forwarding it to ${#LIVE[@]} running process(es)"
  signal_live "$1"
}
on_exit() {  # the launcher itself is going away early (error): do not leave children behind
  if (( FINISHED == 0 && ${#LIVE[@]} > 0 )); then
    log "launcher exiting early; sending SIGTERM to ${#LIVE[@]} running process(es)"
    signal_live TERM
  fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap on_exit EXIT

child() {  # child I CMD...: runs in the forked subshell; sets the environment of process I and execs CMD
  local i="$1"; shift
  trap - INT TERM QUIT EXIT
  export GLP_DISTRIBUTED=1 GLP_COORDINATOR_ADDRESS="$COORD" GLP_NUM_PROCESSES="$NPROC" GLP_PROCESS_ID="$i"
  export JAX_COORDINATOR_ADDRESS="$COORD" JAX_NUM_PROCESSES="$NPROC" JAX_PROCESS_ID="$i"
  if [[ "$MODE" == gpu ]]; then
    local share=("${GPU_IDS[@]:$((i * PER)):$PER}")
    CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${share[*]}")"
    export CUDA_VISIBLE_DEVICES
  else
    export XLA_FLAGS="$CHILD_XLA_FLAGS" JAX_PLATFORMS="$CHILD_JAX_PLATFORMS"
  fi
  exec ${SETSID[@]+"${SETSID[@]}"} "$@" >&"$OUT_FD" 2>&"$ERR_FD" {OUT_FD}>&- {ERR_FD}>&-
}

# ---- start ----
for ((i = 0; i < NPROC; i++)); do
  if [[ -n "$SIGNALLED" ]]; then log "not starting p$i..p$((NPROC - 1)) after SIG$SIGNALLED"; break; fi
  # stdout and stderr each go through a line-prefixing filter that ignores INT/TERM (it ends at EOF, so the last
  # lines a child prints while shutting down are not lost). The second filter must not hold the first's pipe.
  exec {OUT_FD}> >(trap '' INT TERM; exec sed -u "s/^/[p$i] /")
  SED_PIDS+=("$!")
  exec {ERR_FD}> >(exec {OUT_FD}>&-; trap '' INT TERM; exec sed -u "s/^/[p$i] /" >&2)
  SED_PIDS+=("$!")
  child "$i" "$@" &
  PIDS+=("$!")
  LIVE+=("$i")
  exec {OUT_FD}>&- {ERR_FD}>&-
done
if [[ -n "$SIGNALLED" ]]; then  # a signal that came while a child was being forked: that child gets it too
  for ((j = SIGNALLED_UPTO; j < ${#LIVE[@]}; j++)); do signal_child "$SIGNALLED" "${PIDS[${LIVE[$j]}]}"; done
fi

# ---- wait ----
FAIL_STATUS=0
FAILED=""
TIMER_PID=""
while (( ${#LIVE[@]} > 0 )); do
  st=0
  wait -n 2>/dev/null || st=$?   # returns when any child (or the kill timer) ends, or when a trapped signal arrives
  if (( st == 127 )); then sleep 0.1; fi
  still=()
  for i in "${LIVE[@]}"; do
    pid="${PIDS[$i]}"
    if kill -0 "$pid" 2>/dev/null; then still+=("$i"); continue; fi
    s=0
    wait "$pid" 2>/dev/null || s=$?
    if (( s == 0 )); then
      log "p$i (pid $pid) exited with status 0"
    else
      log "p$i (pid $pid) exited with status $s"
      if [[ -z "$FAILED" ]]; then FAILED="$i"; FAIL_STATUS="$s"; fi
    fi
  done
  LIVE=(${still[@]+"${still[@]}"})
  if [[ -n "$FAILED" && -z "$TIMER_PID" && ${#LIVE[@]} -gt 0 ]]; then
    if [[ -n "$SIGNALLED" ]]; then  # they already have the forwarded signal: leave their shutdown alone
      log "p$FAILED failed (status $FAIL_STATUS) after SIG$SIGNALLED; SIGKILL to ${#LIVE[@]} other process(es) in ${GRACE}s"
    else
      log "p$FAILED failed (status $FAIL_STATUS); sending SIGTERM to ${#LIVE[@]} other process(es), SIGKILL in ${GRACE}s"
      signal_live TERM
    fi
    sleep "$GRACE" </dev/null >/dev/null 2>&1 &
    TIMER_PID=$!
  fi
  if [[ -n "$TIMER_PID" && "$TIMER_PID" != done ]] && ! kill -0 "$TIMER_PID" 2>/dev/null; then
    TIMER_PID=done
    if (( ${#LIVE[@]} > 0 )); then
      log "grace period over; sending SIGKILL to ${#LIVE[@]} process(es)"
      signal_live KILL
    fi
  fi
done
FINISHED=1
if [[ -n "$TIMER_PID" && "$TIMER_PID" != done ]]; then kill "$TIMER_PID" 2>/dev/null || true; fi

# ---- drain the output filters (they end when every writer, including stray grandchildren, is gone) ----
sed_running() {
  local p
  for p in "${SED_PIDS[@]}"; do if kill -0 "$p" 2>/dev/null; then return 0; fi; done
  return 1
}
for ((t = 0; t < 50; t++)); do sed_running || break; sleep 0.1; done
if sed_running; then
  if (( ${#SETSID[@]} > 0 )); then
    log "processes left behind by the children still hold their output; sending SIGKILL to their process groups"
    for pid in "${PIDS[@]}"; do kill -s KILL -- "-$pid" 2>/dev/null || true; done
    for ((t = 0; t < 20; t++)); do sed_running || break; sleep 0.1; done
  fi
  for p in "${SED_PIDS[@]}"; do kill -s KILL "$p" 2>/dev/null || true; done
fi

if [[ -n "$FAILED" ]]; then
  log "exit $FAIL_STATUS (first failure: p$FAILED)"
  exit "$FAIL_STATUS"
fi
log "all $NPROC processes exited with status 0"
exit 0
