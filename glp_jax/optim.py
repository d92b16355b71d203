"""Optimiser: optax AdamW with warmup + cosine/constant/WSD, global-norm clipping, a weight-decay mask, EMA.

Reference (glp_reference.md §3): AdamW(lr 5e-5, betas 0.9/0.999, eps 1e-8, wd 0.01), clip 1.0, a linear
warmup over 1% of the steps from 0.01*lr to lr, then cosine to 0.1*lr (not to 0). Parameters and optimizer
state stay float32; the bf16 compute option lives in the model (`compute_dtype`), so the master copy here is
always f32.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from glp_jax.config_lib import ConfigError

SCHEDULES = ("cosine", "constant", "wsd")
WARMUP_START = 0.01  # warmup starts at 1% of the peak rate (reference)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
  return int(warmup_ratio * total_steps)


def lr_factor(step: jax.Array | int, total_steps: int, *, schedule: str = "cosine", warmup_ratio: float = 0.01,
              final_lr_factor: float = 0.1, decay_ratio: float = 0.2) -> jax.Array:
  """Multiplier of the peak learning rate at `step` (a pure function; works on traced steps)."""
  if schedule not in SCHEDULES:
    raise ConfigError(f"config.opt.schedule must be one of {SCHEDULES}, got {schedule!r}")
  step = jnp.asarray(step, jnp.float32)
  n_warm = warmup_steps(total_steps, warmup_ratio)
  warm = WARMUP_START + (1.0 - WARMUP_START) * step / max(n_warm, 1)
  if schedule == "constant":
    after = jnp.ones_like(step)
  elif schedule == "cosine":
    progress = jnp.clip((step - n_warm) / max(total_steps - n_warm, 1), 0.0, 1.0)
    after = final_lr_factor + (1.0 - final_lr_factor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
  else:  # wsd: warmup, stable at the peak, then a linear decay over the last decay_ratio of the steps
    n_decay = max(int(decay_ratio * total_steps), 1)
    progress = jnp.clip((step - (total_steps - n_decay)) / n_decay, 0.0, 1.0)
    after = 1.0 - (1.0 - final_lr_factor) * progress
  return jnp.where(step < n_warm, warm, after)


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
  kw = dict(schedule=opt_cfg.schedule, warmup_ratio=opt_cfg.warmup_ratio,
            final_lr_factor=opt_cfg.final_lr_factor, decay_ratio=opt_cfg.get("decay_ratio", 0.2))
  lr_factor(0, max(total_steps, 1), **kw)  # validates the schedule name before any tracing
  return lambda step: opt_cfg.lr * lr_factor(step, total_steps, **kw)


def decay_mask(params: Any) -> Any:
  """True for weight matrices only: biases and LayerNorm scales/offsets (all 1-D) get no weight decay."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_tx(opt_cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """Clip (global norm) -> AdamW with the schedule and the decay mask."""
  if opt_cfg.lr <= 0:
    raise ConfigError(f"config.opt.lr must be positive, got {opt_cfg.lr}")
  adamw = optax.adamw(make_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                      weight_decay=opt_cfg.weight_decay, mask=decay_mask)
  if opt_cfg.clip_norm and opt_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), adamw)
  return adamw


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, in float32."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)
