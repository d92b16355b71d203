"""Per-dimension normalisation of activations (the reference scheme): (x - mean) / sqrt(var), no epsilon.

One `Normalizer` holds float32 `mean` and `var` of shape [D] (single-layer prior) or [K, D] stacked over the
K layers of a multi-layer prior; `layers` names the LM layer of each stacked row (default 0..K-1, the
reference layout), and `layer_B` holds LM layer numbers (as the loader emits them). Works on numpy and
jax arrays alike (the array module is taken from the input), so it runs inside jit.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def _xp(x):
  """numpy for numpy inputs, jax.numpy otherwise (imported lazily: numpy-only users never import jax)."""
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np
  import jax.numpy as jnp
  return jnp


@dataclasses.dataclass(frozen=True)
class Normalizer:
  mean: np.ndarray   # [D] or [K, D] float32
  var: np.ndarray    # same shape, variance (not std)
  layers: tuple[int, ...] | None = None   # LM layer of each stacked row; None = 0..K-1

  def __post_init__(self):
    mean = np.asarray(self.mean, np.float32)
    var = np.asarray(self.var, np.float32)
    if mean.shape != var.shape or mean.ndim not in (1, 2):
      raise ValueError(f"Normalizer: mean {mean.shape} and var {var.shape} must both be [D] or [K, D]")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
      raise ValueError("Normalizer: mean/var contain non-finite values")
    bad = np.argwhere(var <= 0)
    if bad.size:
      raise ValueError(f"Normalizer: variance is zero/negative at {len(bad)} entries (first {bad[0].tolist()}); "
                       "a constant activation dimension cannot be standardised without an epsilon")
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "var", var)
    if mean.ndim == 2:
      layers = tuple(int(l) for l in (range(len(mean)) if self.layers is None else self.layers))
      if len(layers) != len(mean) or len(set(layers)) != len(layers) or min(layers) < 0:
        raise ValueError(f"Normalizer: layers {layers} do not name the {len(mean)} stacked rows")
      object.__setattr__(self, "layers", layers)
      lookup = np.full(max(layers) + 1, -1, np.int32)   # LM layer -> stacked row (-1: not held)
      lookup[list(layers)] = np.arange(len(layers))
      object.__setattr__(self, "row_of_layer", lookup)

  @property
  def d(self) -> int:
    return self.mean.shape[-1]

  @property
  def stacked(self) -> bool:
    return self.mean.ndim == 2

  def _params(self, xp, layer_B):
    mean, std = xp.asarray(self.mean), xp.sqrt(xp.asarray(self.var))
    if not self.stacked:
      return mean, std
    if layer_B is None:
      raise ValueError("Normalizer: stacked [K, D] statistics need layer_B")
    if xp is np:   # checked where the values are concrete; under jit an unknown layer clamps to the last row
      layer_B = np.asarray(layer_B)
      if np.any(layer_B < 0) or np.any(layer_B >= len(self.row_of_layer)) or np.any(self.row_of_layer[layer_B] < 0):
        raise ValueError(f"Normalizer: layer_B names LM layers outside {self.layers}")
    row_B = xp.asarray(self.row_of_layer)[layer_B]
    return mean[row_B], std[row_B]

  def normalize(self, x_BxD, layer_B=None):
    """float32 (x - mean) / sqrt(var)."""
    xp = _xp(x_BxD)
    mean, std = self._params(xp, layer_B)
    if xp is np:   # in place on one fresh float32 copy: fresh temporaries cost more than the arithmetic
      y = np.array(x_BxD, dtype=np.float32)
      y -= mean
      y /= std
      return y
    return (xp.asarray(x_BxD).astype(xp.float32) - mean) / std

  def denormalize(self, z_BxD, layer_B=None):
    """float32 inverse: z * sqrt(var) + mean."""
    xp = _xp(z_BxD)
    mean, std = self._params(xp, layer_B)
    return xp.asarray(z_BxD).astype(xp.float32) * std + mean

  def select(self, layer: int) -> "Normalizer":
    """The [D] normaliser of one LM layer of a stacked normaliser."""
    if not self.stacked:
      return self
    # -1 marks a layer the prior does not hold, and row_of_layer[-1] would wrap: name the held layers instead.
    k = int(self.row_of_layer[layer]) if 0 <= layer < len(self.row_of_layer) else -1
    if k < 0:
      raise ValueError(f"Normalizer: LM layer {layer} is not one of its layers {self.layers}")
    return Normalizer(self.mean[k], self.var[k])

  @classmethod
  def stack(cls, normalizers, layers=None) -> "Normalizer":
    return cls(np.stack([n.mean for n in normalizers]), np.stack([n.var for n in normalizers]),
               None if layers is None else tuple(layers))

  @classmethod
  def from_store(cls, store, layers=None, which: str = "all") -> "Normalizer":
    """From an ActivationStore's statistics: [D] for one layer, [K, D] stacked for a list of layers."""
    if layers is None:
      layers = store.layers if len(store.layers) > 1 else store.layers[0]
    if isinstance(layers, (list, tuple)):
      return cls.stack([cls.from_store(store, l, which) for l in layers], layers)
    s = store.stats(layers, which)
    try:
      return cls(s["mean"], s["var"])
    except ValueError as e:
      raise ValueError(f"{store.path}: layer {layers}: {e}") from e

  def state_dict(self) -> dict:
    """{'mean', 'var'} as float32 numpy (the reference `rep_statistics.pt` layout)."""
    return {"mean": self.mean.copy(), "var": self.var.copy()}
