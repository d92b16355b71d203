"""One view of a prior for every evaluation, whatever it was loaded from.

`Prior` works on numpy float32 activations in *raw* LM space (it normalises inside) and offers what the
evaluations need: Euler samples (`sample_raw`), the on-manifold projection (`project`, the reference's
"activation SDEdit": noise to the start sigma of an N-step Euler grid, denoise the rest), meta-neurons, and
the mean activation norm sqrt(sum(mean^2 + var)) used to scale steering.

Backends (each supplies `integrate(z_BxD, num_steps, first) -> z_BxD`, Euler over the reference grid from
index `first` to sigma 0, in normalised space):
  - `from_jax_model(model, mean, var)` / `load_prior(run_dir)`: glp_jax.core.sampling (jit + scan on device);
  - `from_torch_glp(glp)` / `load_prior(export_dir)`: glp_jax.torch's `GLP` (no JAX needed);
  - `gaussian_prior(...)`: the exact velocity of Gaussian data, numpy (tests and the normaliser-only
    baseline).
Grid (reference §2): `glp_jax.core.grid.euler_grid(N)`; the on-manifold start index is floor(u * N), u = `start`
(0.5). Normalisation is `glp_jax.core.normalizer.Normalizer`, the trainer's own (float32).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from glp_jax.core import grid
from glp_jax.core.normalizer import Normalizer
from glp_jax.data import layout
from glp_jax.util import files
from glp_jax.util.errors import ConfigError

# integrate(z_BxD normalised, num_steps, first_index) -> z_BxD at sigma 0.
IntegrateFn = Callable[[np.ndarray, int, int], Any]
# meta_neurons(z_BxD normalised, timestep_B) -> [B, n_blocks * F].
MetaFn = Callable[[np.ndarray, np.ndarray], Any]


@dataclasses.dataclass
class Prior:
  """A prior seen through numpy: raw-space float32 in, raw-space float32 out."""
  integrate: IntegrateFn
  mean_D: np.ndarray
  var_D: np.ndarray
  meta_neurons_fn: MetaFn | None = None
  info: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.mean_D = np.asarray(self.mean_D, np.float64)
    self.var_D = np.asarray(self.var_D, np.float64)
    if self.mean_D.ndim != 1 or self.mean_D.shape != self.var_D.shape:
      raise ValueError(f"need [D] mean and var (single-layer prior), got {self.mean_D.shape}, {self.var_D.shape}")
    self.normalizer = Normalizer(self.mean_D, self.var_D)

  @property
  def d(self) -> int:
    return int(self.mean_D.shape[0])

  @property
  def act_norm(self) -> float:
    """Mean activation norm estimated from the normaliser: sqrt(sum(mean^2 + var)) (reference §1)."""
    return float(np.sqrt(np.sum(self.mean_D ** 2 + self.var_D)))

  def normalize(self, x_BxD: np.ndarray) -> np.ndarray:
    return self.normalizer.normalize(np.asarray(x_BxD))

  def denormalize(self, z_BxD: np.ndarray) -> np.ndarray:
    return self.normalizer.denormalize(np.asarray(z_BxD))

  def sample_raw(self, n: int, steps: int = 1000, seed: int = 42, batch_size: int = 4096) -> np.ndarray:
    """`n` Euler samples from seeded N(0, I) noise, denormalised: [n, D] float32."""
    from tqdm.auto import tqdm
    from glp_jax.util import runtime
    noise = np.random.default_rng(seed).standard_normal((n, self.d), dtype=np.float32)
    starts = range(0, n, batch_size)   # minutes at the reference's 50k samples x 1000 steps: show progress
    bar = tqdm(starts, desc="sampling", unit="batch", leave=False, disable=not runtime.interactive() or len(starts) < 2)
    out = [np.asarray(self.integrate(noise[i:i + batch_size], steps, 0)) for i in bar]
    return self.denormalize(np.concatenate(out))

  def project(self, x_BxD: np.ndarray, start: float = 0.5, steps: int = 20, seed: int = 0,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """On-manifold projection of raw activations [B, D]: noise to grid[floor(start * steps)], Euler to 0. The
    noise comes from `rng` when given (repeated calls then draw fresh noise, as the reference's randn per call),
    else from `seed`."""
    first = grid.manifold_start_index(start, steps)
    sigma = grid.euler_grid(steps)[first]
    z = self.normalize(x_BxD)
    eps = (rng if rng is not None else np.random.default_rng(seed)).standard_normal(z.shape, dtype=np.float32)
    z = (np.float32(1.0) - sigma) * z + sigma * eps
    return self.denormalize(np.asarray(self.integrate(z, steps, first)))

  def meta_neurons(self, x_BxD: np.ndarray, sigma: float, seed: int = 42, batch_size: int = 1024) -> np.ndarray:
    """Down-proj inputs of every block, for raw activations noised to `sigma` with fixed noise: [B, L*F]."""
    if self.meta_neurons_fn is None:
      raise ValueError(f"this prior ({self.info.get('source', '?')}) exposes no meta-neurons")
    z = self.normalize(x_BxD)
    eps = np.random.default_rng(seed).standard_normal(z.shape, dtype=np.float32)
    z = np.float32(1.0 - sigma) * z + np.float32(sigma) * eps
    t = np.float32(sigma) * np.float32(1000.0)
    out = [np.asarray(self.meta_neurons_fn(z[i:i + batch_size], np.full((len(z[i:i + batch_size]),), t)))
           for i in range(0, len(z), batch_size)]
    return np.concatenate(out).astype(np.float32)


# --- the closed-form Gaussian prior -----------------------------------------------------------------------


def gaussian_velocity(data_mean_D: np.ndarray, data_var_D: np.ndarray) -> Callable:
  """The exact velocity E[eps - x | z_sigma] when normalised data is N(m, diag(s2)): v(z_BxD, sigma_B)."""
  m, s2 = np.asarray(data_mean_D, np.float64), np.asarray(data_var_D, np.float64)

  def velocity(z_BxD, sigma_B):
    z, sig = np.asarray(z_BxD, np.float64), np.asarray(sigma_B, np.float64)[:, None]
    var_z = (1 - sig) ** 2 * s2 + sig ** 2
    resid = z - (1 - sig) * m
    return (sig / var_z * resid - (m + (1 - sig) * s2 / var_z * resid)).astype(np.float32)
  return velocity


def numpy_integrate(velocity: Callable) -> IntegrateFn:
  """Euler on the reference grid driven by a numpy `velocity(z_BxD, sigma_B)`."""
  def integrate(z_BxD, num_steps, first):
    sig = grid.euler_grid(num_steps)[first:]
    z = np.asarray(z_BxD, np.float32)
    for s, s_next in zip(sig[:-1], sig[1:]):
      z = z + (s_next - s) * velocity(z, np.full((len(z),), s, np.float32))
    return z
  return integrate


def gaussian_prior(mean_D: np.ndarray, var_D: np.ndarray, data_mean_D: np.ndarray | None = None,
                   data_var_D: np.ndarray | None = None) -> Prior:
  """A prior whose normalised data is exactly N(data_mean, diag(data_var)) (default N(0, I)).

  With the defaults its samples are N(mean, diag(var)) in raw space up to the Euler discretisation error:
  the "normaliser-only" baseline, and an exactly known prior for tests.
  """
  d = len(mean_D)
  dm = np.zeros(d) if data_mean_D is None else data_mean_D
  dv = np.ones(d) if data_var_D is None else data_var_D
  return Prior(numpy_integrate(gaussian_velocity(dm, dv)), mean_D, var_D, info={"source": "gaussian"})


# --- JAX and torch backends ------------------------------------------------------------------------------


def _bucket(n: int) -> int:
  """Rows padded up to a power of two (>= 8) so jitted samplers compile once per bucket, not per batch."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


def _padded(fn: Callable, z_BxD: np.ndarray, *rest) -> np.ndarray:
  z = np.asarray(z_BxD, np.float32)
  n = len(z)
  zp = np.concatenate([z, np.zeros((_bucket(n) - n, z.shape[1]), np.float32)])
  rest = [np.concatenate([r, np.repeat(r[-1:], len(zp) - n, 0)]) for r in rest]
  return np.asarray(fn(zp, *rest))[:n]


def from_jax_model(model: Any, mean_D: np.ndarray, var_D: np.ndarray, info: dict | None = None,
                   layer: int | None = None) -> Prior:
  """A `glp_jax.core.model.Denoiser` with the [D] normaliser moments of the modelled layer.

  `layer` (the LM layer number) conditions a multi-layer prior; None for single-layer priors.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from glp_jax.core import sampling

  graphdef, state = nnx.split(model)

  def _layers(n):
    return None if layer is None else jnp.full((n,), layer, jnp.int32)

  @jax.jit
  def _meta(state, z_BxD, timestep_B):
    m = nnx.merge(graphdef, state)
    return jnp.concatenate(m.meta_neurons(z_BxD, timestep_B, _layers(z_BxD.shape[0])), axis=-1)

  def integrate(z_BxD, num_steps, first):
    sigmas = grid.euler_grid(num_steps)[first:]
    return _padded(lambda z: sampling.integrate(model, jnp.asarray(z), sigmas, _layers(len(z))), z_BxD)

  def meta(z_BxD, timestep_B):
    return _padded(lambda z, t: _meta(state, jnp.asarray(z), jnp.asarray(t)), z_BxD, np.asarray(timestep_B))

  return Prior(integrate, mean_D, var_D, meta_neurons_fn=meta, info=dict(info or {"source": "jax"}))


def from_torch_glp(glp: Any, info: dict | None = None, layer: int | None = None) -> Prior:
  """A `glp_jax.torch.GLP`: no JAX involved. `layer` (LM layer number) selects a multi-layer prior's layer."""
  import torch

  def integrate(z_BxD, num_steps, first):
    return glp.sample(torch.as_tensor(np.asarray(z_BxD)), num_steps, layer_idx=layer,
                      first_step=first).cpu().numpy()

  def meta(z_BxD, timestep_B):
    captured = []
    hooks = [blk.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].float()))
             for blk in glp.denoiser.model.layers]
    try:
      with torch.no_grad():
        glp(torch.as_tensor(np.asarray(z_BxD), device=glp.device), torch.as_tensor(timestep_B, device=glp.device),
            layer)
    finally:
      for h in hooks:
        h.remove()
    return torch.cat(captured, dim=-1).cpu().numpy()

  # The [D] moments of the chosen layer, read through the public normaliser API (works for stacked stats).
  d = glp.cfg.d_input
  with torch.no_grad():
    mean = glp.denormalize(torch.zeros(1, d, device=glp.device), layer)[0].double().cpu().numpy()
    var = (glp.denormalize(torch.ones(1, d, device=glp.device), layer)[0].double().cpu().numpy() - mean) ** 2
  return Prior(integrate, mean, var, meta_neurons_fn=meta, info=dict(info or {"source": "torch"}))


def _moments(normalizer: Any) -> tuple[np.ndarray, np.ndarray]:
  """(mean, var) from a glp_jax Normalizer or a mapping with mean/var."""
  get = (lambda k: normalizer[k]) if isinstance(normalizer, dict) else (lambda k: getattr(normalizer, k))
  return np.asarray(get("mean"), np.float64), np.asarray(get("var"), np.float64)


def lm_info_from_config(config: Any) -> dict:
  """{'store', 'lm', 'layer'} of the activations a run was trained on, read from its store manifest."""
  try:
    store, layer = config["data"]["store"], config["data"]["layer"]
  except (KeyError, TypeError):
    return {}
  info: dict = {"store": store}
  info.update(lm_info_from_store(store, layer))
  return info


def lm_info_from_store(store: str, layer: int | None = None) -> dict:
  """{'lm', 'layer', 'bos'} from a store's manifest (layer -1/None = the store's first layer; bos: see
  `leads_with_bos`); {} when absent."""
  man = files.read_json(os.path.join(store, "manifest.json")) if store else None
  if man is None:
    return {}
  layers = man.get("layers") or []
  meta = man.get("metadata") or {}
  out = {"lm": meta.get("model"), "bos": layout.leads_with_bos(meta)}
  out["layer"] = int(layer) if layer is not None and int(layer) >= 0 else (int(layers[0]) if layers else None)
  return out


def load_prior(path: str, step: int | None = None, layer: int | None = None, device: str = "auto") -> Prior:
  """Opens a glp_jax run dir (config.json + checkpoints/) or an exported / reference folder (torch module).

  `layer` (LM layer number) is needed for multi-layer priors only. `device` places a torch prior (auto: a GPU
  when one is visible); a run dir's JAX prior is on JAX's default device.
  """
  if is_run_dir(path):
    from glp_jax.training.prior import checkpoint_step, load_prior as load_run   # JAX: only for run dirs
    step, _ = checkpoint_step(path, step)   # recorded: an evaluation says which checkpoint it measured
    # float32 whatever the run trained in (bf16 on a GPU): the same weights score as their float32 export does,
    # on any machine; bf16 matmuls over a sampler's steps would move fd and the rest by the run's hardware.
    model, normalizer, config = load_run(path, step=step, compute_dtype="float32")
    multi = bool(model.cfg.multi_layer_n_layers)
    if multi and layer is None:
      raise ConfigError(f"{path} holds a multi-layer prior: say which LM layer to evaluate (--layer)")
    if multi:
      normalizer = normalizer.select(layer)
    mean, var = _moments(normalizer)
    info = {"source": "jax_run", "path": path if files.is_remote(path) else os.path.abspath(path), "step": step}
    info.update(lm_info_from_config(config if isinstance(config, dict) else config.to_dict()))
    return from_jax_model(model, mean, var, info, layer if multi else None)
  from glp_jax.torch import GLP, io as torch_io
  if not torch_io.is_export_folder(path) and not os.path.exists(os.path.join(path, "config.yaml")):
    raise FileNotFoundError(f"{path!r} is neither a glp_jax run dir (config.json + checkpoints/) nor an "
                            "exported / reference prior folder")
  if step is not None:   # it would evaluate the folder's one set of weights under another step's name
    raise ConfigError(f"--step={step} picks a checkpoint of a glp_jax run dir; {path} is an exported prior "
                      "(one set of weights): evaluate the run, or export that step (glp-export --step)")
  from glp_jax.torch.lm import resolve_device
  glp = GLP.from_pretrained(path, device=resolve_device(device))
  multi = bool(glp.cfg.multi_layer_n_layers)
  if multi and layer is None:
    raise ConfigError(f"{path} holds a multi-layer prior: say which LM layer to evaluate (--layer)")
  info = {"source": "export", "path": os.path.abspath(path)}
  info.update({k: v for k, v in export_provenance(path).items() if k in ("lm", "layer", "store")})
  return from_torch_glp(glp, info, layer if multi else None)


def is_run_dir(path: str) -> bool:
  return files.isdir(os.path.join(path, "checkpoints")) and files.exists(os.path.join(path, "config.json"))


def export_provenance(path: str) -> dict:
  """The `provenance` block of a glp-export folder's config.json, {} for a run dir. Its `layer` is completed
  from the folder's `tracedict_config` where it records none, and a reference folder (config.yaml) gives its
  `model_name` and `glp_kwargs.tracedict_config`: a reference prior, or one re-saved from it, names the LM layer
  it models only there (without it the evaluations took the store's first layer)."""
  if is_run_dir(path):
    return {}
  meta = files.read_json(os.path.join(path, "config.json"), {})
  if meta.get("format"):
    prov, tracedict = dict(meta.get("provenance") or {}), meta.get("tracedict_config") or {}
  else:
    ref = _reference_config(path)
    prov, tracedict = {"lm": ref.get("model_name")}, (ref.get("glp_kwargs") or {}).get("tracedict_config") or {}
  if prov.get("layer") is None:
    from glp_jax.torch.card import traced_layer   # an export folder: torch loads it anyway
    if traced_layer(tracedict) is not None:   # no `layer: None` key: callers fall back with .get("layer", x)
      prov["layer"] = traced_layer(tracedict)
  return prov


def _reference_config(path: str) -> dict:
  """A reference folder's config.yaml ({} when absent or not a mapping)."""
  import yaml
  yml = os.path.join(path, "config.yaml")
  if not os.path.exists(yml):
    return {}
  with open(yml) as fh:
    ref = yaml.safe_load(fh)
  return ref if isinstance(ref, dict) else {}
