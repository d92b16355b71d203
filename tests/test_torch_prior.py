"""The PyTorch prior (`glp_jax.torch`) against the JAX model and sampler, and on its own without JAX."""
import json
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from glp_jax.core import model as model_lib  # noqa: E402
from glp_jax.core import sampling as jax_sampling  # noqa: E402
from glp_jax.core import grid
from glp_jax import torch as glp_torch  # noqa: E402
from glp_jax.torch import io as torch_io  # noqa: E402

pytestmark = pytest.mark.torch
D, M, F, L, K = 24, 48, 96, 2, 5   # tiny sizes; K LM layers for the multi-layer prior


def jax_model(multi: int = 0, seed: int = 0) -> model_lib.Denoiser:
  """A JAX denoiser with random weights, biases and LayerNorm parameters (not their init values)."""
  cfg = model_lib.ModelConfig(d_input=D, d_model=M, d_mlp=F, n_layers=L, multi_layer_n_layers=multi)
  model = model_lib.Denoiser(cfg, rngs=nnx.Rngs(params=seed))
  flat = model_lib.to_reference_state_dict(model)
  rng = np.random.default_rng(seed + 100)
  for k, v in flat.items():
    if ".ln." in k or k.startswith("model.ln."):
      flat[k] = (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
  model_lib.load_reference_state_dict(model, flat)
  return model


def stats(multi: int = 0, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  shape = (multi, D) if multi else (D,)
  return (rng.standard_normal(shape) * 2).astype(np.float32), rng.uniform(0.3, 4.0, shape).astype(np.float32)


def export(model, path, multi=0, dtype="float32"):
  mean, var = stats(multi)
  cfg = glp_torch.DenoiserConfig(D, M, F, L, multi or None)
  torch_io.write_folder(str(path), model_lib.to_reference_state_dict(model), cfg, mean, var, dtype=dtype)
  return glp_torch.GLP.from_pretrained(path), mean, var


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(np.asarray(b, np.float64))))


@pytest.mark.parametrize("multi", [0, K])
def test_velocity_parity_f32(tmp_path, multi):
  model = jax_model(multi)
  glp, _, _ = export(model, tmp_path, multi)
  rng = np.random.default_rng(2)
  z = rng.standard_normal((64, D)).astype(np.float32)
  t = rng.uniform(0, 1000, 64).astype(np.float32)
  layer = rng.integers(0, K, 64).astype(np.int32) if multi else None
  v_jax = np.asarray(model(jnp.asarray(z), jnp.asarray(t), None if layer is None else jnp.asarray(layer)))
  v_torch = glp(torch.from_numpy(z), torch.from_numpy(t),
                None if layer is None else torch.from_numpy(layer)).detach().numpy()
  assert v_torch.dtype == np.float32
  assert rel_err(v_torch, v_jax) < 1e-5
  np.testing.assert_allclose(v_torch, v_jax, rtol=1e-5, atol=1e-5 * np.abs(v_jax).max())
  if multi:  # the layer index really conditions the output
    other = glp(torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy((layer + 1) % K)).detach().numpy()
    assert rel_err(other, v_jax) > 1e-3


def test_exported_weights_are_as_readable_as_the_rest_of_the_folder(tmp_path):
  """safetensors writes owner-only files: on a shared cluster others could read config.json but not the
  weights."""
  export(jax_model(0), tmp_path)
  mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)
  assert mode(torch_io.MODEL_FILE) == mode("final.safetensors") == mode(torch_io.CONFIG_FILE)


class Killed(BaseException):
  """Stands in for a SIGKILL: no `except Exception` in the writer catches it."""


def test_a_reexport_killed_half_way_never_loads_as_a_mix_of_two_priors(tmp_path, monkeypatch):
  """Killed before each file operation of a re-export into a folder holding another prior (same architecture),
  each layout loads as the old prior, the new one, or not at all: never new weights under the old config.json
  (statistics, provenance), nor the old final.safetensors under the new config.yaml and rep_statistics.pt."""
  cfg = glp_torch.DenoiserConfig(D, M, F, L)
  old = (model_lib.to_reference_state_dict(jax_model(seed=0)), *stats(seed=1))
  new = (model_lib.to_reference_state_dict(jax_model(seed=1)), *stats(seed=2))

  def which(folder) -> str:
    try:
      got = torch_io.read_folder(str(folder))
    except (FileNotFoundError, KeyError):
      return "none"
    for name, (sd, mean, var) in (("old", old), ("new", new)):
      w = np.array_equal(got["state_dict"]["model.in_proj.weight"].numpy(), sd["model.in_proj.weight"])
      m = np.array_equal(got["mean"].numpy(), mean) and np.array_equal(got["var"].numpy(), var)
      if w and m:
        return name
    return "mixed"

  real = {name: getattr(os, name) for name in ("replace", "link", "remove")}
  for kill_at in range(1, 20):
    out = tmp_path / f"k{kill_at}"
    torch_io.write_folder(str(out), old[0], cfg, old[1], old[2])
    calls = []

    def op(name):
      def run(*args, **kw):
        calls.append(name)
        if len(calls) == kill_at:
          raise Killed()
        return real[name](*args, **kw)
      return run
    for name in real:
      monkeypatch.setattr(os, name, op(name))
    try:
      torch_io.write_folder(str(out), new[0], cfg, new[1], new[2])
      done = True
    except Killed:
      done = False
    finally:
      for name, fn in real.items():
        monkeypatch.setattr(os, name, fn)
    ref = tmp_path / f"ref{kill_at}"   # the reference layout on its own (what load_glp reads)
    ref.mkdir()
    for name in ("config.yaml", "rep_statistics.pt", "final.safetensors"):
      if os.path.exists(out / name):
        os.link(out / name, ref / name)
    assert which(out) in ("old", "new", "none") and which(ref) in ("old", "new", "none"), (kill_at, calls)
    if done:
      assert which(out) == which(ref) == "new"
      break
  else:
    raise AssertionError("the re-export never finished")


def test_a_timestep_per_sample_conditions_every_position_of_that_sample(tmp_path):
  """Latents (b, s, D) with timesteps and layers (b,): one per sample (the reference's `u`), also when b == s,
  where trailing-axis broadcasting would read them per position instead."""
  glp, _, _ = export(jax_model(K), tmp_path, K)
  rng = np.random.default_rng(3)
  for b, s in ((3, 3), (3, 4)):
    z = torch.from_numpy(rng.standard_normal((b, s, D)).astype(np.float32))
    t, layer = torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 2, 4])
    v = glp(z, t, layer).detach()
    for i in range(b):
      torch.testing.assert_close(v[i], glp(z[i], t[i], layer[i]).detach(), rtol=1e-5, atol=1e-5)


def test_save_pretrained_keeps_the_weights_dtype_unless_told(tmp_path):
  """A bf16 folder loaded and saved again stays bf16 (it was widened to float32 by default); dtype= overrides."""
  glp, _, _ = export(jax_model(), tmp_path / "bf16", dtype="bfloat16")
  glp.save_pretrained(tmp_path / "again")
  again = glp_torch.GLP.from_pretrained(tmp_path / "again")
  assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "bfloat16"
  assert again.denoiser.model.in_proj.weight.dtype == torch.bfloat16
  for k, v in glp.denoiser.state_dict().items():
    torch.testing.assert_close(again.denoiser.state_dict()[k], v, rtol=0, atol=0)
  glp.save_pretrained(tmp_path / "wide", dtype="float32")
  assert glp_torch.GLP.from_pretrained(tmp_path / "wide").denoiser.model.in_proj.weight.dtype == torch.float32


def test_velocity_parity_bf16(tmp_path):
  model = jax_model()
  glp, _, _ = export(model, tmp_path, dtype="bfloat16")
  assert glp.denoiser.model.in_proj.weight.dtype == torch.bfloat16
  rng = np.random.default_rng(3)
  z = rng.standard_normal((64, D)).astype(np.float32)
  t = rng.uniform(0, 1000, 64).astype(np.float32)
  v_jax = np.asarray(model(jnp.asarray(z), jnp.asarray(t)))
  v_torch = glp(torch.from_numpy(z), torch.from_numpy(t)).detach().numpy()
  assert v_torch.dtype == np.float32  # the output keeps the input dtype
  err = np.linalg.norm(v_torch - v_jax) / np.linalg.norm(v_jax)
  assert 1e-5 < err < 3e-2, err  # really bf16 (not silently f32), and within bf16 rounding


def test_sampling_grids_identical():
  for n in (1, 2, 7, 20, 100, 1000):
    sig_t, ts_t = glp_torch.euler_grid(n)
    sig_j = grid.euler_grid(n)
    np.testing.assert_array_equal(sig_t.numpy(), sig_j)
    np.testing.assert_array_equal(ts_t.numpy(), np.asarray(jax_sampling.flow.timesteps_of(sig_j[:-1])))
  sig, ts = glp_torch.euler_grid(20)
  # Golden values read from diffusers 0.42.1 FlowMatchEulerDiscreteScheduler().set_timesteps(20).sigmas.
  assert sig[[0, 1, 10, 19, 20]].tolist() == [1.0, 0.9474210739135742, 0.4742105305194855,
                                              0.0010000000474974513, 0.0]
  assert sig.dtype == ts.dtype == torch.float32 and ts[10].item() == np.float32(sig[10].item() * np.float32(1000))
  for start, n in ((0.5, 20), (0.9, 20), (0.0, 20), (0.25, 100), (0.5, 1000), (0.29, 100)):
    assert glp_torch.start_index(start, n) == grid.manifold_start_index(start, n)
  # The reference draws u as a float32 tensor: index = floor(float32(u) * N).
  assert glp_torch.start_index(0.29, 100) == 29 and glp_torch.start_index(0.5, 20) == 10


@pytest.mark.parametrize("multi", [0, K])
def test_samples_agree_with_jax(tmp_path, multi):
  model = jax_model(multi)
  glp, mean, var = export(model, tmp_path, multi)
  key = jax.random.key(7)
  noise = np.array(jax.random.normal(key, (32, D), jnp.float32))
  layer = (np.arange(32) % K).astype(np.int32) if multi else None
  jl = None if layer is None else jnp.asarray(layer)
  tl = None if layer is None else torch.from_numpy(layer)
  z_jax = np.asarray(jax_sampling.sample(model, jnp.asarray(noise), 20, jl))
  z_torch = glp.sample(torch.from_numpy(noise), 20, tl).numpy()
  assert rel_err(z_torch, z_jax) < 1e-4
  # On-manifold projection from raw activations: same noise draw, normalise/denormalise on each side.
  m_rows = mean[layer] if multi else mean
  s_rows = np.sqrt(var[layer] if multi else var)
  x_raw = (np.random.default_rng(4).standard_normal((32, D)) * s_rows + m_rows).astype(np.float32)
  out_jax = np.asarray(jax_sampling.sample_on_manifold(model, jnp.asarray((x_raw - m_rows) / s_rows), key, 0.5, 20,
                                                       jl)) * s_rows + m_rows
  out_torch = glp.sample_on_manifold(torch.from_numpy(x_raw), 0.5, 20, layer_idx=tl,
                                     noise=torch.from_numpy(noise)).numpy()
  assert rel_err(out_torch, out_jax) < 1e-4


def test_jax_torch_jax_lossless(tmp_path):
  model = jax_model(K)
  glp, _, _ = export(model, tmp_path, K)
  sd = {k: v.numpy() for k, v in glp.denoiser.state_dict().items()}
  back = model_lib.Denoiser(model.cfg, rngs=nnx.Rngs(params=99))
  model_lib.load_reference_state_dict(back, sd)
  a, b = model_lib.to_reference_state_dict(model), model_lib.to_reference_state_dict(back)
  assert a.keys() == b.keys() and len(a) == len(glp_torch.expected_shapes(glp.cfg))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The statistics round-trip exactly through config.json and rep_statistics.pt.
  mean, var = stats(K)
  got = torch_io.read_folder(str(tmp_path))
  np.testing.assert_array_equal(got["mean"].numpy(), mean)
  np.testing.assert_array_equal(torch.load(tmp_path / "rep_statistics.pt")["var"].numpy(), var)


def test_normalizer_against_numpy():
  mean, var = stats(K)
  norm = glp_torch.Normalizer(torch.from_numpy(mean), torch.from_numpy(var))
  x = np.random.default_rng(5).standard_normal((3, 4, D)).astype(np.float32)
  layer = np.random.default_rng(6).integers(0, K, (3, 4))
  want = (x - mean[layer]) / np.sqrt(var[layer])
  got = norm.normalize(torch.from_numpy(x), torch.from_numpy(layer)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(norm.denormalize(torch.from_numpy(got), torch.from_numpy(layer)).numpy(), x,
                             rtol=1e-5, atol=1e-5)
  # Stacked rows of non-contiguous LM layers (7, 2) are looked up by LM layer number.
  sub = glp_torch.Normalizer(torch.from_numpy(mean[:2]), torch.from_numpy(var[:2]), layers=[7, 2])
  np.testing.assert_allclose(sub.normalize(torch.from_numpy(x[0]), 2).numpy(), (x[0] - mean[1]) / np.sqrt(var[1]),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="layer_idx"):
    sub.normalize(torch.from_numpy(x[0]), 3)


def test_normalizer_stats_stay_float32_under_dtype_casts(tmp_path):
  mean, var = stats()
  # Statistics given as tensors that .numpy() refuses (requiring grad here; on a GPU, a CUDA tensor).
  norm = glp_torch.Normalizer(torch.from_numpy(mean).requires_grad_(), torch.from_numpy(var).requires_grad_())
  x = torch.from_numpy(mean) + torch.randn(3, D)
  want = norm.normalize(x)
  for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
    cast(norm)
    assert norm.mean.dtype == norm.var.dtype == torch.float32
    np.testing.assert_array_equal(norm.mean.numpy(), mean)
    assert torch.equal(norm.normalize(x), want)
  # Device moves still apply (the meta device stands in for a GPU), with a dtype cast in the same call.
  moved = glp_torch.Normalizer(torch.from_numpy(mean), torch.from_numpy(var)).to("meta", torch.bfloat16)
  assert moved.mean.device.type == "meta" and moved.mean.dtype == torch.float32
  # Inside a GLP: its denoiser takes the dtype, its statistics do not.
  glp = export(jax_model(), tmp_path)[0].to(torch.bfloat16)
  assert glp.denoiser.model.in_proj.weight.dtype == torch.bfloat16
  assert glp.normalizer.mean.dtype == glp.normalizer.var.dtype == torch.float32
  np.testing.assert_array_equal(glp.normalizer.var.numpy(), var)


def test_stacked_stats_of_some_lm_layers_spread_for_the_reference(tmp_path):
  """Stats for LM layers (1, 3) of a 5-layer prior: config.json keeps the stack, rep_statistics.pt is indexed
  by LM layer (identity rows elsewhere), and both layouts normalise alike."""
  model = jax_model(K)
  mean, var = stats(2)
  cfg = glp_torch.DenoiserConfig(D, M, F, L, K)
  torch_io.write_folder(str(tmp_path), model_lib.to_reference_state_dict(model), cfg, mean, var, layers=[1, 3])
  ref = torch.load(tmp_path / "rep_statistics.pt")
  assert ref["mean"].shape == (K, D)
  np.testing.assert_array_equal(ref["mean"][[1, 3]].numpy(), mean)
  np.testing.assert_array_equal(ref["var"][[0, 2, 4]].numpy(), np.ones((3, D), np.float32))
  ours = glp_torch.GLP.from_pretrained(tmp_path)
  assert ours.normalizer.layers == [1, 3]
  # Layers beyond multi_layer_n_layers are refused before the folder is touched: it still holds its prior.
  other = model_lib.to_reference_state_dict(jax_model(K, seed=1))
  with pytest.raises(ValueError, match="exceed multi_layer_n_layers"):
    torch_io.write_folder(str(tmp_path), other, cfg, mean, var, layers=[1, K])
  assert torch.equal(glp_torch.GLP.from_pretrained(tmp_path).denoiser.model.in_proj.weight,
                     ours.denoiser.model.in_proj.weight)
  for name in ("config.json", "model.safetensors"):
    os.remove(tmp_path / name)
  theirs = glp_torch.GLP.from_pretrained(tmp_path)
  x, layer = torch.randn(4, D), torch.tensor([1, 3, 3, 1])
  assert torch.equal(ours.normalize(x, layer), theirs.normalize(x, layer))


def test_sample_on_manifold_shapes_dtypes_seeds(tmp_path):
  glp, mean, _ = export(jax_model(), tmp_path)
  x = torch.from_numpy(np.tile(mean, (2, 3, 1))).to(torch.bfloat16)
  out1 = glp.sample_on_manifold(x, generator=torch.Generator().manual_seed(0))
  out2 = glp.sample_on_manifold(x, generator=torch.Generator().manual_seed(0))
  out3 = glp.sample_on_manifold(x, generator=torch.Generator().manual_seed(1))
  assert out1.shape == x.shape and out1.dtype == torch.bfloat16
  assert torch.equal(out1, out2) and not torch.equal(out1, out3)
  # Each position is independent: a row's output does not depend on the other rows in the batch.
  noise = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(3))
  full = glp.sample_on_manifold(x.float(), noise=noise)
  one = glp.sample_on_manifold(x.float()[1, 2], noise=noise[1, 2])
  torch.testing.assert_close(full[1, 2], one, rtol=1e-5, atol=1e-5)
  # generate(): raw-space samples from seeded noise.
  g = glp.generate(5, num_steps=4, generator=torch.Generator().manual_seed(0))
  assert g.shape == (5, D) and torch.isfinite(g).all()


def test_bad_input_names_the_key(tmp_path):
  model = jax_model()
  good = tmp_path / "good"
  export(model, good)
  cfg = glp_torch.DenoiserConfig(D, M, F, L)
  sd = model_lib.to_reference_state_dict(model)
  mean, var = stats()
  with pytest.raises(KeyError, match=r"model\.layers\.1\.gate_proj\.bias"):
    torch_io.check_state_dict({k: v for k, v in sd.items() if k != "model.layers.1.gate_proj.bias"}, cfg, "x")
  with pytest.raises(ValueError, match=r"model\.out_proj\.weight"):
    torch_io.check_state_dict({**sd, "model.out_proj.weight": sd["model.out_proj.weight"][:, :-1]}, cfg, "x")
  with pytest.raises(KeyError, match=r"model\.layer_embed\.0\.weight"):
    torch_io.check_state_dict({**sd, "model.layer_embed.0.weight": np.zeros((M, M))}, cfg, "x")
  # A config that disagrees with the weights: the first mismatching key is named.
  conf = json.loads((good / "config.json").read_text())
  conf["architecture"]["d_mlp"] = F + 1
  (good / "config.json").write_text(json.dumps(conf))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.up_proj\.weight"):
    glp_torch.GLP.from_pretrained(good)
  del conf["architecture"]["n_layers"]
  (good / "config.json").write_text(json.dumps(conf))
  with pytest.raises(ValueError, match="n_layers"):
    glp_torch.GLP.from_pretrained(good)
  with pytest.raises(ValueError, match="'mean'"):
    torch_io.write_folder(str(tmp_path / "bad"), sd, cfg, mean[:-1], var[:-1])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.yaml"):
    glp_torch.GLP.from_pretrained(tmp_path / "empty")


_NO_JAX = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "tensorstore"):
      raise ImportError("blocked in this test: " + name)
sys.meta_path.insert(0, Block())
"""


def test_torch_module_works_without_jax(tmp_path):
  model = jax_model(K)
  export(model, tmp_path / "prior", K)
  script = _NO_JAX + textwrap.dedent(f"""
    try:
      import jax
      raise SystemExit("jax import was not blocked")
    except ImportError:
      pass
    import torch
    from glp_jax.torch import GLP
    glp = GLP.from_pretrained({str(tmp_path / 'prior')!r})
    h = torch.randn(2, 3, {D}, dtype=torch.bfloat16)
    out = glp.sample_on_manifold(h, layer_idx=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == h.shape and out.dtype == torch.bfloat16
    glp.save_pretrained({str(tmp_path / 'again')!r})
    assert GLP.from_pretrained({str(tmp_path / 'again')!r}).cfg == glp.cfg
    # steer() finds decoder layers through glp_jax.torch.lm, which must not need JAX either.
    from glp_jax.torch import steer
    toy = torch.nn.Module()
    toy.config = type("Cfg", (), {{"num_hidden_layers": 2}})()
    toy.model = torch.nn.Module()
    toy.model.layers = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    h = torch.randn(1, 4, {D})
    with steer(toy, 1, torch.ones({D}), 2.0, positions="last", prior=glp, layer_idx=3):
      out = toy.model.layers[1](h)
    assert torch.equal(out[:, :-1], h[:, :-1]) and not torch.equal(out[:, -1], h[:, -1])
    bad = [m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "orbax")
           or m in ("glp_jax.core.model", "glp_jax.core.sampling", "glp_jax.core.flow")]
    assert not bad, bad
    print("OK")
  """)
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
  assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]


def test_sample_on_manifold_inside_an_hf_forward_hook(tmp_path):
  """The steering building block: edit the last position of a layer's output in a bf16 HF model's hook."""
  transformers = pytest.importorskip("transformers")
  glp, _, _ = export(jax_model(), tmp_path)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
  lm = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
  seen = {}

  def hook(module, args, output):
    h = output[0] if isinstance(output, tuple) else output
    seen["before"] = h.clone()
    h = h.clone()
    h[:, -1] = glp.sample_on_manifold(h[:, -1], generator=torch.Generator().manual_seed(0))
    seen["after"] = h
    return (h, *output[1:]) if isinstance(output, tuple) else h

  ids = torch.randint(0, 64, (2, 5))
  handle = lm.model.layers[0].register_forward_hook(hook)
  try:
    with torch.no_grad():
      steered = lm(ids).logits
  finally:
    handle.remove()
  with torch.no_grad():
    plain = lm(ids).logits
  assert seen["after"].dtype == torch.bfloat16
  assert torch.equal(seen["after"][:, :-1], seen["before"][:, :-1])
  assert not torch.equal(seen["after"][:, -1], seen["before"][:, -1])
  # Causal LM: earlier positions are untouched, the last one changes.
  assert torch.equal(steered[:, :-1], plain[:, :-1]) and not torch.equal(steered[:, -1], plain[:, -1])
