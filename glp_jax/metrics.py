"""Run metrics: `<workdir>/metrics.jsonl` (process 0), TensorBoard events (when tensorboardX is installed),
a tqdm bar on interactive runs, and the deferred fetch that keeps the host from stalling the device.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import jax
import numpy as np

log = logging.getLogger("glp_jax")


class NonFiniteLoss(FloatingPointError):
  """The train loss became NaN/inf; nothing from that step on is checkpointed."""


def to_host(metrics: dict[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (blocks until they are computed)."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_finite(step: int, metrics: dict[str, float]) -> None:
  bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])]
  if bad:
    raise NonFiniteLoss(f"non-finite {', '.join(bad)} at step {step} ({metrics}): stopping without saving "
                        f"this or later state; lower config.opt.lr or check the store's statistics")


class Deferred:
  """Holds the device metrics of step s until step s+1 has been dispatched, then fetches them."""

  def __init__(self):
    self._pending: tuple[int, dict] | None = None

  def push(self, step: int, metrics: dict) -> tuple[int, dict[str, float]] | None:
    """Stores step's metrics; returns the previous step's (step, host metrics), fetched now."""
    previous, self._pending = self._pending, (step, metrics)
    return None if previous is None else (previous[0], to_host(previous[1]))

  def flush(self) -> tuple[int, dict[str, float]] | None:
    previous, self._pending = self._pending, None
    return None if previous is None else (previous[0], to_host(previous[1]))


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
    with open(self.path, "a") as f:
      f.write(json.dumps(line) + "\n")
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


def truncate_after(path: str, step: int) -> None:
  """Drops lines of steps > `step` (logged by a run that died after its last checkpoint), so a resumed run's
  metrics.jsonl holds one trajectory."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError):
      continue  # a torn last line from a killed process
  if keep != lines:
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item() if np.ndim(v) == 0 else v.tolist()
  return v
