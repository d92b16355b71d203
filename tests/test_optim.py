"""Schedules against an independent NumPy implementation, the weight-decay mask, clipping and EMA."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from glp_jax.core import model as model_lib
from glp_jax.training import optim
from glp_jax.util.config import ConfigError


def opt_cfg(**kw):
  base = dict(lr=1e-3, schedule="cosine", warmup_ratio=0.1, final_lr_factor=0.1, decay_ratio=0.2, b1=0.9,
              b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0, ema_decay=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def numpy_cosine(step, total, warm_ratio, final):
  """The reference's LambdaLR multiplier, written independently (its warmup is not rounded to whole steps)."""
  warm = warm_ratio * total
  if step < warm:
    return 0.01 + 0.99 * step / warm
  p = min(max((step - warm) / (total - warm), 0.0), 1.0)
  return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))


def factor(schedule, step, total, **kw):
  """The schedule's learning rate as a multiple of the peak (lr = 1)."""
  return float(optim.make_schedule(opt_cfg(lr=1.0, schedule=schedule, **kw), total)(step))


def test_cosine_matches_reference_formula():
  total = 1000
  schedule = optim.make_schedule(opt_cfg(lr=1.0, warmup_ratio=0.01, final_lr_factor=0.1), total)
  steps = np.arange(0, total + 1, 7)
  got = np.asarray(jax.vmap(schedule)(steps))
  want = np.array([numpy_cosine(int(s), total, 0.01, 0.1) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(schedule(0)) == pytest.approx(0.01)
  assert float(schedule(10)) == pytest.approx(1.0)     # end of warmup: the peak
  assert float(schedule(total)) == pytest.approx(0.1)  # not to zero


def test_constant_and_wsd():
  kw = dict(warmup_ratio=0.1, final_lr_factor=0.1, decay_ratio=0.2)
  assert factor("constant", 5, 100, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
  assert factor("constant", 60, 100, **kw) == 1.0
  assert factor("wsd", 79, 100, **kw) == 1.0   # stable until the last 20% of the updates (80 .. 99)
  assert factor("wsd", 80, 100, **kw) == pytest.approx(1 - 0.9 / 20)
  assert factor("wsd", 90, 100, **kw) == pytest.approx(1 - 0.9 * 11 / 20)
  assert factor("wsd", 99, 100, **kw) == pytest.approx(0.1)   # the last update runs annealed
  assert factor("wsd", 4, 5, **kw) == pytest.approx(0.1)      # also when the decay is a single update
  assert factor("cosine", 0, 100, warmup_ratio=0.0) == 1.0   # no warmup: the peak at once
  with pytest.raises(ConfigError, match="schedule"):
    optim.make_schedule(opt_cfg(schedule="linear"), 10)
  # A mistyped first-moment dtype is a one-line config error, not a TypeError traceback from jnp.dtype.
  for bad in ("bogus", "int8"):
    with pytest.raises(ConfigError, match=f"config.opt.mu_dtype must be a float dtype.*'{bad}'"):
      optim.make_tx(opt_cfg(mu_dtype=bad), 10)
  optim.make_tx(opt_cfg(mu_dtype="bfloat16"), 10)


def test_a_warmup_shorter_than_one_step_still_starts_low():
  """The warmup was rounded down to whole steps: runs under 100 steps had none (the first update at the full
  rate); the reference's LambdaLR takes warmup_ratio * total as it is."""
  for total in (40, 80, 160, 1234):
    got = [factor("cosine", k, total, warmup_ratio=0.01) for k in range(total)]
    np.testing.assert_allclose(got, [numpy_cosine(k, total, 0.01, 0.1) for k in range(total)], rtol=1e-5)
    assert got[0] == pytest.approx(0.01)
  assert factor("cosine", 1, 160, warmup_ratio=0.01) == pytest.approx(0.01 + 0.99 / 1.6, rel=1e-5)
  assert factor("constant", 0, 40, warmup_ratio=0.01) == pytest.approx(0.01)
  with pytest.raises(ConfigError, match="overlap"):
    optim.make_schedule(opt_cfg(schedule="wsd", warmup_ratio=0.5, decay_ratio=0.6), 100)


def test_weight_decay_decays_every_parameter_as_the_reference_or_skips_biases_and_layernorm():
  model = model_lib.Denoiser(model_lib.ModelConfig(d_input=8, d_model=16, d_mlp=32, n_layers=1), rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): (m, v) for (p, m), v in
          zip(jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree.leaves(params))}
  assert all(m == (k.endswith("['kernel']")) for k, (m, _) in flat.items())
  # With zero gradients Adam's update is 0, so only decoupled decay moves the parameters: p <- p (1 - lr wd).
  for decay_all in (True, False):
    cfg = opt_cfg(schedule="constant", warmup_ratio=0.0, weight_decay=0.5, clip_norm=0.0, decay_all_params=decay_all)
    tx = optim.make_tx(cfg, 10)
    # One jitted program: op by op, each of the ~30 leaves' updates compiled its own small programs (~8 s).
    new = jax.jit(lambda p: optax.apply_updates(p, tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]))(
        params)
    for (path, p), q in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new)):
      decayed = decay_all or jax.tree_util.keystr(path).endswith("['kernel']")
      np.testing.assert_allclose(np.asarray(q), np.asarray(p) * (1 - 1e-3 * 0.5 if decayed else 1.0), rtol=1e-6,
                                 err_msg=str(path))


def test_global_norm_clipping_golden():
  # eps = 1 makes Adam's first step depend on the gradient's size, so clipping is visible:
  # update = -lr * g_c / (|g_c| + 1) elementwise, with g_c = g * clip / ||g|| when ||g|| > clip.
  params = {"w": jnp.zeros((3, 2))}
  g = {"w": jnp.arange(6.0).reshape(3, 2) * 10.0}
  norm = float(np.linalg.norm(np.arange(6.0) * 10.0))
  for clip in (1.0, 0.0):
    cfg = opt_cfg(schedule="constant", warmup_ratio=0.0, eps=1.0, weight_decay=0.0, clip_norm=clip)
    tx = optim.make_tx(cfg, 10)
    upd, _ = tx.update(g, tx.init(params), params)
    gc = np.arange(6.0).reshape(3, 2) * 10.0 * (clip / norm if clip else 1.0)
    np.testing.assert_allclose(np.asarray(upd["w"]), -1e-3 * gc / (np.abs(gc) + 1.0), rtol=1e-5)


def test_ema_update():
  ema = {"a": jnp.array([1.0, 2.0])}
  new = optim.ema_update(ema, {"a": jnp.array([3.0, 6.0])}, 0.9)
  np.testing.assert_allclose(np.asarray(new["a"]), [1.2, 2.4], rtol=1e-6)
