"""Prior folders on disk: our export layout and the reference GLP layout, read and written with torch only.

One folder holds both layouts:
  config.json         our config: architecture, normaliser mean/var, sampler defaults, provenance
  model.safetensors   denoiser state dict (reference key names, torch Linear [out, in] layout)
  config.yaml         reference `load_glp` config (`glp_kwargs`, `${rep_statistic}` interpolation)
  rep_statistics.pt   torch.save({"mean": [D] or [L, D], "var": same}) (variance, not std)
  final.safetensors   the same tensors as model.safetensors (a hard link when the filesystem allows)
  README.md           the model card (Hub metadata header, provenance, evals, how to load; `card.py`)
A reference folder has only the last three (plus `checkpoints/<name>.safetensors`).

Every reader check names the offending key: a missing or unexpected tensor, a wrong shape, a config field.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch
import yaml

from glp_jax.torch import card as card_lib
from glp_jax.torch.model import DenoiserConfig, expected_shapes
from glp_jax.util import files

FORMAT = "glp_jax.torch"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REF_CONFIG_FILE = "config.yaml"
REF_STATS_FILE = "rep_statistics.pt"
REF_CHECKPOINT = "final"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Sampler defaults recorded in config.json (reference: sample() 20 steps, FD eval 1000, SDEdit u=0.5 / 20).
SAMPLER_DEFAULTS = {"grid": "FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)",
                    "timestep_scale": 1000, "num_steps": 20, "fd_num_steps": 1000,
                    "manifold_start": 0.5, "manifold_steps": 20}


def check_state_dict(sd: Mapping[str, Any], cfg: DenoiserConfig, source: str) -> None:
  """Raises KeyError / ValueError naming the first missing, unexpected or wrongly shaped key."""
  want = expected_shapes(cfg)
  missing = [k for k in want if k not in sd]
  if missing:
    raise KeyError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing) for {cfg}")
  extra = sorted(k for k in sd if k not in want)
  if extra:
    raise KeyError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected) for {cfg}")
  for k, shape in want.items():
    got = tuple(sd[k].shape)
    if got != shape:
      raise ValueError(f"{source}: key {k!r} has shape {got}, the config {cfg} needs {shape}")


def check_stats(mean: torch.Tensor, var: torch.Tensor, cfg: DenoiserConfig, source: str,
                layers: list[int] | None = None) -> None:
  """The normaliser statistics must be [D] (single layer) or [K, D] (multi-layer) and agree with the config."""
  for name, t in (("mean", mean), ("var", var)):
    multi = cfg.multi_layer_n_layers is not None
    ok = t.shape[-1:] == (cfg.d_input,) and (t.ndim == 2 if multi else t.ndim == 1)
    if not ok:
      want = f"[L, {cfg.d_input}]" if multi else f"[{cfg.d_input}]"
      raise ValueError(f"{source}: key {name!r} has shape {tuple(t.shape)}, the config needs {want}")
  if layers is not None and mean.ndim == 2 and len(layers) != mean.shape[0]:
    raise ValueError(f"{source}: key 'layers' names {len(layers)} LM layers for {mean.shape[0]} stacked rows")
  if not bool(torch.all(var > 0)):
    raise ValueError(f"{source}: key 'var' has non-positive entries (normalisation divides by sqrt(var))")


def reference_config(cfg: DenoiserConfig, tracedict: Mapping[str, Any] | None,
                     extra: Mapping[str, Any] | None = None) -> str:
  """The reference `config.yaml` text: top-level keys, `rep_statistic`, and `glp_kwargs`."""
  top = dict(extra or {})
  top["rep_statistic"] = REF_STATS_FILE  # load_glp overrides it with the downloaded path before resolving
  top["glp_kwargs"] = {
      "normalizer_config": {"rep_statistic": "${rep_statistic}"},
      "denoiser_config": cfg.to_dict(),
      "tracedict_config": dict(tracedict or {"layer_prefix": "model.layers", "layers": None, "retain": "output"}),
  }
  # safe_dump writes floats with a '.' (5.0e-05), which YAML 1.1 readers such as PyYAML read back as floats.
  return ("# GLP prior written by glp_jax (reference layout; load with glp.denoiser.load_glp)\n"
          + yaml.safe_dump(top, sort_keys=False, default_flow_style=False))


def reference_stats(mean: torch.Tensor, var: torch.Tensor, layers: list[int] | None,
                    cfg: DenoiserConfig) -> tuple[torch.Tensor, torch.Tensor]:
  """Stats as the reference indexes them: row = LM layer. Stacked rows of other LM layers are spread into a
  [multi_layer_n_layers, D] table whose untrained layers get identity statistics (mean 0, var 1)."""
  if mean.ndim == 1 or layers is None or list(layers) == list(range(len(layers))):
    return mean, var
  n = cfg.multi_layer_n_layers or (max(layers) + 1)
  if max(layers) >= n:
    raise ValueError(f"normalizer layers {layers} exceed multi_layer_n_layers={n}")
  full_mean, full_var = torch.zeros(n, mean.shape[-1]), torch.ones(n, mean.shape[-1])
  full_mean[list(layers)], full_var[list(layers)] = mean, var
  return full_mean, full_var


def write_folder(out: str, state_dict: Mapping[str, Any], cfg: DenoiserConfig, mean, var, *,
                 layers: list[int] | None = None, dtype: str = "float32",
                 tracedict: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
                 sampler: Mapping[str, Any] | None = None,
                 reference_extra: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Writes both layouts and the model card into `out`; `state_dict` values may be numpy arrays or tensors.

  Returns the paths. A README.md someone edited by hand is kept (see `card.is_generated`).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
  tensors = {k: (v.detach().cpu() if torch.is_tensor(v) else torch.from_numpy(np.array(v, np.float32)))
             .to(DTYPES[dtype]).contiguous() for k, v in state_dict.items()}
  check_state_dict(tensors, cfg, "export")
  mean, var = ((t.detach().float().cpu() if torch.is_tensor(t) else torch.from_numpy(np.array(t, np.float32)))
               for t in (mean, var))
  check_stats(mean, var, cfg, "export", layers)
  ref_mean, ref_var = reference_stats(mean, var, layers, cfg)   # checks the layers before the folder is touched
  os.makedirs(out, exist_ok=True)
  paths = {name: os.path.join(out, name) for name in
           (MODEL_FILE, CONFIG_FILE, REF_CONFIG_FILE, REF_STATS_FILE, REF_CHECKPOINT + ".safetensors")}
  final = paths[REF_CHECKPOINT + ".safetensors"]
  # The config file of each layout is what makes it load: both go first and come back last, so an export
  # killed half way into a folder holding a prior leaves one that loads as neither, never new weights under
  # the old config.json (statistics, provenance) or the old final.safetensors under the new config.yaml.
  for name in (CONFIG_FILE, REF_CONFIG_FILE):
    if os.path.lexists(paths[name]):
      os.remove(paths[name])
  with files.atomic_path(paths[MODEL_FILE]) as tmp:
    safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})
  with files.atomic_path(paths[REF_STATS_FILE]) as tmp:
    torch.save({"mean": ref_mean.clone(), "var": ref_var.clone()}, tmp)
  if os.path.lexists(final):
    os.remove(final)
  try:  # same bytes twice; a hard link keeps a multi-GB prior from doubling on disk
    os.link(paths[MODEL_FILE], final)
  except OSError:
    safetensors.torch.save_file(tensors, final, metadata={"format": "pt"})
  config = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": cfg.to_dict(), "dtype": dtype,
            "normalizer": {"shape": list(mean.shape), "layers": None if mean.ndim == 1 else layers,
                           "mean": mean.tolist(), "var": var.tolist()},
            "sampler": {**SAMPLER_DEFAULTS, **(sampler or {})},
            "tracedict_config": dict(tracedict) if tracedict else None,
            "provenance": dict(provenance or {})}
  paths[card_lib.CARD_FILE] = os.path.join(out, card_lib.CARD_FILE)
  if card_lib.is_generated(paths[card_lib.CARD_FILE]):
    files.atomic_write(paths[card_lib.CARD_FILE], card_lib.model_card(config).encode("utf-8"))
  files.atomic_write(paths[REF_CONFIG_FILE], reference_config(cfg, tracedict, reference_extra))
  # float32 values print as the shortest float64 repr, which reads back to the same float32: lossless.
  files.atomic_write(paths[CONFIG_FILE], json.dumps(config, indent=1) + "\n")
  # safetensors writes owner-only (0600) files: in a folder shared on a cluster others could read config.json
  # but not the weights. They get the mode of the folder's other new files.
  mode = stat.S_IMODE(os.stat(paths[CONFIG_FILE]).st_mode)
  for weights in (paths[MODEL_FILE], final):
    os.chmod(weights, mode)
  return paths


def _read_yaml(path: str) -> dict:
  with open(path) as fh:
    return yaml.safe_load(fh) or {}


def is_export_folder(path: str) -> bool:
  """True for a folder written by `write_folder` (has our config.json)."""
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(cfg_path):
    return False
  with open(cfg_path) as fh:
    return json.load(fh).get("format") == FORMAT


def read_folder(path: str, checkpoint: str | None = None) -> dict[str, Any]:
  """Reads our export or a reference folder into {config, state_dict, mean, var, layers, meta}; strict checks.

  `checkpoint` picks `<checkpoint>.safetensors` (e.g. "final", "checkpoints/epoch_0032"); the default is
  model.safetensors for our layout and final.safetensors for the reference layout.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"prior folder {path!r} does not exist")
  if is_export_folder(path):
    with open(os.path.join(path, CONFIG_FILE)) as fh:
      meta = json.load(fh)
    source = os.path.join(path, CONFIG_FILE)
    for key in ("architecture", "normalizer"):
      if key not in meta:
        raise KeyError(f"{source}: missing key {key!r}")
    cfg = DenoiserConfig.from_dict(meta["architecture"])
    norm = meta["normalizer"]
    for key in ("mean", "var"):
      if key not in norm:
        raise KeyError(f"{source}: missing key 'normalizer.{key}'")
    mean, var = (torch.tensor(norm[k], dtype=torch.float32) for k in ("mean", "var"))
    layers = norm.get("layers")
    weights = os.path.join(path, (checkpoint + ".safetensors") if checkpoint else MODEL_FILE)
  else:
    ycfg = os.path.join(path, REF_CONFIG_FILE)
    if not os.path.exists(ycfg):
      raise FileNotFoundError(f"{path!r} is neither a glp_jax export ({CONFIG_FILE}) nor a reference prior "
                              f"({REF_CONFIG_FILE})")
    meta = _read_yaml(ycfg)
    glp_kwargs = meta.get("glp_kwargs")
    if not isinstance(glp_kwargs, dict) or not isinstance(glp_kwargs.get("denoiser_config"), dict):
      raise KeyError(f"{ycfg}: missing key 'glp_kwargs.denoiser_config'")
    try:
      cfg = DenoiserConfig.from_dict(glp_kwargs["denoiser_config"])
    except ValueError as e:
      raise ValueError(f"{ycfg}: glp_kwargs.{e}") from None
    stats_path = os.path.join(path, REF_STATS_FILE)
    if not os.path.exists(stats_path):
      raise FileNotFoundError(f"{stats_path} is missing (the normaliser statistics)")
    stats = torch.load(stats_path, map_location="cpu", weights_only=True)
    for key in ("mean", "var"):
      if key not in stats:
        raise KeyError(f"{stats_path}: missing key {key!r}")
    mean, var, layers = stats["mean"].float(), stats["var"].float(), None
    weights = os.path.join(path, (checkpoint or REF_CHECKPOINT) + ".safetensors")
    source = stats_path
  if not os.path.exists(weights):
    raise FileNotFoundError(f"weights file {weights} is missing")
  if cfg.multi_layer_n_layers is None and mean.ndim == 2 and mean.shape[0] == 1:
    mean, var = mean[0], var[0]  # single-layer stats stored as [1, D]
  check_stats(mean, var, cfg, source, layers)
  state_dict = safetensors.torch.load_file(weights)
  check_state_dict(state_dict, cfg, weights)
  return {"config": cfg, "state_dict": state_dict, "mean": mean, "var": var, "layers": layers, "meta": meta}
