"""Run metrics: `<workdir>/metrics.jsonl` (process 0), TensorBoard events (`log.tensorboard`, with tensorboardX),
Weights & Biases (`log.wandb_project`), a loss-curve PNG at the end,
a tqdm bar on interactive runs, and the `Recorder` that turns each step's device metrics into those lines.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from glp_jax.util import files, runtime
from glp_jax.util.errors import ConfigError, GlpError

log = logging.getLogger("glp_jax")

class NonFiniteLoss(GlpError, FloatingPointError):
  """The train loss became NaN/inf; nothing from that step on is checkpointed."""

def _import_tensorboardx():
  """tensorboardX, imported without torch: its writer module imports torch whenever it is installed (the torch
  extra) for type hints only (it converts torch tensors where it meets them), and that cost every trainer ~3 s of
  start-up on 2 cores and ~200 MB. A process that already has torch keeps it; a later `import torch` works."""
  if "torch" in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules["torch"] = None   # `import torch` raises ImportError for this one import, which tensorboardX expects
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


def to_host(metrics: dict[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (blocks until they are computed)."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}

def check_finite(step: int, metrics: dict[str, float]) -> None:
  bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])]
  if bad:
    raise NonFiniteLoss(f"non-finite {', '.join(bad)} at step {step} ({metrics}): stopping without saving "
                        f"this or later state; lower config.opt.lr or check the store's statistics")

class MetricsWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard; drives a progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, enabled: bool | None = None,
               tensorboard: bool = True, progress: bool | None = None, wandb_run: Any = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._bar = None
    self._wandb = wandb_run
    if not self.enabled:
      return
    files.makedirs(workdir)
    truncate_after(self.path, start_step)
    if tensorboard:
      try:
        tensorboardX = _import_tensorboardx()
        # Events past the resumed step were written before a stop or crash (metrics.jsonl is cut the same way).
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"),
                                              purge_step=start_step + 1 if start_step else None)
      except ImportError:
        log.warning("log.tensorboard is on but tensorboardX is not installed (pip install tensorboardX)")
    if progress if progress is not None else runtime.interactive():
      from tqdm.auto import tqdm   # a widget in Jupyter, a text bar in a terminal
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = {"step": int(step), **{k: _jsonable(v) for k, v in record.items()}}
    files.append_jsonl(self.path, line)
    scalars = {k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float))}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))
    log.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in line.items()
                                          if k in ("loss", "eval_loss", "lr", "grad_norm", "step_time")))

  def progress(self, step: int, loss: float | None = None, examples_per_s: float | None = None) -> None:
    if self._bar is not None:
      self._bar.n = step
      post = {}
      if loss is not None:
        post["loss"] = f"{loss:.4f}"
      if examples_per_s:
        post["ex/s"] = f"{examples_per_s:.3g}"
      self._bar.set_postfix(post, refresh=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity), matched against `device.device_kind`: the
# first name contained in it wins, so a name comes before any name it contains ("L40S", "L40", "L4").
# Unknown devices (CPUs among them) give no MFU rather than a guess.
PEAK_BF16_FLOPS = (
    ("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("B200", 2250e12),
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops(devices) -> float | None:
  """The summed dense bf16 peak FLOP/s of `devices`, or None when any device is not in the table."""
  total = 0.0
  for d in devices:
    peak = next((p for name, p in PEAK_BF16_FLOPS if name.lower() in d.device_kind.lower()), None)
    if peak is None:
      return None
    total += peak
  return total


class Recorder:
  """Each logged step's device metrics -> checked lines. Metrics are fetched only for steps that write a line
  (every `log_every` steps, eval and checkpoint steps, the last step), one step late, so the host never waits
  for the device; the `nonfinite` count travelling with them covers the steps in between, so a NaN anywhere
  stops the run at the next fetch, and a checkpoint is written only after its step's fetch (`flush`). A line's
  step_time (and its throughput) covers the steps, the input pipeline, metrics and checkpoint saves since the
  last line; evaluations and the profiler's write-out run `untimed` (wall_time counts everything)."""

  def __init__(self, writer: MetricsWriter, *, log_every: int, total_steps: int, batch_size: int,
               flops_per_example: int, start_step: int, wall_offset: float = 0.0, peak: float | None = None):
    self.writer, self.log_every, self.total_steps = writer, log_every, total_steps
    self.batch_size, self.flops_per_example, self.peak = batch_size, flops_per_example, peak
    self.wall_offset, self.t_start = wall_offset, time.time()
    self.pending: tuple[int, dict, bool] | None = None
    self.evals: dict[int, dict[str, float]] = {}   # eval results waiting for their step's line
    self.last_eval: dict[str, float] = {}
    self.last_loss = float("nan")
    self.throughput: list[dict[str, float | None]] = []   # per line: the summary reports medians
    self._line_time, self._line_step = time.time(), start_step

  def wall_time(self) -> float:
    """Seconds of training in this workdir, over every (resumed) process."""
    return self.wall_offset + time.time() - self.t_start

  def due(self, step: int) -> bool:
    return every(step, self.log_every) or step == self.total_steps

  @contextlib.contextmanager
  def untimed(self):
    """Time spent inside is left out of the next line's step time and throughput (the profiler writing its
    trace and compiling the step again: measuring, not training); wall_time still counts it."""
    t = time.time()
    try:
      yield
    finally:
      self._line_time += time.time() - t

  def push(self, step: int, metrics: dict, line: bool = True) -> None:
    """Holds `step`'s device metrics, checked (and, with `line`, written) at the next `tick` or `flush`. A
    checkpoint-only step is checked but writes no line, so metrics.jsonl does not depend on when a run was
    interrupted."""
    self.flush()
    self.pending = (step, metrics, line)

  def tick(self) -> None:
    """Called once a later step is dispatched: the held step has finished, so fetching it costs no stall."""
    self.flush()

  def flush(self) -> None:
    """Fetches, checks and records the held metrics now (before a checkpoint: nothing non-finite is saved)."""
    pending, self.pending = self.pending, None
    if pending is not None:
      self._record(*pending)

  def add_eval(self, step: int, results: dict[str, float]) -> None:
    self.evals[step] = self.last_eval = results

  def _record(self, step: int, device_metrics: dict, line: bool) -> None:
    host = to_host(device_metrics)
    nonfinite = int(host.pop("nonfinite", 0))
    if nonfinite:
      raise NonFiniteLoss(f"{nonfinite} step(s) up to step {step} had a non-finite loss or gradient norm "
                          f"({host}): stopping without saving; lower config.opt.lr or check the store's statistics")
    check_finite(step, host)
    self.last_loss = host["loss"]
    if not line:
      return
    now = time.time()
    step_time = (now - self._line_time) / max(step - self._line_step, 1)
    self._line_time, self._line_step = now, step
    speed = self.batch_size / max(step_time, 1e-9)
    flops_per_s = speed * self.flops_per_example
    rates = {"examples_per_s": speed, "tflops_per_s": flops_per_s / 1e12,
             "mfu": flops_per_s / self.peak if self.peak else None}
    self.throughput.append(rates)
    self.writer.write(step, {"examples": step * self.batch_size,
                             "flops": step * self.batch_size * self.flops_per_example,
                             "wall_time": self.wall_offset + now - self.t_start, "step_time": step_time,
                             **rates, **host, **self.evals.pop(step, {})})
    self.writer.progress(step, host["loss"], speed)

  def medians(self) -> dict[str, float | None]:
    """Median examples/s, TFLOP/s and MFU over the run's lines (the first, holding compile time, too): every
    line of metrics.jsonl where this process writes it, so the steps of earlier (resumed) processes count and
    rerunning a finished run changes nothing; else the lines of this process."""
    rows = self.throughput
    if self.writer.enabled and files.exists(self.writer.path):
      rows = [r for r in files.iter_jsonl(self.writer.path) if "examples_per_s" in r]
    out = {}
    for k in ("examples_per_s", "tflops_per_s", "mfu"):
      vals = [r[k] for r in rows if r.get(k) is not None]
      out[f"median_{k}"] = float(np.median(vals)) if vals else None
    return out

def check_logging(log_cfg: Any) -> None:
  """Fails before any work when a configured logger cannot run."""
  if log_cfg.get("wandb_project"):
    try:
      import wandb  # noqa: F401  (imported only to learn that it can be)
    except ImportError:
      raise ConfigError("config.log.wandb_project is set but wandb is not installed: pip install wandb") from None


WANDB_FILE = "wandb.json"


def start_wandb(log_cfg: Any, config: dict, workdir: str):
  """A W&B run when `log.wandb_project` is set, else None. Named after the workdir; its id is drawn at the first
  start and kept in the workdir, so a restart resumes that run (moved or not) while two sweeps' runs of the same
  name (`w0.5_l3_...` under two roots) stay two runs."""
  if not log_cfg.get("wandb_project"):
    return None
  import wandb
  name = os.path.basename(workdir.rstrip("/"))
  path = os.path.join(workdir, WANDB_FILE)
  run_id = (files.read_json(path) or {}).get("id")
  if not run_id:
    run_id = f"{name[:48]}-{os.urandom(4).hex()}"   # W&B ids: at most 64 characters
    files.write_json(path, {"id": run_id})
  return wandb.init(project=log_cfg.wandb_project, entity=log_cfg.get("wandb_entity") or None, name=name,
                    id=run_id, resume="allow", config=config,
                    dir=None if files.is_remote(workdir) else workdir)   # wandb keeps its files locally


def plot_loss_curve(metrics_path: str, out_png: str) -> str | None:
  """Train and held-out loss against activations seen, from metrics.jsonl; returns the PNG path."""
  rows = [r for r in files.iter_jsonl(metrics_path) if "loss" in r]
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["examples"] for r in rows], [r["loss"] for r in rows], label="train loss (batch)", lw=1)
  ev = [r for r in rows if r.get("eval_loss") is not None]
  if ev:
    ax.errorbar([r["examples"] for r in ev], [r["eval_loss"] for r in ev],
                yerr=[r.get("eval_loss_sem") or 0 for r in ev], fmt="o-", ms=3, label="held-out loss (± SEM)")
  ax.set_xlabel("activations seen")
  ax.set_ylabel("flow-matching loss")
  ax.set_title(os.path.basename(os.path.dirname(metrics_path.rstrip("/"))))
  ax.legend()
  fig.tight_layout()
  files.save_figure(fig, out_png, dpi=120)
  plt.close(fig)
  return out_png


def every(step: int, period: int) -> bool:
  """True every `period` steps; a period of 0 turns the event off (it still happens at the last step)."""
  return period > 0 and step % period == 0

def truncate_after(path: str, step: int) -> None:
  """Drops lines of steps > `step` (logged by a run that died after its last checkpoint), so a resumed run's
  metrics.jsonl holds one trajectory (a torn last line from a killed process goes too)."""
  if not files.exists(path):
    return
  lines = files.read_bytes(path).decode(errors="replace").splitlines(keepends=True)
  keep = [json.dumps(r) + "\n" for r in files.iter_jsonl(path) if r.get("step", step + 1) <= step]
  if keep != lines:
    files.atomic_write(path, "".join(keep))

def last_logged_loss(path: str) -> float:
  """The train loss of the last metrics.jsonl line (nan when there is none)."""
  losses = [r["loss"] for r in files.iter_jsonl(path) if "loss" in r]
  return float(losses[-1]) if losses else float("nan")

def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item() if np.ndim(v) == 0 else v.tolist()
  return v
