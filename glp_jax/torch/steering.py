"""Activation steering from PyTorch, optionally projected onto a prior's manifold (torch only).

  with steer(model, 7, w_D, alpha=8.0, positions="last", prior=glp):
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)

`steer` registers a forward hook on decoder layer 7 (found with `glp_jax.torch.lm.decoder_layers`) or on
any module you pass (e.g. a TransformerLens `hook_resid_post`). The hook adds `alpha * w` at the chosen
positions of every forward and, with a prior, replaces the edited positions by
`prior.sample_on_manifold(...)` (the reference's steering: DiffMean, then activation SDEdit).
`steering_edit` is the same edit as a plain function `h_BxSxD -> h_BxSxD`, for hook systems of other
libraries (TransformerLens `model.hooks`, nnsight). Walk-through: docs/steering.md.

Positions are counted within each forward call. During cached generation the first forward holds the prompt
and every later one a single new token, so "last" steers the last prompt token and then every generated
token; explicit indices address the prompt's forward (never a one-token one) and masks the forwards of their
length (usually the prompt's).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from torch import nn

from glp_jax.torch import hooks, lm

# None / "all": every position; "last": the last one; an int, ints or an int tensor: those indices of the
# sequence axis (negative from the end); a bool tensor [S] or [B, S]: where it is True.
Positions = Union[None, str, int, Sequence[int], torch.Tensor]


def position_mask(positions: Positions, lead_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
  """Bool mask over the leading dims ([..., S]) of a hidden state; None means every position.

  Indices outside [-S, S) and masks of another length select nothing in that forward, and indices select
  nothing in a one-token forward (a cached generation step: index 0 or -1 would be every new token).
  """
  if positions is None or (isinstance(positions, str) and positions == "all"):
    return None
  mask = torch.zeros(lead_shape, dtype=torch.bool, device=device)
  s = lead_shape[-1]
  if isinstance(positions, str):
    if positions != "last":
      raise ValueError(f"positions: expected 'all', 'last', indices or a bool mask, got {positions!r}")
    mask[..., -1] = True
    return mask
  pos = torch.as_tensor(positions, device=device)
  if pos.dtype == torch.bool:
    if pos.shape[-1] != s:
      return mask  # a mask for another sequence length (e.g. the prompt's, during cached decoding)
    return mask | pos.broadcast_to(lead_shape)
  if pos.is_floating_point():
    raise ValueError(f"positions: indices must be integers, got dtype {pos.dtype}")
  if s == 1:   # a KV-cached step of `generate`: indices address the prompt's forward (docs/steering.md)
    return mask
  pos = pos.reshape(-1)
  pos = pos[(pos >= -s) & (pos < s)]
  mask[..., pos] = True
  return mask


def steering_edit(direction: Any, alpha: float, positions: Positions = None, prior: Any = None,
                  start: float = 0.5, steps: int = 20, generator: torch.Generator | None = None,
                  layer_idx: Any = None):
  """The edit `h -> h + alpha * direction` at `positions`, then (with `prior`) onto its manifold.

  `direction` is a [D] tensor or array (used as given: normalise it yourself if alpha should be a norm);
  `prior` is a `glp_jax.torch.GLP` (anything with `sample_on_manifold(x, start, steps, generator=...,
  layer_idx=...)`). The sum is formed in at least float32 and cast back to the hidden state's dtype, so
  alpha = 0 without a prior returns the input values exactly. Returns `edit(h_[B]xSxD) -> same shape`.
  """
  w_D = torch.as_tensor(np.asarray(direction) if not torch.is_tensor(direction) else direction)
  if w_D.ndim != 1:
    raise ValueError(f"direction: expected a [D] vector, got shape {tuple(w_D.shape)}")
  d = w_D.shape[0]
  if prior is not None and getattr(getattr(prior, "cfg", None), "d_input", d) != d:
    raise ValueError(f"direction has D={d}, the prior models D={prior.cfg.d_input}")

  def shift(x_NxD: torch.Tensor) -> torch.Tensor:
    work = torch.promote_types(x_NxD.dtype, torch.float32)
    x = x_NxD.to(work) + float(alpha) * w_D.to(device=x_NxD.device, dtype=work)
    if prior is not None:
      x = prior.sample_on_manifold(x, start, steps, generator=generator, layer_idx=layer_idx)
    return x.to(x_NxD.dtype)

  def edit(h: torch.Tensor) -> torch.Tensor:
    if h.shape[-1] != d:
      raise ValueError(f"steering a hidden state of width {h.shape[-1]} with a direction of D={d}")
    if h.ndim < 2:
      raise ValueError(f"expected a hidden state [..., S, D], got shape {tuple(h.shape)}")
    mask = position_mask(positions, h.shape[:-1], h.device)
    if mask is None:
      return shift(h)
    out = h.clone()  # never in place: whatever else holds the layer's output keeps the original
    if bool(mask.any()):
      out[mask] = shift(h[mask])
    return out
  return edit


def _decoder_layer(model: nn.Module, layer: int) -> nn.Module:
  (layer,) = lm.check_layers(model, [layer])
  return lm.decoder_layers(model)[layer]


@contextlib.contextmanager
def steer(model: nn.Module, layer: int | nn.Module, direction: Any, alpha: float, positions: Positions = None,
          prior: Any = None, start: float = 0.5, steps: int = 20, generator: torch.Generator | None = None,
          layer_idx: Any = None) -> Iterator[nn.Module]:
  """Within the block, `layer`'s output is steered by `steering_edit(direction, alpha, positions, prior, ...)`.

  `layer` is a decoder-layer index of `model` (any HF causal LM `decoder_layers` knows; the residual stream
  after that block) or a module to hook directly (then `model` is not used). Works whether the module
  returns a tensor (transformers 5.x decoder layers, TransformerLens hook points) or a tuple. For a
  multi-layer prior `layer_idx` defaults to the decoder-layer index. Yields the hooked module.
  """
  module = layer if isinstance(layer, nn.Module) else _decoder_layer(model, layer)
  if (layer_idx is None and prior is not None and not isinstance(layer, nn.Module)
      and getattr(getattr(prior, "cfg", None), "multi_layer_n_layers", None)):
    layer_idx = int(layer)
  with hooks.edit_output(module, steering_edit(direction, alpha, positions, prior, start, steps, generator,
                                               layer_idx)):
    yield module
