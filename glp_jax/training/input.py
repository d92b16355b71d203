"""The trainer's input: the loader over the configured store (or the embedded default), global arrays on
the mesh, the held-out rows, and the run's own normaliser.

The batch of step s is a pure function of (seed, s) (see `glp_jax.data.loader`), so resume needs only s.
"""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from glp_jax.core import model as model_lib
from glp_jax.core.normalizer import Normalizer
from glp_jax.data import loader as loader_lib
from glp_jax.data import layout
from glp_jax.data import store as store_lib
from glp_jax.training import sharding
from glp_jax.util import files, runtime
from glp_jax.util.errors import ConfigError

NORMALIZER_FILE = "normalizer.npz"


class Input:
  """The loader over the configured store (or the embedded default) plus global-array assembly."""

  def __init__(self, config: ml_collections.ConfigDict):
    path = config.data.store or default_store()
    if not layout.is_store(path):
      raise ConfigError(f"config.data.store: no activation store at {path!r} (expected {path}/manifest.json); "
                        "run glp-extract first or leave it empty for the embedded default")
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.store = path
    multi = config.model.multi_layer_n_layers or model_lib.PRESETS.get(config.model.preset, {}).get(
        "multi_layer_n_layers", 0)
    self.loader = loader_lib.from_config(data_cfg, batch_size=config.batch_size, seed=config.seed,
                                         all_layers=bool(multi), expect_d=int(config.model.get("d_input", 0) or 0))
    self.path, self.d_input, self.normalizer = path, self.loader.d_input, self.loader.normalizer
    self.multi_layer = self.loader.multi_layer
    self.batch_size = config.batch_size

  def check_model(self, model_cfg: model_lib.ModelConfig) -> None:
    """A multi-layer prior needs a multi-layer store of layers it can number, a single-layer prior one layer."""
    if bool(model_cfg.multi_layer_n_layers) != self.multi_layer:
      layers = self.loader.layers if self.multi_layer else self.loader.layers[0]
      raise ConfigError(f"config.model.multi_layer_n_layers={model_cfg.multi_layer_n_layers} but the store "
                        f"{self.path} gives {'several layers' if self.multi_layer else 'one layer'} "
                        f"(config.data.layer={layers})")
    n = model_cfg.multi_layer_n_layers
    if n and max(self.loader.layers) >= n:   # depth = layer / (n - 1) must stay in [0, 1]; export refuses too
      raise ConfigError(f"config.model.multi_layer_n_layers={n} (LM layers 0..{n - 1}) but the store {self.path} "
                        f"gives layers {self.loader.layers}: set it to the LM's number of layers")

  def use_normalizer(self, normalizer: Normalizer) -> None:
    """Normalise with `normalizer` (the run's own) instead of the store's statistics."""
    stacked = normalizer.mean.ndim == 2   # multi-layer: the stacked rows must name the same LM layers
    same_layers = not stacked or normalizer.layers == self.normalizer.layers
    if normalizer.mean.shape != self.normalizer.mean.shape or not same_layers:
      raise ConfigError(f"the run's {NORMALIZER_FILE} has shape {normalizer.mean.shape} (layers "
                        f"{normalizer.layers}) but the store {self.path} gives {self.normalizer.mean.shape} "
                        f"(layers {self.normalizer.layers}): use a new --workdir for a different store layout")
    self.normalizer = self.loader.normalizer = normalizer

  def use_process_0_normalizer(self) -> None:
    """Every process normalises with process 0's statistics (the ones it saves). Each process opened the store
    itself, and the statistics of a store still being written are those of the rows committed then
    (data.stats=all on a streaming store): processes that opened it a commit apart would each normalise their own
    rows otherwise."""
    n = self.normalizer
    mean, var = runtime.from_process_0(n.mean, n.var)
    self.use_normalizer(dataclasses.replace(n, mean=mean, var=var))

  def batches(self, start_step: int, stop_step: int, mesh: jax.sharding.Mesh):
    """(step, (x_raw_BxD[, layer_B])) as global arrays on `mesh`, rows in the store's dtype (the step
    normalises them on the device: half the bytes of float32 for a bf16 store), prefetched on a thread."""
    rows, vec = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    for step, b in self.loader.iterate(start_step, stop_step, raw=True):
      x = loader_lib.to_global_array(b.x_BxD, rows, (self.batch_size, self.d_input))
      if b.layer_B is None:
        yield step, (x,)
      else:
        yield step, (x, loader_lib.to_global_array(np.asarray(b.layer_B, np.int32), vec, (self.batch_size,)))

  def stop_waiting_on(self, stop) -> None:
    """A streaming loader's waits for rows end when `stop` (a runtime.StopRequest) is requested."""
    self.loader.interrupted = lambda: stop.requested

  def retire(self) -> None:
    """The run has trained its last step: a streaming producer stops waiting for it."""
    self.loader.retire()

  def heldout(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """n fixed held-out rows spread over the held-out documents (all processes read the same rows):
    normalised x_NxD, the document group 0..G-1 of each row, and layer_N (multi-layer) or None."""
    n = min(n, len(self.loader.heldout_ids) * len(self.loader.layers))
    b = self.loader.heldout(n, process_local=False)
    group_N = np.unique(b.doc_B, return_inverse=True)[1]
    return b.x_BxD, group_N, b.layer_B


def default_store() -> str:
  """Path of the embedded default store, built on first use (cached) by the extractor.

  Built in a child process: the extractor is the torch side, and the trainer process never imports torch.
  """
  path = store_lib.default_store_path()
  if layout.is_store(path):
    return path
  print(f"building the embedded default store at {path} (once; about a minute on 2 CPU cores)",
        file=sys.stderr, flush=True)
  code = "from glp_jax.extraction import extractor; print(extractor.default_store())"
  out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  if out.returncode != 0:
    raise ConfigError("config.data.store is empty and building the embedded default store failed (see the "
                      "log above); name a store with --config.data.store=PATH")
  return out.stdout.strip().splitlines()[-1]


def save_normalizer(normalizer: Normalizer, workdir: str) -> None:
  """The run's normaliser, kept for the life of the workdir (a resumed run must use the same one)."""
  buf = io.BytesIO()
  np.savez(buf, mean=normalizer.mean, var=normalizer.var,
           layers=np.asarray(normalizer.layers if normalizer.layers else [], np.int64))
  files.atomic_write(os.path.join(workdir, NORMALIZER_FILE), buf.getvalue())


def load_normalizer(workdir: str) -> Normalizer:
  z = np.load(io.BytesIO(files.read_bytes(os.path.join(workdir, NORMALIZER_FILE))))
  layers = tuple(int(l) for l in z["layers"]) or None
  return Normalizer(z["mean"], z["var"], layers)
