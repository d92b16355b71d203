"""Run metrics: `<workdir>/metrics.jsonl` (process 0), TensorBoard events (when tensorboardX is installed),
a tqdm bar on interactive runs, and the `Recorder` that turns each step's device metrics into those lines.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from glp_jax.util import files
from glp_jax.util.errors import GlpError

log = logging.getLogger("glp_jax")


class NonFiniteLoss(GlpError, FloatingPointError):
  """The train loss became NaN/inf; nothing from that step on is checkpointed."""


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
               tensorboard: bool = True, progress: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_after(self.path, start_step)
    if tensorboard:
      try:
        import tensorboardX
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        pass
    if progress if progress is not None else sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = {"step": int(step), **{k: _jsonable(v) for k, v in record.items()}}
    files.append_jsonl(self.path, line)
    if self._tb is not None:
      for k, v in line.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
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


class Recorder:
  """Each step's device metrics -> checked, logged lines. A step's metrics are fetched only once the next
  step is dispatched (so the host never stalls the device); every fetched loss is checked finite; a line is
  written every `log_every` steps, at eval steps and at the last step, with the eval results of that step."""

  def __init__(self, writer: MetricsWriter, *, log_every: int, total_steps: int, batch_size: int,
               flops_per_example: int, lr: Callable[[int], Any], start_step: int, wall_offset: float = 0.0):
    self.writer, self.log_every, self.total_steps = writer, log_every, total_steps
    self.batch_size, self.flops_per_example, self.lr = batch_size, flops_per_example, lr
    self.wall_offset, self.t_start = wall_offset, time.time()
    self.pending: tuple[int, dict] | None = None
    self.evals: dict[int, dict[str, float]] = {}   # eval results waiting for their step's line
    self.last_eval: dict[str, float] = {}
    self.last_loss = float("nan")
    self._line_time, self._line_step = time.time(), start_step

  def wall_time(self) -> float:
    """Seconds of training in this workdir, over every (resumed) process."""
    return self.wall_offset + time.time() - self.t_start

  def push(self, step: int, metrics: dict) -> None:
    """Holds `step`'s device metrics; fetches and records the previous step's."""
    previous, self.pending = self.pending, (step, metrics)
    if previous is not None:
      self._record(*previous)

  def flush(self) -> None:
    """Fetches and records the held metrics now (before a checkpoint: nothing non-finite is saved)."""
    previous, self.pending = self.pending, None
    if previous is not None:
      self._record(*previous)

  def add_eval(self, step: int, results: dict[str, float]) -> None:
    self.evals[step] = self.last_eval = results

  def _record(self, step: int, device_metrics: dict) -> None:
    host = to_host(device_metrics)
    check_finite(step, host)
    self.last_loss = host["loss"]
    if not (every(step, self.log_every) or step in self.evals or step == self.total_steps):
      return
    now = time.time()
    step_time = (now - self._line_time) / max(step - self._line_step, 1)
    self._line_time, self._line_step = now, step
    self.writer.write(step, {"examples": step * self.batch_size,
                             "flops": step * self.batch_size * self.flops_per_example,
                             "wall_time": self.wall_offset + now - self.t_start, "step_time": step_time,
                             "lr": float(self.lr(step - 1)), **host, **self.evals.pop(step, {})})
    self.writer.progress(step, host["loss"], self.batch_size / max(step_time, 1e-9))


def every(step: int, period: int) -> bool:
  """True every `period` steps; a period of 0 turns the event off (it still happens at the last step)."""
  return period > 0 and step % period == 0


def truncate_after(path: str, step: int) -> None:
  """Drops lines of steps > `step` (logged by a run that died after its last checkpoint), so a resumed run's
  metrics.jsonl holds one trajectory (a torn last line from a killed process goes too)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [json.dumps(r) + "\n" for r in files.iter_jsonl(path) if r.get("step", step + 1) <= step]
  if keep != lines:
    files.atomic_write(path, "".join(keep))


def last_logged_loss(path: str) -> float:
  """The train loss of the last metrics.jsonl line (nan when there is none)."""
  lines = files.read_jsonl(path)
  return float(lines[-1]["loss"]) if lines else float("nan")


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item() if np.ndim(v) == 0 else v.tolist()
  return v
