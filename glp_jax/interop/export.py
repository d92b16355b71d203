"""A trained glp_jax run -> a self-contained PyTorch prior folder (and the reference layout): `export()`.

The folder (see `glp_jax/torch/io.py`) loads with `glp_jax.torch.GLP.from_pretrained(out)` where only torch
is installed, and with the reference's `load_glp` (config.yaml + rep_statistics.pt + final.safetensors).
The EMA parameters are exported when the run kept them (`load_prior` returns them). config.json records the
provenance: source run, step, activations seen, FLOPs, eval loss (from the checkpoint, metrics.jsonl and
summary.json).
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np

import glp_jax
from glp_jax.core import model as model_lib
from glp_jax.torch import io as torch_io
from glp_jax.torch.model import DenoiserConfig
from glp_jax.util import files


def denoiser_config(cfg: model_lib.ModelConfig) -> DenoiserConfig:
  return DenoiserConfig(cfg.d_input, cfg.d_model, cfg.d_mlp, cfg.n_layers, cfg.multi_layer_n_layers or None)


def checkpoint_step(workdir: str, step: int | None) -> tuple[int, dict]:
  """(step, checkpoint meta) of `step` or the latest checkpoint; names the steps present when it is missing."""
  from glp_jax.training import checkpoint as ckpt_lib  # orbax: only when a run is read
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ directory (not a glp-train run?)")
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory}: no checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; present: {sorted(steps)}")
    return step, ckpt.read_meta(step)
  finally:
    ckpt.close()


def provenance(workdir: str, step: int, meta: dict, config: Any) -> dict:
  """Where the prior comes from: run, step, activations seen, FLOPs, the eval loss at (or before) `step`."""
  summary = files.read_json(os.path.join(workdir, "summary.json")) or {}
  evals = [r for r in files.iter_jsonl(os.path.join(workdir, "metrics.jsonl"))
           if r.get("eval_loss") is not None and int(r.get("step", -1)) <= step]
  out = {"source_run": os.path.abspath(workdir), "step": int(step),
         "activations_seen": meta.get("examples"), "flops": meta.get("flops"),
         "eval_loss": None, "eval_loss_sem": None, "eval_step": None,
         "ema": float(_get(config, "opt.ema_decay", 0.0) or 0.0) > 0,
         "params_checksum": None,
         "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "glp_jax_version": glp_jax.__version__}
  if evals:
    last = max(evals, key=lambda r: int(r["step"]))
    out.update(eval_loss=last["eval_loss"], eval_loss_sem=last.get("eval_loss_sem"), eval_step=int(last["step"]))
  elif summary.get("eval_loss") is not None and summary.get("steps") == step:
    out.update(eval_loss=summary["eval_loss"], eval_loss_sem=summary.get("eval_loss_sem"), eval_step=step)
  if summary.get("steps") == step:
    out["params_checksum"] = summary.get("params_checksum")
  if meta.get("imported_from"):
    out["imported_from"] = meta["imported_from"]
  return out


def _get(config: Any, dotted: str, default: Any = None) -> Any:
  """config['a']['b'] for 'a.b' on a ConfigDict or plain dict; `default` when absent."""
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return default
  return node


def lm_info(normalizer: Any, config: Any, multi: int) -> tuple[dict, dict]:
  """(the reference's `tracedict_config`, {'lm', 'layer', 'store'}) of the activations the run modelled.

  Read from the normaliser (stacked layers), config.data.layer and the store manifest when it is at hand.
  """
  store = _get(config, "data.store", "") or ""
  try:
    from glp_jax.data import store as store_lib
    manifest = store_lib.read_manifest(store) if store else {}
  except Exception:  # a moved or deleted store (or an imported run): the layer may still be known
    manifest = {}
  layer = _get(config, "data.layer")
  if getattr(normalizer, "layers", None):
    layers = [int(l) for l in normalizer.layers]
  elif layer is not None and int(layer) >= 0:
    layers = [int(layer)]
  elif manifest.get("layers"):
    layers = [int(l) for l in manifest["layers"]][:None if multi else 1]
  else:
    layers = list(range(multi)) if multi else None
  info = {"store": os.path.abspath(store) if store else None,
          "lm": (manifest.get("metadata") or {}).get("model"),
          "layer": layers[0] if layers and len(layers) == 1 else layers}
  return {"layer_prefix": "model.layers", "layers": layers, "retain": "output"}, info


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32") -> dict:
  """Writes the prior of `workdir` at `step` (default latest) into `out`; returns {paths, provenance}."""
  from glp_jax.training.prior import load_prior  # jax, orbax: imported only when exporting
  step, meta = checkpoint_step(workdir, step)
  model, normalizer, config = load_prior(workdir, step)
  cfg = denoiser_config(model.cfg)
  tracedict, info = lm_info(normalizer, config, cfg.multi_layer_n_layers or 0)
  info["lm"] = info["lm"] or (meta.get("imported_from") or {}).get("model_name")
  prov = {**provenance(workdir, step, meta, config), **info}
  extra = {"model_name": info["lm"],
           "batch_size": _get(config, "batch_size"), "learning_rate": _get(config, "opt.lr"),
           "lr_scheduler": _get(config, "opt.schedule"), "num_activations": _get(config, "num_activations"),
           "source": "glp_jax"}
  mean, var = np.asarray(normalizer.mean, np.float32), np.asarray(normalizer.var, np.float32)
  stacked_layers = list(normalizer.layers) if mean.ndim == 2 and normalizer.layers is not None else None
  state_dict = model_lib.to_reference_state_dict(model)
  prov["params"] = int(sum(v.size for v in state_dict.values()))
  paths = torch_io.write_folder(out, state_dict, cfg, mean, var, layers=stacked_layers, dtype=dtype,
                                tracedict=tracedict, provenance=prov, reference_extra=extra)
  return {"out": os.path.abspath(out), "paths": paths, "provenance": prov, "dtype": dtype,
          "architecture": cfg.to_dict()}
