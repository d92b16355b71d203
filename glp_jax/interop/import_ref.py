"""A reference GLP checkpoint folder (or a glp-export folder) -> a glp_jax run directory: `import_prior()`.

The run gets what `glp-train` would have written, so `load_prior`, `glp-eval` and `glp-export` work on it
and `glp-train --workdir` continues training from it (step 0, fresh optimizer, imported weights):
  config.json       the train config (`--config`, default configs/train.py) with the architecture set
  normalizer.npz    the prior's statistics (rep_statistics.pt or config.json of an export)
  checkpoints/0/    orbax train state {model, opt[, ema]}; EMA (when configured) starts at the weights
  imported_from.json  where the weights came from (with the source's provenance when it has one)
Every check (missing key, wrong shape, a config that disagrees with the weights) names the key.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx

from glp_jax.core import model as model_lib
from glp_jax.core.normalizer import Normalizer
from glp_jax.torch import io as torch_io
from glp_jax.training import checkpoint as ckpt_lib
from glp_jax.training import sharding
from glp_jax.training import state as state_lib
from glp_jax.training import workdir as workdir_lib
from glp_jax.training.input import save_normalizer
from glp_jax.util import config as config_lib
from glp_jax.util import files


def default_config() -> ml_collections.ConfigDict:
  """configs/train.py (the packaged copy where there is no checkout): the defaults `glp-train` starts from."""
  return config_lib.load_file(config_lib.packaged_config("configs/train.py"))


def _tracedict(meta: dict) -> dict:
  if "glp_kwargs" in meta:  # reference config.yaml
    return dict(meta["glp_kwargs"].get("tracedict_config") or {})
  return dict(meta.get("tracedict_config") or {})


def run_config(config: ml_collections.ConfigDict, cfg: torch_io.DenoiserConfig,
               tracedict: dict) -> tuple[ml_collections.ConfigDict, model_lib.ModelConfig]:
  """`config` with `model` set to the prior's architecture; checked against the trainer's resolution."""
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  config.model.preset = "custom"
  config.model.d_input = cfg.d_input
  config.model.width_mult = cfg.d_model / cfg.d_input
  config.model.mlp_mult = cfg.d_mlp / cfg.d_model
  config.model.n_layers = cfg.n_layers
  config.model.multi_layer_n_layers = cfg.multi_layer_n_layers or 0
  layers = tracedict.get("layers") or []
  if not cfg.multi_layer_n_layers and len(layers) == 1 and int(config.data.layer) < 0:
    config.data.layer = int(layers[0])
  resolved = model_lib.model_config(config.model, cfg.d_input)
  # compute_dtype as the trainer resolves it (e.g. 'auto' -> this backend's dtype)
  model_cfg = model_lib.ModelConfig(cfg.d_input, cfg.d_model, cfg.d_mlp, cfg.n_layers,
                                    cfg.multi_layer_n_layers or 0, resolved.compute_dtype)
  if resolved != model_cfg:  # width_mult rounding: the trainer must rebuild exactly this shape
    raise config_lib.ConfigError(f"config.model resolves to {resolved}, not the prior's {model_cfg}")
  return config, model_cfg


def import_prior(src: str, workdir: str, checkpoint: str | None = None,
                 config: ml_collections.ConfigDict | None = None, hub: dict | None = None) -> dict:
  """Reads `src` and writes the run `workdir` (which must not hold checkpoints yet); returns a summary. `hub`
  ({"repo_id", "revision"}) records where a Hub-cache folder `src` came from."""
  got = torch_io.read_folder(src, checkpoint)   # strict: names missing/unexpected/misshapen keys
  cfg, meta = got["config"], got["meta"]
  config, model_cfg = run_config(config if config is not None else default_config(), cfg, _tracedict(meta))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # Committed steps only: an import cut short during its save leaves an orbax temporary folder, and importing
  # again is how that run is finished (glp-train refuses it).
  if os.path.isdir(ckpt_dir):
    reader = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    try:
      if reader.all_steps():
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: import into a fresh --workdir")
    finally:
      reader.close()

  # The same train state glp-train builds (model, optimizer[, EMA]) on one device, then the weights.
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.local_devices()[:1])
  n_steps = state_lib.total_steps(config)
  model, *rest = sharding.create_sharded(state_lib.creator(model_cfg, config, n_steps), mesh)
  flat = {k: v.float().numpy() for k, v in got["state_dict"].items()}
  model_lib.load_reference_state_dict(model, flat)
  ema = rest[1:]
  for e in ema:
    model_lib.load_reference_state_dict(e, flat)
  pure = state_lib.pure(nnx.split((model, *rest))[1])

  layers = got["layers"]
  normalizer = Normalizer(got["mean"].numpy(), got["var"].numpy(), tuple(layers) if layers else None)
  source = {"src": os.path.abspath(src), "layout": "glp_jax" if "format" in meta else "reference",
            "checkpoint": checkpoint or ("model" if "format" in meta else torch_io.REF_CHECKPOINT),
            "architecture": cfg.to_dict(), "tracedict_config": _tracedict(meta),
            "model_name": meta.get("model_name") or (meta.get("provenance") or {}).get("lm"),
            "source_provenance": meta.get("provenance")}
  if hub:   # the cache folder's path names a snapshot on this machine only
    source["hub"] = dict(hub)
  os.makedirs(workdir, exist_ok=True)
  config_lib.write_config(config, workdir)
  save_normalizer(normalizer, workdir)
  files.write_json(os.path.join(workdir, workdir_lib.IMPORTED_FILE), source)   # before the checkpoint: see there
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=config.ckpt.keep, keep_every=config.ckpt.keep_every,
                               async_save=False)
  ckpt.save(0, pure, {"step": 0, "examples": 0, "flops": 0, "wall_time": 0.0,
                      "data": {"seed": int(config.seed), "next_step": 0},
                      "param_shapes": ckpt_lib.shape_signature(pure["model"]),
                      "model": dataclasses.asdict(model_cfg), "imported_from": source})
  ckpt.close()
  return {"workdir": os.path.abspath(workdir), "step": 0, "model": dataclasses.asdict(model_cfg),
          "ema": bool(ema), "imported_from": source["src"], "layout": source["layout"]}
