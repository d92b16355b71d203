"""Denoiser: forward vs an independent NumPy implementation, key map, conditioning, bf16, presets, golden step."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from glp_jax.core import flow
from glp_jax.core import model as M
from glp_jax.util.config import ConfigError

CFG = M.ModelConfig(d_input=12, d_model=16, d_mlp=40, n_layers=3)
MULTI = M.ModelConfig(d_input=12, d_model=16, d_mlp=40, n_layers=2, multi_layer_n_layers=16)


# --- an independent NumPy (float64) reading of glp_reference.md §1, on the torch-layout state dict ---
def _np_lin(sd, key, x):
  return x @ sd[key + ".weight"].T.astype(np.float64) + sd[key + ".bias"]


def _np_ln(sd, key, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * sd[key + ".weight"] + sd[key + ".bias"]


def _np_silu(x):
  return x / (1.0 + np.exp(-x))


def _np_sinusoid(t, dim):
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  return np.concatenate([np.cos(args), np.sin(args)], -1)


def _np_denoiser(sd, cfg, z, t, layer=None):
  emb = _np_lin(sd, "model.time_embed.2", _np_silu(_np_lin(sd, "model.time_embed.0", _np_sinusoid(t, cfg.d_model))))
  if layer is not None:
    depth = np.asarray(layer, np.float64) / (cfg.multi_layer_n_layers - 1)
    e = _np_sinusoid(depth, cfg.d_model)
    emb = emb + _np_lin(sd, "model.layer_embed.2", _np_silu(_np_lin(sd, "model.layer_embed.0", e)))
  x = _np_lin(sd, "model.in_proj", np.asarray(z, np.float64))
  neurons = []
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    h = _np_ln(sd, p + "ln", x)
    act = _np_silu(_np_lin(sd, p + "gate_proj", h) * _np_lin(sd, p + "time_proj", emb)) * _np_lin(sd, p + "up_proj", h)
    neurons.append(act)
    x = x + _np_lin(sd, p + "down_proj", act)
  return _np_lin(sd, "model.out_proj", _np_ln(sd, "model.ln", x)), neurons


def _inputs(cfg, b=5, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  z = jax.random.normal(k1, (b, cfg.d_input))
  t = jnp.array([1.0, 250.0, 474.21054, 999.0, 1000.0][:b])
  return z, t


def _randomize_norms(model, seed=3):
  """LayerNorm params start at 1/0; perturb them so the test also covers their use."""
  rng = np.random.default_rng(seed)
  sd = M.to_reference_state_dict(model)
  for k in sd:
    if k.endswith("ln.weight") or k.endswith("ln.bias"):
      sd[k] = sd[k] + rng.normal(0, 0.3, sd[k].shape).astype(np.float32)
  M.load_reference_state_dict(model, sd)
  return sd


def test_forward_matches_numpy():
  model = M.Denoiser(CFG, rngs=nnx.Rngs(0))
  sd = _randomize_norms(model)
  z, t = _inputs(CFG)
  want, want_neurons = _np_denoiser(sd, CFG, np.asarray(z), np.asarray(t))
  np.testing.assert_allclose(np.asarray(model(z, t)), want, rtol=1e-4, atol=1e-5)
  for got, w in zip(model.meta_neurons(z, t), want_neurons, strict=True):
    assert got.shape == (5, CFG.d_mlp)
    np.testing.assert_allclose(np.asarray(got), w, rtol=1e-4, atol=1e-5)


def test_multi_layer_forward_matches_numpy_and_depends_on_layer():
  model = M.Denoiser(MULTI, rngs=nnx.Rngs(1))
  sd = M.to_reference_state_dict(model)
  assert "model.layer_embed.0.weight" in sd and sd["model.layer_embed.2.weight"].shape == (16, 16)
  z, t = _inputs(MULTI)
  layer = jnp.array([0, 3, 7, 12, 15])
  want, _ = _np_denoiser(sd, MULTI, np.asarray(z), np.asarray(t), np.asarray(layer))
  np.testing.assert_allclose(np.asarray(model(z, t, layer)), want, rtol=1e-4, atol=1e-5)
  # Same rows under every layer index: outputs differ between layers, and are equal for the same layer.
  zz, tt = jnp.repeat(z[:1], 16, 0), jnp.full((16,), 300.0)
  v = np.asarray(model(zz, tt, jnp.arange(16)))
  gaps = np.abs(v[1:] - v[:-1]).max(-1)
  assert (gaps > 1e-6).all(), gaps
  np.testing.assert_array_equal(np.asarray(model(zz, tt, jnp.full((16,), 7))), np.repeat(v[7:8], 16, 0))
  with pytest.raises(ValueError, match="layer_B"):
    model(z, t)
  with pytest.raises(ValueError, match="single-layer"):
    M.Denoiser(CFG, rngs=nnx.Rngs(0))(z, t, layer)


def test_timestep_conditioning_changes_output():
  model = M.Denoiser(CFG, rngs=nnx.Rngs(0))
  z = jnp.ones((2, CFG.d_input))
  v1, v2 = model(z, jnp.array([10.0, 900.0])), model(z, 500.0)
  assert np.abs(np.asarray(v1[0] - v1[1])).max() > 1e-4
  assert v2.shape == (2, CFG.d_input)  # scalar timestep broadcasts
  np.testing.assert_array_equal(model(z, jnp.array([[10.0], [900.0]])), v1)  # [B, 1] as the reference passes
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    model(z[None], 500.0)


def test_init_matches_torch_linear_default():
  cfg = M.ModelConfig(d_input=64, d_model=256, d_mlp=512, n_layers=1)
  sd = M.to_reference_state_dict(M.Denoiser(cfg, rngs=nnx.Rngs(0)))
  for key, fan_in in [("model.in_proj.weight", 64), ("model.layers.0.down_proj.weight", 512),
                      ("model.layers.0.down_proj.bias", 512), ("model.time_embed.0.weight", 256)]:
    w, bound = sd[key], 1 / np.sqrt(fan_in)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound, key
    assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound, key  # U(-b, b) has std b / sqrt(3)
  np.testing.assert_array_equal(sd["model.ln.weight"], np.ones(256, np.float32))


def test_reference_state_dict_keys_and_strict_load():
  model = M.Denoiser(CFG, rngs=nnx.Rngs(0))
  sd = M.to_reference_state_dict(model)
  block = {f"model.layers.{i}.{m}.{p}" for i in range(3)
           for m in ("up_proj", "gate_proj", "time_proj", "down_proj", "ln") for p in ("weight", "bias")}
  top = {f"model.{m}.{p}" for m in ("in_proj", "out_proj", "ln", "time_embed.0", "time_embed.2")
         for p in ("weight", "bias")}
  assert set(sd) == block | top
  assert sd["model.in_proj.weight"].shape == (16, 12) and sd["model.layers.1.down_proj.weight"].shape == (16, 40)
  assert all(v.dtype == np.float32 and v.flags.writeable and v.flags.c_contiguous for v in sd.values())
  other = M.Denoiser(CFG, rngs=nnx.Rngs(7))
  M.load_reference_state_dict(other, sd)
  z, t = _inputs(CFG)
  np.testing.assert_array_equal(np.asarray(other(z, t)), np.asarray(model(z, t)))
  bad = dict(sd)
  del bad["model.layers.2.ln.bias"]
  with pytest.raises(KeyError, match="model.layers.2.ln.bias"):
    M.load_reference_state_dict(other, bad)
  with pytest.raises(KeyError, match="model.layer_embed.0.weight"):
    M.load_reference_state_dict(other, dict(sd, **{"model.layer_embed.0.weight": np.zeros((16, 16))}))
  with pytest.raises(ValueError, match="model.out_proj.weight"):
    M.load_reference_state_dict(other, dict(sd, **{"model.out_proj.weight": np.zeros((16, 12))}))


def test_bf16_compute_close_to_f32():
  cfg16 = M.ModelConfig(d_input=64, d_model=128, d_mlp=256, n_layers=3, compute_dtype="bfloat16")
  cfg32 = M.ModelConfig(d_input=64, d_model=128, d_mlp=256, n_layers=3)
  m16, m32 = M.Denoiser(cfg16, rngs=nnx.Rngs(0)), M.Denoiser(cfg32, rngs=nnx.Rngs(0))
  assert all(v.dtype == jnp.float32 for _, v in nnx.state(m16, nnx.Param).flat_state())
  z = jax.random.normal(jax.random.key(0), (64, 64))
  t = jnp.linspace(1.0, 1000.0, 64)
  x = jax.random.normal(jax.random.key(1), (64, 64))

  @nnx.jit
  def run(m):
    return m(z, t), flow.loss(m, x, jax.random.key(2)), m.meta_neurons(z, t)[-1]

  (v16, l16, h16), (v32, l32, h32) = run(m16), run(m32)
  assert v16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(v16 - v32) / jnp.linalg.norm(v32))
  assert 1e-5 < rel < 2e-2, rel  # really computed in bf16, and close
  assert float(jnp.linalg.norm(h16 - h32) / jnp.linalg.norm(h32)) < 3e-2
  assert abs(float(l16) - float(l32)) < 1e-2 * float(l32)


def test_logical_axes_and_sharded_build_matches_unsharded():
  model = M.Denoiser(MULTI, rngs=nnx.Rngs(0))
  for path, var in nnx.state(model, nnx.Param).flat_state():
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var.ndim and set(axes) <= set(M.LOGICAL_AXES), (path, axes)
  assert model.layers[0].up_proj.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
  mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = [("embed", "fsdp"), ("mlp", "model"), ("input", None), ("cond", None), ("norm", None)]
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    sharded = M.Denoiser(MULTI, rngs=nnx.Rngs(0))
  k = sharded.layers[1].down_proj.kernel[...]
  assert k.sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")
  z, t = _inputs(MULTI)
  layer = jnp.array([0, 1, 2, 3, 4])
  with jax.set_mesh(mesh):
    got = np.asarray(sharded(z, t, layer))
  np.testing.assert_allclose(got, np.asarray(model(z, t, layer)), rtol=1e-5, atol=1e-6)


def _cfg_model(**kw):
  base = dict(preset="tiny", d_input=0, width_mult=2.0, mlp_mult=2.0, n_layers=3, multi_layer_n_layers=0,
              compute_dtype="float32")
  return ml_collections.ConfigDict(dict(base, **kw))


def test_model_config_presets_and_errors():
  assert M.model_config(_cfg_model(), 576) == M.ModelConfig(576, 288, 576, 2)
  assert M.model_config(_cfg_model(preset="custom", width_mult=1.0, mlp_mult=4.0, n_layers=5), 64) == \
      M.ModelConfig(64, 64, 256, 5)
  assert M.model_config(_cfg_model(preset="llama1b-d6")) == M.ModelConfig(2048, 4096, 8192, 6)
  assert M.model_config(_cfg_model(preset="llama1b-d12-multi"), 2048).multi_layer_n_layers == 16
  assert M.model_config(_cfg_model(preset="llama8b-d6", compute_dtype="bfloat16"), 4096) == \
      M.ModelConfig(4096, 8192, 16384, 6, 0, "bfloat16")
  with pytest.raises(ConfigError, match="config.model.preset='llama1b-d3'.*576"):
    M.model_config(_cfg_model(preset="llama1b-d3"), 576)
  with pytest.raises(ConfigError, match="config.model.d_input"):
    M.model_config(_cfg_model(d_input=64), 576)
  with pytest.raises(ConfigError, match="config.model.preset"):
    M.model_config(_cfg_model(preset="huge"), 576)
  with pytest.raises(ValueError, match="compute_dtype"):
    M.model_config(_cfg_model(compute_dtype="float16"), 576)


def test_golden_loss_and_grad_norm_after_one_adamw_step():
  """Fixed seeds on a tiny config: regressions in init, the objective or the step show up here."""
  model = M.Denoiser(CFG, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.01), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, CFG.d_input)) * 2.0 + 0.5

  @nnx.jit
  def step(model, opt, key):
    loss, grads = nnx.value_and_grad(lambda m: flow.loss(m, x, key))(model)
    opt.update(model, grads)
    return loss, optax.global_norm(grads)

  loss0, gnorm0 = step(model, opt, jax.random.key(2))
  loss1, gnorm1 = step(model, opt, jax.random.key(2))
  got = [float(loss0), float(gnorm0), float(loss1), float(gnorm1)]
  np.testing.assert_allclose(got, GOLDEN_STEP, rtol=2e-5)
  assert got[2] < got[0]  # the step lowered the loss on the same batch and noise


# loss, grad norm before the step; loss, grad norm after one AdamW(1e-3, wd 0.01) step (same batch, key).
GOLDEN_STEP = [5.3466386795043945, 1.3219871520996094, 5.318790912628174, 1.3001712560653687]


@pytest.mark.torch
def test_matches_exported_torch_module():
  """The same reference state dict gives the same velocities in glp_jax.torch's module (export parity)."""
  torch = pytest.importorskip("torch")
  tmodel = pytest.importorskip("glp_jax.torch.model")
  model = M.Denoiser(MULTI, rngs=nnx.Rngs(4))
  _randomize_norms(model)
  sd = M.to_reference_state_dict(model)
  tm = tmodel.Denoiser(tmodel.DenoiserConfig(12, 16, 40, 2, 16))  # keys carry the `model.` prefix
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  z, t = _inputs(MULTI)
  layer = np.array([0, 2, 5, 9, 15])
  with torch.no_grad():
    want = tm(torch.tensor(np.asarray(z)), torch.tensor(np.asarray(t)), torch.from_numpy(layer)).numpy()
  np.testing.assert_allclose(np.asarray(model(z, t, jnp.asarray(layer))), want, rtol=1e-5, atol=1e-6)


def test_train_config_presets_resolve():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "train.py")
  spec = importlib.util.spec_from_file_location("train_config", path)
  train_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(train_config)
  assert M.model_config(train_config.get_config("runlocal").model, 576) == M.ModelConfig(576, 288, 576, 2)
  d6 = M.model_config(train_config.get_config("model=llama1b-d6").model)
  assert (d6.d_input, d6.d_model, d6.d_mlp, d6.n_layers) == (2048, 4096, 8192, 6)
  assert M.model_config(train_config.get_config("model=small").model, 64) == M.ModelConfig(64, 64, 128, 3)
