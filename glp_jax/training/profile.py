"""Where a step's time goes: a jax.profiler trace of a few training steps, read back into a summary.

`StepProfiler` traces steps `start_step+1 .. start_step+steps` of a glp-train run (`config.profile`; after the
compile and the first steps, so it shows the steady state) into `<workdir>/profile/` (XProf/TensorBoard
`.xplane.pb` and a Perfetto `perfetto_trace.json.gz`), then compiles the step once more for its optimised HLO and
writes `profile.json`: the device's op time per step by kind of op (GEMM fusions, library GEMM calls, loop
fusions, copies, ...), the top ops each with its HLO instruction, the busy share of the traced span (below 1: the
device waited for the host, e.g. the input pipeline), and the module's fusion counts. `bench/profile_step.py`
runs the same summary on the bare step. On CPU the "device" ops are the XLA runtime's host thunks.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import jax

from glp_jax.training import roofline
from glp_jax.util import files

log = logging.getLogger(__name__)

# Tracks that nest other events (whole modules, steps, launches) or are profiler bookkeeping: counting them
# beside the ops would count the same time twice.
_SKIP_TRACK = re.compile(r"module|step|framework|source|launch|python|host thread|tensorflow", re.I)
# Runtime bookkeeping on the op tracks: a thread waiting for its peers in a collective is idle, not working.
_SKIP_EVENT = re.compile(r"^(end: |ThunkExecutor::|SlinkyThreadPool::|ThreadpoolListener::|Rendezvous|Wait)")


def load_events(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz (jax.profiler wrote no trace)")
  with gzip.open(paths[-1], "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_tracks(events: list[dict]) -> tuple[dict, str]:
  """{(pid, tid): track name} of the tracks holding the executed ops, and where they came from: the device's
  streams/op lines when the trace has a device (GPU/TPU), else the XLA runtime's worker threads (CPU)."""
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {k: f"{procs[k[0]]} {v}" for k, v in tracks.items()
            if procs.get(k[0], "").startswith("/device:") and not _SKIP_TRACK.search(v)}
  if device:
    ops = [v for v in device.values() if re.search(r"xla ops", v, re.I)]   # TPU: one line of ops per core
    return ({k: v for k, v in device.items() if v in ops} if ops else device), "device"
  host = {k: f"{procs.get(k[0], '')} {v}" for k, v in tracks.items() if v.startswith("tf_XLA")}
  return host, "host XLA runtime threads (CPU backend)"


def hlo_instructions(text: str) -> dict[str, str]:
  """{instruction name: its line} of every instruction in the optimised module."""
  return {m.group(1): m.group(0).strip() for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*$", text, re.M)}


def op_kind(line: str | None) -> str:
  """What an instruction is ('dot', 'while', 'fusion/kLoop', 'fusion/__triton_gemm', 'custom-call/<target>')."""
  ins = roofline.parse_instruction(line) if line else None
  return roofline.kind(ins) if ins else "unknown"


def summarize(events: list[dict], steps: int, top: int, hlo_text: str = "") -> dict:
  """The top ops by time per step (with their HLO line), the time by kind of op, the busy share of the traced
  span and the time per track."""
  tracks, source = op_tracks(events)
  lines = hlo_instructions(hlo_text)
  per_op: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  per_track: collections.Counter = collections.Counter()
  spans = []
  track_end: dict = {}
  for e in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: (e["ts"], -e["dur"])):
    key = (e.get("pid"), e.get("tid"))
    if key not in tracks or _SKIP_EVENT.match(e.get("name", "")):
      continue
    if e["ts"] < track_end.get(key, float("-inf")):   # nested in an op of its track (a loop body, a wait)
      continue
    track_end[key] = e["ts"] + e["dur"]
    args = e.get("args") or {}
    name = args.get("hlo_op") or e["name"]   # GPU traces name the HLO instruction a kernel belongs to
    per_op[name] += e["dur"]
    calls[name] += 1
    per_track[tracks[key]] += e["dur"]
    spans.append((e["ts"], e["ts"] + e["dur"]))
  busy = wall = 0.0
  if spans:   # the union of op intervals over the traced span: how much of it the device was working
    spans.sort()
    wall = spans[-1][1] - spans[0][0]
    end = spans[0][0]
    for a, b in spans:
      busy += max(0.0, b - max(a, end))
      end = max(end, b)
  total = sum(per_op.values()) or 1.0
  per_kind: collections.Counter = collections.Counter()
  for name, us in per_op.items():
    per_kind[op_kind(lines.get(name))] += us
  rows = [{"op": name, "kind": op_kind(lines.get(name)), "ms_per_step": us / steps / 1e3, "share": us / total,
           "calls_per_step": calls[name] / steps, "hlo": lines[name][:300] if name in lines else None}
          for name, us in per_op.most_common(top)]
  return {"source": source, "ops_ms_per_step": total / steps / 1e3 if spans else 0.0,
          "busy_share": busy / wall if wall else None, "distinct_ops": len(per_op), "top": rows,
          "by_kind": {k: {"ms_per_step": v / steps / 1e3, "share": v / total} for k, v in per_kind.most_common()},
          "tracks_ms_per_step": {k: v / steps / 1e3 for k, v in per_track.most_common()}}


def hlo_summary(text: str) -> dict:
  """Counts in the optimised module: fusions by kind, custom calls by target (cuBLAS/cuDNN GEMMs, ...)."""
  kinds = collections.Counter(re.findall(r"\bfusion\(.*?kind=(k\w+)", text))
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
  entry = re.search(r"^ENTRY .*?^}", text, re.M | re.S)
  return {"fusions": dict(kinds), "custom_calls": dict(targets),
          "entry_instructions": entry.group(0).count("\n") - 1 if entry else None}


class StepProfiler:
  """Traces a window of training steps on process 0 (see the module docstring); a no-op when `steps` is 0."""

  def __init__(self, profile_cfg: Any, workdir: str, enabled: bool, top: int = 15):
    self.steps = int(profile_cfg.get("steps", 0)) if profile_cfg is not None else 0
    self.start = int(profile_cfg.get("start_step", 10)) if profile_cfg is not None else 0
    self.enabled = enabled and self.steps > 0
    self.top, self.workdir = top, workdir
    self.out = os.path.join(workdir, "profile")
    # jax.profiler writes local files: a run folder on a bucket gets the trace copied up when it ends.
    self.local = tempfile.mkdtemp(prefix="glp_profile_") if self.enabled and files.is_remote(workdir) else self.out
    self.active = False

  def before(self, step0: int) -> None:
    """Called before dispatching the step that follows step `step0`. A profiler that cannot start (e.g. no
    CUPTI on a GPU) costs a warning and profile.json's `error`, never the run."""
    if self.enabled and step0 == self.start and not self.active:
      try:
        jax.profiler.start_trace(self.local, create_perfetto_trace=True)
      except Exception as e:  # pylint: disable=broad-except
        self._failed("start the trace", e)
        return
      self.active = True

  def _failed(self, what: str, e: BaseException) -> dict:
    self.enabled = False
    error = {"error": f"could not {what}: {type(e).__name__}: {e}",
             "steps": [self.start + 1, self.start + self.steps]}
    log.warning("profile: %s (training goes on)", error["error"])
    files.write_json(os.path.join(self.workdir, "profile.json"), error)
    return error

  def annotate(self, step0: int):
    return jax.profiler.StepTraceAnnotation("train", step_num=step0) if self.active else contextlib.nullcontext()

  def after(self, step: int, outputs: Any, lower, untimed=contextlib.nullcontext) -> dict | None:
    """Called after step `step` was dispatched: at the window's end waits for it, stops the trace and writes
    profile.json (`lower()` returns the step's jax Lowered, compiled here once more for its HLO). The write-out
    runs inside `untimed()` (the trainer's: left out of the logged step time, as it is not training)."""
    if not self.active or step < self.start + self.steps:
      return None
    jax.block_until_ready(outputs)   # the step's own time, still counted
    self.active = False
    with untimed():
      return self._write_out(lower)

  def _write_out(self, lower) -> dict:
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # pylint: disable=broad-except
      return self._failed("stop the trace", e)
    hlo = ""
    try:
      hlo = lower().compile().as_text()
    except Exception as e:  # pylint: disable=broad-except  # the summary stands without HLO lines
      log.warning("profile: no HLO for the step (%s)", e)
    summary = error = None
    try:   # a trace this reader cannot summarise loses the summary, not the run (the trace is kept)
      summary = {"steps": [self.start + 1, self.start + self.steps], "trace": self.out,
                 **summarize(load_events(self.local), self.steps, self.top, hlo), "hlo": hlo_summary(hlo)}
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if self.local != self.out:
      files.copy_tree(self.local, self.out)
      shutil.rmtree(self.local, ignore_errors=True)
    if hlo:
      files.atomic_write(os.path.join(self.out, "step.hlo.txt"), hlo)
    if summary is None:
      return self._failed("summarize the trace", error)
    files.write_json(os.path.join(self.workdir, "profile.json"), summary)
    kinds = ", ".join(f"{k} {100 * v['share']:.0f}%" for k, v in list(summary["by_kind"].items())[:5])
    log.info("profile of steps %d-%d: %.2f ms of ops per step, device busy %.0f%% of the span; %s",
             self.start + 1, self.start + self.steps, summary["ops_ms_per_step"],
             100 * (summary["busy_share"] or 0), kinds)
    return summary

  def close(self) -> None:
    """Stops a trace still running (a run that ended or failed inside the window). Called from the training
    loop's `finally`: a failure here must not hide the error that ended the run."""
    if self.active:
      self.active = False
      try:
        jax.profiler.stop_trace()
      except Exception as e:  # pylint: disable=broad-except
        log.warning("profile: could not stop the trace (%s)", e)
