"""Optimiser: optax AdamW with warmup + cosine/constant/WSD, global-norm clipping, an optional decay mask, EMA.

Reference (glp_reference.md §3): AdamW(lr 5e-5, betas 0.9/0.999, eps 1e-8, wd 0.01 on every parameter), clip
1.0, a linear warmup over 1% of the steps (not rounded to whole steps) from 0.01*lr to lr, then cosine to 0.1*lr
(not to 0). Parameters and optimizer
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


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
  """The learning rate of each update `count` (0 .. total_steps - 1): linear warmup from WARMUP_START * lr over
  warmup_ratio * total_steps updates (a fraction of one too, as the reference's LambdaLR: a 40-step run still
  starts at 0.01 * lr), then cosine: towards final_lr_factor * lr, reached at count = total_steps (the
  reference's LambdaLR, stepped after each update, never applies that last value either); constant: lr; wsd: lr,
  then a linear decay over the last decay_ratio of the updates whose last update runs at final_lr_factor * lr
  (a cooldown that ends annealed)."""
  if opt_cfg.schedule not in SCHEDULES:
    raise ConfigError(f"config.opt.schedule must be one of {SCHEDULES}, got {opt_cfg.schedule!r}")
  if not 0 <= opt_cfg.warmup_ratio <= 1:   # past 1 the rate never reaches its peak
    raise ConfigError(f"config.opt.warmup_ratio must be in [0, 1], got {opt_cfg.warmup_ratio}")
  lr, final = float(opt_cfg.lr), float(opt_cfg.final_lr_factor)
  n_warm = float(opt_cfg.warmup_ratio) * total_steps
  # The decay's count 0 is the last stable update, so its n_decay updates end at `final` on the run's last one.
  decay_ratio = float(opt_cfg.get("decay_ratio", 0.2))
  n_decay = max(int(decay_ratio * total_steps), 1)
  decay_start = total_steps - n_decay - 1
  if opt_cfg.schedule == "wsd" and opt_cfg.warmup_ratio + decay_ratio > 1:
    raise ConfigError(f"config.opt.warmup_ratio ({opt_cfg.warmup_ratio}) + decay_ratio ({decay_ratio}) exceed "
                      "1: the warmup and the decay would overlap")

  def schedule(count):
    k = jnp.asarray(count, jnp.float32)
    warm = WARMUP_START + (1.0 - WARMUP_START) * k / max(n_warm, 1e-9)
    if opt_cfg.schedule == "cosine":
      progress = jnp.clip((k - n_warm) / max(total_steps - n_warm, 1e-9), 0.0, 1.0)
      after = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif opt_cfg.schedule == "constant":
      after = jnp.ones_like(k)
    else:
      after = 1.0 - (1.0 - final) * jnp.clip((k - decay_start) / n_decay, 0.0, 1.0)
    return lr * jnp.where(k < n_warm, warm, after)
  return schedule


def decay_mask(params: Any) -> Any:
  """True for weight matrices only: biases and LayerNorm scales/offsets (all 1-D) get no weight decay (with
  opt.decay_all_params=False; the reference decays every parameter)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_tx(opt_cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """Clip (global norm) -> AdamW with the schedule, decaying every parameter (the reference's AdamW over
  model.parameters()) or, with opt.decay_all_params=False, weight matrices only."""
  if opt_cfg.lr <= 0:
    raise ConfigError(f"config.opt.lr must be positive, got {opt_cfg.lr}")
  mu_dtype = opt_cfg.get("mu_dtype", "float32")   # bfloat16 halves the first moment's traffic: off by default
  try:   # a typo was a TypeError traceback
    ok = jnp.issubdtype(jnp.dtype(mu_dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ConfigError(f"config.opt.mu_dtype must be a float dtype (float32, bfloat16), got {mu_dtype!r}")
  mask = None if opt_cfg.get("decay_all_params", False) else decay_mask
  adamw = optax.adamw(make_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                      weight_decay=opt_cfg.weight_decay, mask=mask, mu_dtype=jnp.dtype(mu_dtype))
  if opt_cfg.clip_norm and opt_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), adamw)
  return adamw


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params (optax's incremental update, in the EMA's float32)."""
  params = jax.tree.map(lambda e, p: p.astype(e.dtype), ema, params)
  return optax.incremental_update(params, ema, 1.0 - decay)
