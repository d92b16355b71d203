"""A trained glp_jax run -> a self-contained PyTorch prior folder (and the reference layout): `export()`.

The folder (see `glp_jax/torch/io.py`) loads with `glp_jax.torch.GLP.from_pretrained(out)` where only torch
is installed, and with the reference's `load_glp` (config.yaml + rep_statistics.pt + final.safetensors).
The EMA parameters are exported when the run kept them (`load_prior` returns them). config.json records the
provenance: source run, step, activations seen, FLOPs, eval loss (from the checkpoint, metrics.jsonl and
summary.json; for the checkpoint glp-import wrote, the source's), the checksum of the exported weights, the
LM, layer, store and corpus (from the store manifest; the embedded default store when the run's `data.store`
is ""), the run's eval_*.json numbers and the export command line; README.md (the model card,
`glp_jax.torch.card`) shows them with the Hub metadata header.
"""
from __future__ import annotations

import datetime
import logging
import os
import shlex
from typing import Any

import numpy as np
from flax import nnx

import glp_jax
from glp_jax.core import model as model_lib
from glp_jax.torch import io as torch_io
from glp_jax.torch import lm as lm_lib
from glp_jax.torch.model import DenoiserConfig
from glp_jax.util import files

log = logging.getLogger("glp_jax")
# The Hub model the embedded default LM (torch/lm.py) was converted from.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What the prior models (carried over from the source of an imported export).
IDENTITY_KEYS = ("lm", "layer", "bos", "store", "corpus", "lm_description", "lm_revision", "store_rows",
                 "store_docs", "store_dtype")
# How the weights of an imported checkpoint were trained: the source's figures (None where it recorded none).
TRAINING_KEYS = ("step", "activations_seen", "flops", "eval_loss", "eval_loss_sem", "eval_step", "ema")


def denoiser_config(cfg: model_lib.ModelConfig) -> DenoiserConfig:
  return DenoiserConfig(cfg.d_input, cfg.d_model, cfg.d_mlp, cfg.n_layers, cfg.multi_layer_n_layers or None)


def provenance(workdir: str, step: int, meta: dict, config: Any) -> dict:
  """Where the prior comes from: run, step, activations seen, FLOPs, the eval loss at (or before) `step`.

  For the checkpoint glp-import wrote, the training figures are the source's (None where it recorded none).
  """
  summary = files.read_json(os.path.join(workdir, "summary.json")) or {}
  evals = [r for r in files.iter_jsonl(os.path.join(workdir, "metrics.jsonl"))
           if r.get("eval_loss") is not None and int(r.get("step", -1)) <= step]
  out = {"source_run": _location(workdir), "step": int(step),
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
  if meta.get("imported_from"):
    # The imported checkpoint (step 0, no examples, no FLOPs here) holds weights trained elsewhere.
    source = meta["imported_from"].get("source_provenance") or {}
    out.update({key: source.get(key) for key in TRAINING_KEYS}, imported_from=meta["imported_from"])
  return out


def _location(path: str) -> str:
  """An absolute local path, or a bucket URL as it is (abspath would mangle gs://b into ./gs:/b)."""
  return path if files.is_remote(path) else os.path.abspath(path)


def _get(config: Any, dotted: str, default: Any = None) -> Any:
  """config['a']['b'] for 'a.b' on a ConfigDict or plain dict; `default` when absent."""
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return default
  return node


def lm_info(normalizer: Any, config: Any, multi: int, imported: bool = False,
            d_input: int | None = None) -> tuple[dict, dict]:
  """(the reference's `tracedict_config`, {'lm', 'layer', 'store', ...}) of the activations the run modelled.

  Read from the normaliser (stacked layers), config.data.layer and the store manifest when it is at hand: the
  run's `data.store`, or for `data.store = ""` the embedded default store the trainer used (located, or
  built once, by `default_store`), so an export of a default run names its LM, layer, store and corpus.
  An imported run (`imported`) trained on nothing here: its identity comes from the source folder instead.
  A store whose width is not the prior's `d_input` is not the one the run trained on (rebuilt or replaced
  since): it is ignored, with a warning.
  """
  store = _get(config, "data.store", "") or ""
  if not store and not imported:
    from glp_jax.training.input import default_store
    store = default_store()
  from glp_jax.data import layout  # pylint: disable=g-import-not-at-top
  try:
    manifest = layout.read_manifest(store) if store else {}
  except Exception:  # a moved or deleted store (or an imported run): the layer may still be known
    manifest = {}
  if manifest and d_input is not None and int(manifest.get("d", d_input)) != d_input:
    log.warning("export: store %s has D=%s but the prior models D=%d: not the store this run trained on; "
                "its LM, layer and corpus are not recorded", store, manifest.get("d"), d_input)
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
  metadata = manifest.get("metadata") or {}
  info = {"store": layout.location(store) if store else None,
          "lm": metadata.get("model"),
          "layer": layers[0] if layers and len(layers) == 1 else layers}
  if manifest:
    # bos: whether documents reached the LM behind a BOS; evaluations of the export feed text alike
    info.update(bos=layout.leads_with_bos(metadata),
                lm_description=metadata.get("model_description"), lm_revision=metadata.get("model_revision"),
                corpus=metadata.get("corpus"), store_rows=manifest.get("num_rows"),
                store_docs=manifest.get("num_docs"), store_dtype=manifest.get("dtype"))
  return {"layer_prefix": "model.layers", "layers": layers, "retain": "output"}, info


def hub_identity(lm: str | None) -> dict:
  """The LM's Hub id (`base_model` of the model card) and, where known, its license (`lm_license`; the
  prior's own `license` is the exporter's to state, with --license)."""
  if lm == lm_lib.EMBEDDED:
    return {"base_model": EMBEDDED_HUB_ID, "lm_license": "apache-2.0"}
  if lm and not os.path.exists(lm):
    from glp_jax.torch import hub
    if hub.is_repo_id(lm):
      return {"base_model": lm}
  return {}


def run_evals(workdir: str, step: int, latest: int) -> dict:
  """The run's `eval_<name>.json` numbers that belong to checkpoint `step`.

  glp-eval records the checkpoint it measured (`ckpt_step`); a file from before it did is kept only when
  `step` is the latest and the file is newer than that checkpoint. What is left out is logged.
  """
  from glp_jax.torch import card
  evals = card.read_evals(workdir)
  born = files.mtime(os.path.join(workdir, "checkpoints", str(step)))
  for name in sorted(evals):
    at = evals[name].get("ckpt_step")
    if at is not None:
      why = None if int(at) == step else f"measured checkpoint {int(at)}"
    elif step != latest:
      why = f"records no checkpoint and {step} is not the latest ({latest})"
    elif files.mtime(os.path.join(workdir, f"eval_{name}.json")) < born:
      why = "records no checkpoint and predates it"
    else:
      why = None
    if why:
      log.warning("export: eval_%s.json %s; not recorded in the model card of step %d", name, why, step)
      del evals[name]
  return evals


def export_command(workdir: str, out: str, step: int, dtype: str,
                   license: str | None = None) -> str:  # pylint: disable=redefined-builtin
  """The glp-export command line that reproduces an `export()` call (the step made explicit)."""
  return shlex.join(["glp-export", f"--workdir={_location(workdir)}", f"--out={_location(out)}",
                     f"--step={step}", f"--dtype={dtype}"] + ([f"--license={license}"] if license else []))


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32", *,
           command: str | None = None, license: str | None = None) -> dict:  # pylint: disable=redefined-builtin
  """Writes the prior of `workdir` at `step` (default latest) into `out`; returns {paths, provenance}.

  `command` is the command line recorded in the model card (default: the equivalent glp-export call);
  `license` (a Hub license id such as apache-2.0) is the prior's license in the card's metadata.
  """
  from glp_jax.training.prior import checkpoint_step, load_prior  # jax, orbax: imported only when exporting
  from glp_jax.training.state import params_checksum
  latest, _ = checkpoint_step(workdir, None)
  step, meta = checkpoint_step(workdir, step)
  model, normalizer, config = load_prior(workdir, step)
  cfg = denoiser_config(model.cfg)
  imported = meta.get("imported_from") or {}
  tracedict, info = lm_info(normalizer, config, cfg.multi_layer_n_layers or 0, imported=bool(imported),
                            d_input=cfg.d_input)
  info["lm"] = info["lm"] or imported.get("model_name")
  source = imported.get("source_provenance") or {}   # an imported glp_jax export knows its own data
  for key in IDENTITY_KEYS:
    if info.get(key) is None and source.get(key) is not None:
      info[key] = source[key]
  prov = {**provenance(workdir, step, meta, config), **info, **hub_identity(info["lm"])}
  if license:
    prov["license"] = license
  prov["evals"] = run_evals(workdir, step, latest)
  prov["export_command"] = command or export_command(workdir, out, step, dtype, license)
  extra = {"model_name": info["lm"],
           "batch_size": _get(config, "batch_size"), "learning_rate": _get(config, "opt.lr"),
           "lr_scheduler": _get(config, "opt.schedule"), "num_activations": _get(config, "num_activations"),
           "source": "glp_jax"}
  mean, var = np.asarray(normalizer.mean, np.float32), np.asarray(normalizer.var, np.float32)
  stacked_layers = list(normalizer.layers) if mean.ndim == 2 and normalizer.layers is not None else None
  state_dict = model_lib.to_reference_state_dict(model)
  prov["params"] = int(sum(v.size for v in state_dict.values()))
  # Of the checkpoint's float32 weights that are written (the EMA ones when the run kept them; summary.json's is of
  # the raw ones), whatever `dtype` the file stores: it names the run state the export came from, so a bf16 and a
  # float32 export of one step carry the same checksum.
  prov["params_checksum"] = params_checksum(nnx.to_pure_dict(nnx.state(model)))
  paths = torch_io.write_folder(out, state_dict, cfg, mean, var, layers=stacked_layers, dtype=dtype,
                                tracedict=tracedict, provenance=prov, reference_extra=extra)
  return {"out": _location(out), "paths": paths, "provenance": prov, "dtype": dtype,
          "architecture": cfg.to_dict()}
