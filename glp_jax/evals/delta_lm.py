"""Delta LM loss (reference §4.2): how much next-token loss rises when a layer's residual stream is replaced
by the prior's on-manifold reconstruction.

For each held-out document (truncated to `max_length` tokens, right-padded in batches) the LM runs once as
is and once per intervention; layer L's output at every real position except index 0 is replaced. Index 0
is the BOS slot, as in the reference; a BOS is prepended when the tokenizer adds none, exactly as the
extractor does, so the edited positions are the kind of positions the prior was trained on. A store extracted
without a BOS (prepend_bos off, a tokenizer that adds none) trained the prior on every position, index 0
included: then no BOS is added and every position is edited (`bos=False`). Per-document
loss is the mean next-token cross-entropy over the document's real tokens; delta = mean over documents of
(loss_edited - loss_base), its standard error paired over documents.
Rows: `glp` (prior.project, start 0.5, 20 steps), `mean` (the normaliser mean: must be > 0) and `identity`
(the hook returns its input: must be exactly 0).

Differs from the reference in one quirk: the reference averages CE over all 127 positions with padded ones
counting 0 (short documents look better); here padded positions are excluded from the mean.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

# edit(hidden_BxSxD torch, edit_mask_BxS torch bool) -> new hidden_BxSxD
EditFn = Callable[..., object]


def tokenize_documents(tokenizer, texts: Sequence[str], max_length: int = 128, min_tokens: int = 3,
                       bos: bool = True) -> list[list[int]]:
  """Token ids of each text with a leading BOS (the extractor's rule; none with `bos=False`), right-truncated;
  short ones dropped."""
  from glp_jax.evals import tasks
  docs = [tasks.encode(tokenizer, t, max_length, bos=bos) for t in texts]
  return [d for d in docs if len(d) >= min_tokens]


def per_doc_loss(logits_BxSxV, input_ids_BxS, mask_BxS) -> np.ndarray:
  """Mean next-token CE per document over its real tokens: [B] float64."""
  import torch
  logp = torch.log_softmax(logits_BxSxV[:, :-1].float(), dim=-1)
  nll_BxS = -logp.gather(-1, input_ids_BxS[:, 1:, None]).squeeze(-1)
  valid = mask_BxS[:, 1:].float()
  return ((nll_BxS * valid).sum(1) / valid.sum(1).clamp(min=1)).double().cpu().numpy()


def project_edit(prior, start: float = 0.5, steps: int = 20, seed: int = 0) -> EditFn:
  """Edit that replaces the masked positions with `prior.project` of themselves. One seeded stream over all
  calls: every batch gets fresh noise (with one seed per call, document k of every batch got the same noise, and
  the documents' deltas were correlated, their SEM too small)."""
  import torch
  rng = np.random.default_rng(seed)

  def edit(h_BxSxD, mask_BxS):
    sel = h_BxSxD[mask_BxS]
    new = prior.project(sel.float().cpu().numpy(), start=start, steps=steps, rng=rng)
    out = h_BxSxD.clone()
    out[mask_BxS] = torch.as_tensor(new, dtype=h_BxSxD.dtype, device=h_BxSxD.device)
    return out
  return edit


def constant_edit(value_D: np.ndarray) -> EditFn:
  """Edit that replaces the masked positions with a fixed vector (e.g. the data mean)."""
  import torch

  def edit(h_BxSxD, mask_BxS):
    out = h_BxSxD.clone()
    out[mask_BxS] = torch.as_tensor(np.asarray(value_D), dtype=h_BxSxD.dtype, device=h_BxSxD.device)
    return out
  return edit


def identity_edit(h_BxSxD, mask_BxS):
  del mask_BxS
  return h_BxSxD


_BASE = ("base",)


def delta_lm_losses(model, tokenizer, texts: Iterable[str], layer: int, edits: dict[str, EditFn],
                    max_length: int = 128, batch_size: int = 8, bos: bool = True, cache: dict | None = None,
                    keys: dict[str, Hashable] | None = None) -> dict[str, dict]:
  """Per intervention: {delta, sem, base, edited, n_docs} (losses in nats per token). With `bos`, documents
  start with a BOS that is never edited; without, every position is.

  `cache`, a dict kept for one LM, layer, BOS rule, text list, length and batch size, holds the per-document
  losses that do not depend on the prior: the unedited forward, and each edit named in `keys` under its key
  (what it depends on, e.g. the vector it writes). The next prior then runs only its own edits."""
  import torch
  from glp_jax.torch import lm

  docs = tokenize_documents(tokenizer, list(texts), max_length, bos=bos)
  if not docs:
    raise ValueError("no document has >= 3 tokens (BOS + 2)")
  from glp_jax.evals import tasks
  cache, keys = ({} if cache is None else cache), (keys or {})
  # What this call runs, per batch: the unedited forward (`_BASE`, no edit) unless cached, then the edits.
  run = ({} if _BASE in cache else {_BASE: None}) | {
      name: fn for name, fn in edits.items() if name not in keys or keys[name] not in cache}
  device = next(model.parameters()).device
  parts = {name: [] for name in run}
  for i in range(0, len(docs) if run else 0, batch_size):
    ids, mask = (t.to(device) for t in tasks.pad(docs[i:i + batch_size], tasks.pad_id(tokenizer)))
    edit_mask = mask.bool().clone()
    if bos and tokenizer.bos_token_id is not None:   # a tokenizer with no BOS: `encode` prepends none
      edit_mask[:, 0] = False
    with torch.inference_mode():
      for name, fn in run.items():
        with (lm.edit_layer_output(model, layer, lambda h, fn=fn: fn(h, edit_mask)) if fn else
              contextlib.nullcontext()):
          logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        parts[name].append(per_doc_loss(logits, ids, mask))
  losses = {name: np.concatenate(p) for name, p in parts.items()}
  for name, key in [(_BASE, _BASE), *keys.items()]:
    if name in losses:
      cache[key] = losses[name]
  base_N = cache[_BASE]
  out = {}
  for name in edits:
    ed_N = losses[name] if name in losses else cache[keys[name]]
    diff = ed_N - base_N
    out[name] = {"delta": float(diff.mean()),
                 "sem": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
                 "base": float(base_N.mean()), "edited": float(ed_N.mean()), "n_docs": len(diff)}
  return out


def evaluate_delta_lm(prior, model, tokenizer, texts: Iterable[str], layer: int, max_length: int = 128,
                      batch_size: int = 8, start: float = 0.5, steps: int = 20, seed: int = 0,
                      bos: bool = True, cache: dict | None = None) -> dict[str, float]:
  """The flat result row: delta_lm (GLP) with SEM, and the mean / identity anchors. `cache`: see
  `delta_lm_losses` (the anchors of priors with one normaliser mean are computed once)."""
  t0 = time.time()
  mean_D = np.asarray(prior.mean_D)
  edits = {"glp": project_edit(prior, start, steps, seed), "mean": constant_edit(mean_D),
           "identity": identity_edit}
  keys = {"mean": ("mean", mean_D.dtype.str, hashlib.sha256(mean_D.tobytes()).hexdigest()),
          "identity": ("identity",)}
  res = delta_lm_losses(model, tokenizer, texts, layer, edits, max_length, batch_size, bos=bos, cache=cache,
                        keys=keys)
  return {"delta_lm": res["glp"]["delta"], "delta_lm_sem": res["glp"]["sem"],
          "delta_lm_mean": res["mean"]["delta"], "delta_lm_mean_sem": res["mean"]["sem"],
          "delta_lm_identity": res["identity"]["delta"], "lm_loss_base": res["glp"]["base"],
          "delta_lm_docs": float(res["glp"]["n_docs"]), "delta_lm_layer": float(layer),
          "delta_lm_seconds": time.time() - t0}
