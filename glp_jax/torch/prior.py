"""`GLP`: a loaded prior (denoiser + normaliser + reference sampler) for PyTorch code such as HF hooks.

  glp = GLP.from_pretrained("exports/d6")            # our export or a reference folder, or a Hub repo id
  v = glp(z_normalised, timesteps_0_1000)            # velocity prediction, any leading shape
  acts = glp.generate(64, generator=g)               # raw-space samples (Euler on the reference grid)
  h_new = glp.sample_on_manifold(h_edit)             # activation SDEdit, u=0.5 on a 20-step grid
  glp.push_to_hub("org/glp-llama1b-d6")              # save_pretrained + upload

Steering an HF model: `with glp_jax.torch.steer(model, layer, w, alpha, positions="last", prior=glp):
model.generate(...)`. Write your own hook with `glp_jax.torch.edit_output` rather than indexing `output[0]`:
transformers 5.x decoder layers return a tensor, not a tuple (docs/steering.md).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import torch
from torch import nn

from glp_jax.core import grid
from glp_jax.torch import hub
from glp_jax.torch import io
from glp_jax.torch import sampling
from glp_jax.torch.model import Denoiser, DenoiserConfig, Normalizer


class GLP(nn.Module):
  """A generative latent prior: `denoiser` (reference `Denoiser`, keys `model.*`) and `normalizer`."""

  def __init__(self, cfg: DenoiserConfig, mean: torch.Tensor | None = None, var: torch.Tensor | None = None,
               meta: Mapping[str, Any] | None = None, layers: list[int] | None = None,
               denoiser: Denoiser | None = None):
    super().__init__()
    self.cfg = cfg
    self.denoiser = Denoiser(cfg) if denoiser is None else denoiser
    if mean is None:  # identity statistics: a fresh, untrained prior
      shape = (cfg.multi_layer_n_layers, cfg.d_input) if cfg.multi_layer_n_layers else (cfg.d_input,)
      mean, var = torch.zeros(shape), torch.ones(shape)
    io.check_stats(torch.as_tensor(mean), torch.as_tensor(var), cfg, "GLP", layers)
    self.normalizer = Normalizer(mean, var, layers)
    self.meta = dict(meta or {})
    self.sampler = {**io.SAMPLER_DEFAULTS, **dict(self.meta.get("sampler") or {})}

  # --- loading / saving ---------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, checkpoint: str | None = None,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
                      revision: str | None = None, cache_dir: str | None = None,
                      token: str | bool | None = None) -> "GLP":
    """Loads our export folder or a reference folder (config.yaml + rep_statistics.pt + final.safetensors).

    `path` is a local folder or a Hugging Face Hub repo id ("org/name", at `revision`), fetched through the
    Hub cache (`cache_dir`, default $HF_HUB_CACHE; offline with HF_HUB_OFFLINE=1 once cached). The weights
    keep their stored dtype unless `dtype` is given; the normaliser stays float32.
    """
    folder = hub.resolve(path, revision, checkpoint, cache_dir, token)
    got = io.read_folder(folder, checkpoint)
    with torch.device("meta"):  # no random init of billions of parameters that are overwritten anyway
      denoiser = Denoiser(got["config"])
    denoiser.load_state_dict(got["state_dict"], strict=True, assign=True)  # keeps the stored dtype
    if dtype is not None:
      denoiser.to(dtype)
    glp = cls(got["config"], got["mean"], got["var"], got["meta"], got["layers"], denoiser=denoiser)
    return glp.to(device or "cpu").eval()

  def save_pretrained(self, path: str | os.PathLike, dtype: str | None = None,
                      provenance: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Writes both layouts and the model card README.md (see `glp_jax.torch.io`). `dtype` ("float32" or
    "bfloat16") defaults to the weights' own (float32 for any other), so a prior loaded from a bf16 folder saves
    as one. The provenance defaults to the loaded folder's (a reference folder's `model_name` names the LM):
    pass your own once the weights have been trained further, as the old one describes the old weights."""
    if dtype is None:
      own = self.denoiser.model.in_proj.weight.dtype
      dtype = next((name for name, t in io.DTYPES.items() if t == own), "float32")
    if provenance is None:
      provenance = self.meta.get("provenance") or (
          {"lm": self.meta["model_name"]} if self.meta.get("model_name") else None)
    return io.write_folder(os.fspath(path), self.denoiser.state_dict(), self.cfg, self.normalizer.mean,
                           self.normalizer.var, layers=self.normalizer.layers, dtype=dtype,
                           tracedict=self.meta.get("tracedict_config")
                           or (self.meta.get("glp_kwargs") or {}).get("tracedict_config"),
                           provenance=provenance)

  def push_to_hub(self, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                  token: str | bool | None = None, commit_message: str | None = None, dtype: str | None = None,
                  provenance: Mapping[str, Any] | None = None) -> Any:
    """`save_pretrained` into a temporary folder, then upload it to the Hub model repo `repo_id` (created when
    missing; `revision` a branch). Returns huggingface_hub's CommitInfo."""
    with tempfile.TemporaryDirectory(prefix="glp_push_") as tmp:
      self.save_pretrained(tmp, dtype, provenance)
      return hub.push_folder(tmp, repo_id, revision=revision, private=private, token=token,
                             commit_message=commit_message)

  # --- math -----------------------------------------------------------------------------------------------

  @property
  def device(self) -> torch.device:
    return self.denoiser.model.in_proj.weight.device

  def normalize(self, x: torch.Tensor, layer_idx=None) -> torch.Tensor:
    """(x - mean) / sqrt(var), float32 out; per-layer stats for multi-layer priors."""
    return self.normalizer.normalize(x, layer_idx)

  def denormalize(self, z: torch.Tensor, layer_idx=None) -> torch.Tensor:
    return self.normalizer.denormalize(z, layer_idx)

  def forward(self, z: torch.Tensor, timesteps, layer_idx=None) -> torch.Tensor:
    """Velocity v_hat (..., D) for normalised `z` (..., D) at `timesteps` = 1000 * sigma (scalar or per row)."""
    return self.denoiser(z, timesteps, layer_idx)

  @torch.no_grad()
  def sample(self, noise: torch.Tensor, num_steps: int | None = None, layer_idx=None,
             first_step: int = 0) -> torch.Tensor:
    """Euler-integrates normalised latents (..., D) from grid index `first_step` to sigma=0; float32 out."""
    steps = num_steps or self.sampler["num_steps"]
    return sampling.euler_sample(lambda z, t: self.denoiser(z, t, layer_idx), noise.to(self.device), steps,
                                 first_step)

  @torch.no_grad()
  def generate(self, num: int, num_steps: int | None = None, generator: torch.Generator | None = None,
               layer_idx=None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """`num` raw-space activations [num, D] (float32) from N(0, I) noise through the sampler."""
    if noise is None:
      noise = _randn((num, self.cfg.d_input), generator, self.device)
    z = self.sample(noise, num_steps, layer_idx)
    return self.denormalize(z, layer_idx)

  @torch.no_grad()
  def sample_on_manifold(self, x: torch.Tensor, start: float = 0.5, steps: int = 20,
                         generator: torch.Generator | None = None, layer_idx=None,
                         noise: torch.Tensor | None = None) -> torch.Tensor:
    """Projects activations (..., D) of any dtype onto the prior's manifold (activation SDEdit).

    Normalise, noise to the grid point floor(start * steps) (u = start, as the reference: start=0.5,
    steps=20 -> sigma ~ 0.474), Euler-integrate the remaining steps to sigma=0, denormalise, cast back.
    `layer_idx` (multi-layer priors) is an int or broadcasts to the leading shape; `noise` overrides the draw.
    """
    first = grid.manifold_start_index(start, steps)
    sigmas, _ = sampling.euler_grid(steps)
    z = self.normalize(x.to(self.device), layer_idx)
    if noise is None:
      noise = _randn(tuple(z.shape), generator, self.device)
    sigma = sigmas[first].to(self.device)
    z = (1.0 - sigma) * z + sigma * noise.to(self.device, torch.float32)
    z = self.sample(z, steps, layer_idx, first_step=first)
    return self.denormalize(z, layer_idx).to(device=x.device, dtype=x.dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
  """float32 N(0, I) drawn on the generator's device (so a CPU generator works for a GPU model)."""
  gen_device = generator.device if generator is not None else device
  return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
