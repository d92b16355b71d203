"""Optimiser: optax AdamW with warmup + cosine/constant/WSD, global-norm clipping, a weight-decay mask, EMA.

Reference (glp_reference.md §3): AdamW(lr 5e-5, betas 0.9/0.999, eps 1e-8, wd 0.01), clip 1.0, a linear
warmup over 1% of the steps from 0.01*lr to lr, then cosine to 0.1*lr (not to 0). Parameters and optimizer
state stay float32; the bf16 compute option lives in the model (`compute_dtype`), so the master copy here is
always f32.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from glp_jax.util.errors import ConfigError

SCHEDULES = ("cosine", "constant", "wsd")
WARMUP_START = 0.01  # warmup starts at 1% of the peak rate (reference)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
  return int(warmup_ratio * total_steps)


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
  """The learning rate of each update `count` (0 .. total_steps - 1): linear warmup from WARMUP_START * lr, then
  cosine: towards final_lr_factor * lr, reached at count = total_steps (the reference's LambdaLR, stepped after
  each update, never applies that last value either); constant: lr; wsd: lr, then a linear decay over the last
  decay_ratio of the updates whose last update runs at final_lr_factor * lr (a cooldown that ends annealed)."""
  if opt_cfg.schedule not in SCHEDULES:
    raise ConfigError(f"config.opt.schedule must be one of {SCHEDULES}, got {opt_cfg.schedule!r}")
  lr, final = float(opt_cfg.lr), float(opt_cfg.final_lr_factor) * float(opt_cfg.lr)
  n_warm = warmup_steps(total_steps, opt_cfg.warmup_ratio)
  if opt_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(WARMUP_START * lr, lr, n_warm, max(total_steps, n_warm + 1), final)
  warm = optax.linear_schedule(WARMUP_START * lr, lr, n_warm)
  if opt_cfg.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(lr)], [n_warm])
  n_decay = max(int(opt_cfg.get("decay_ratio", 0.2) * total_steps), 1)
  # The decay's count 0 is the last stable update, so its n_decay updates end at `final` on the run's last one.
  return optax.join_schedules([warm, optax.constant_schedule(lr), optax.linear_schedule(lr, final, n_decay)],
                              [n_warm, total_steps - n_decay - 1])


def decay_mask(params: Any) -> Any:
  """True for weight matrices only: biases and LayerNorm scales/offsets (all 1-D) get no weight decay."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_tx(opt_cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """Clip (global norm) -> AdamW with the schedule and the decay mask."""
  if opt_cfg.lr <= 0:
    raise ConfigError(f"config.opt.lr must be positive, got {opt_cfg.lr}")
  mu_dtype = opt_cfg.get("mu_dtype", "float32")   # bfloat16 halves the first moment's traffic: off by default
  adamw = optax.adamw(make_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                      weight_decay=opt_cfg.weight_decay, mask=decay_mask, mu_dtype=jnp.dtype(mu_dtype))
  if opt_cfg.clip_norm and opt_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), adamw)
  return adamw


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params (optax's incremental update, in the EMA's float32)."""
  params = jax.tree.map(lambda e, p: p.astype(e.dtype), ema, params)
  return optax.incremental_update(params, ema, 1.0 - decay)
