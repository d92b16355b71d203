"""Steering with and without the prior's on-manifold projection (reference §4.3).

w = the unit DiffMean of last-token activations at layer L between two text sets (built offline, e.g. the
positive vs negative sentences of `tasks.sentiment_texts`). During greedy HF `generate`, the layer's output
at the last position (the last prompt token, then every new token) becomes h + alpha * w, optionally
followed by `prior.project` (start 0.5, 20 steps). alpha = r * mean activation norm, the norm estimated from
the normaliser as sqrt(sum(mean^2 + var)).

Scores of each continuation (both with the *unsteered* base LM reading prompt + continuation):
  concept  = mean over the continuation's tokens of <h_L, w>   (higher = more of the concept)
  nll      = mean per-token NLL of the continuation given the prompt   (fluency; lower = more fluent)
An optional judge (AxBench-style 0-2 concept / fluency ratings from an LLM behind an OpenAI-compatible
endpoint) is off unless `judge` is passed; nothing here touches the network otherwise.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.request
from typing import Callable, Sequence

import numpy as np

from glp_jax.util import files

log = logging.getLogger("glp_jax")
# judge(prompt, continuation, concept_description) -> (concept 0-2, fluency 0-2)
JudgeFn = Callable[[str, str, str], tuple[float, float]]


def diffmean_direction(model, tokenizer, pos_texts: Sequence[str], neg_texts: Sequence[str], layer: int,
                       bos: bool = True) -> np.ndarray:
  """Unit vector mean(h_pos) - mean(h_neg) of last-token activations at `layer`: [D] float32."""
  from glp_jax.evals import tasks
  pos = tasks.last_token_activations(model, tokenizer, pos_texts, layer, bos=bos)
  neg = tasks.last_token_activations(model, tokenizer, neg_texts, layer, bos=bos)
  w = pos.mean(0) - neg.mean(0)
  return (w / np.linalg.norm(w)).astype(np.float32)


def steer_edit(w_D: np.ndarray, alpha: float, prior=None, start: float = 0.5, steps: int = 20, seed: int = 0):
  """Layer-output edit: h[:, -1] += alpha * w, then (with a prior) h[:, -1] = prior.project(h[:, -1]).

  The edit of `glp_jax.torch.steering_edit` (positions="last"), with the numpy `Prior`'s seeded projection.
  """
  from glp_jax.torch import steering_edit
  return steering_edit(w_D, alpha, positions="last", prior=None if prior is None else _Projection(prior, seed),
                       start=start, steps=steps)


class _Projection:
  """A numpy `Prior` (JAX run or torch export) behind `GLP.sample_on_manifold`'s signature: one seeded stream,
  fresh noise at every call (every generated token), as the reference's randn per call."""

  def __init__(self, prior, seed: int):
    self.prior, self.rng = prior, np.random.default_rng(seed)

  def sample_on_manifold(self, x, start, steps, generator=None, layer_idx=None):
    import torch
    del generator, layer_idx   # the Prior draws its noise from `rng`, and is already one layer's
    return torch.as_tensor(self.prior.project(x.float().cpu().numpy(), start=start, steps=steps, rng=self.rng),
                           device=x.device)


def generate(model, tokenizer, prompts: Sequence[str], layer: int | None = None, edit=None,
             max_new_tokens: int = 20, bos: bool = True) -> list[list[int]]:
  """Greedy continuations (token ids, cut at EOS) of each prompt, with `edit` on layer `layer`'s output."""
  import contextlib
  import torch
  from glp_jax.torch import lm
  from glp_jax.evals import tasks
  # Left padding: new tokens must follow each prompt's real last token.
  ids, mask = tasks.pad([tasks.encode(tokenizer, p, bos=bos) for p in prompts], tasks.pad_id(tokenizer), left=True)
  device = next(model.parameters()).device
  ctx = lm.edit_layer_output(model, layer, edit) if edit is not None else contextlib.nullcontext()
  with ctx, torch.inference_mode():
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tasks.pad_id(tokenizer))
  # Generation ends at the tokenizer's EOS or any of the generation config's (an Instruct model's lists several,
  # e.g. Llama 3's end_of_text, eom and eot), and HF fills the rest of the row with the pad id: a real token
  # when the tokenizer has none. Cut at the first of them all, or the pads are scored as the continuation.
  gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
  stops = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])} - {None}
  conts = []
  for row in out[:, ids.shape[1]:].tolist():
    conts.append(row[:next((i for i, t in enumerate(row) if t in stops), len(row))])
  return conts


def score_continuations(model, tokenizer, prompts: Sequence[str], conts: Sequence[Sequence[int]], layer: int,
                        w_D: np.ndarray, bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(concept [N], nll [N]) of each continuation under the base LM; NaN for empty continuations."""
  import torch
  from glp_jax.torch import lm
  from glp_jax.evals import tasks
  device = next(model.parameters()).device
  concept, nll = np.full(len(prompts), np.nan), np.full(len(prompts), np.nan)
  w = torch.as_tensor(w_D, device=device)
  with lm.ResidualCapture(model, [layer], stop=False) as cap:
    for i, (p, c) in enumerate(zip(prompts, conts)):
      if not c:
        continue
      pid = tasks.encode(tokenizer, p, bos=bos)
      ids = torch.as_tensor([pid + list(c)], device=device)
      cap.outputs = {}
      with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
      h_SxD = cap.outputs[layer][0].float()
      n = len(pid)
      concept[i] = float((h_SxD[n:] @ w).mean())
      logp = torch.log_softmax(logits[n - 1:-1], -1)
      nll[i] = float(-logp.gather(-1, ids[0, n:, None]).mean())
  return concept, nll


def evaluate_steering(prior, model, tokenizer, layer: int, pos_texts: Sequence[str], neg_texts: Sequence[str],
                      prompts: Sequence[str], rs: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0),
                      max_new_tokens: int = 20, start: float = 0.5, steps: int = 20, seed: int = 0,
                      judge: JudgeFn | None = None, concept_name: str = "positive sentiment",
                      plot_path: str | None = None, bos: bool = True,
                      direction: np.ndarray | None = None,
                      plain_cache: dict | None = None) -> tuple[dict[str, float], list[dict]]:
  """Concept and fluency over the r grid, plain and with the prior: (flat metrics, one row per point).

  Also draws the frontier PNG when `plot_path` is given. `bos`: prompts start with a BOS, as the prior's store
  documents did (`tasks.encode`). `direction`: the concept's `diffmean_direction` when already computed.
  `plain_cache`: a dict (one per LM) that keeps the plain steering's continuations and scores, which depend on
  the prior only through the activation norm, for the next prior evaluated in this process.
  """
  t0 = time.time()
  if not prompts or not pos_texts or not neg_texts:
    raise ValueError(f"steering needs prompts and both concept sets; got {len(prompts)} prompts, "
                     f"{len(pos_texts)} positive and {len(neg_texts)} negative texts")
  w = diffmean_direction(model, tokenizer, pos_texts, neg_texts, layer, bos=bos) if direction is None else direction
  norm = prior.act_norm
  out: dict[str, float] = {"steer_act_norm": norm, "steer_layer": float(layer),
                           "steer_num_prompts": float(len(prompts))}
  rows = []
  for mode, p in (("add", None), ("glp", prior)):
    for r in rs:
      def run(r=r, p=p):
        conts = generate(model, tokenizer, prompts, layer, steer_edit(w, r * norm, p, start, steps, seed),
                         max_new_tokens, bos=bos)
        return conts, *score_continuations(model, tokenizer, prompts, conts, layer, w, bos=bos)
      if p is None and plain_cache is not None:
        memo = (float(r * norm), tuple(prompts), max_new_tokens, layer, bos, w.tobytes())
        if memo not in plain_cache:
          plain_cache[memo] = run()
        conts, concept, nll = plain_cache[memo]
      else:
        conts, concept, nll = run()
      key = f"steer_{mode}_r{r:g}"
      empty = sum(1 for c in conts if not c)
      out[key + "_empty"] = float(empty)
      if empty:   # an EOS first: nothing to score, so the means below are over fewer prompts
        log.warning("steer: %s r=%g: %d of %d continuations are empty; their concept/NLL are left out of the "
                    "means (recorded as %s_empty)", mode, r, empty, len(conts), key)
      out[key + "_concept"], out[key + "_nll"] = float(np.nanmean(concept)), float(np.nanmean(nll))
      out[key + "_concept_sem"] = float(np.nanstd(concept, ddof=1) / np.sqrt(np.isfinite(concept).sum()))
      if judge is not None:
        scores = np.array([judge(pr, tokenizer.decode(c), concept_name) for pr, c in zip(prompts, conts)], float)
        # A reply without "Rating: [[n]]" is NaN (`parse_rating`): left out of the means, counted, not a NaN mean.
        unparsed = int((~np.isfinite(scores)).any(1).sum())
        out[key + "_judge_unparsed"] = float(unparsed)
        if unparsed:
          log.warning("steer: %s r=%g: %d of %d judge replies had no rating; left out of the judge means "
                      "(recorded as %s_judge_unparsed)", mode, r, unparsed, len(conts), key)
        out[key + "_judge_concept"], out[key + "_judge_fluency"] = (
            float(np.nanmean(col)) if np.isfinite(col).any() else float("nan") for col in scores.T)
      rows.append({"mode": mode, "r": r, "concept": out[key + "_concept"], "nll": out[key + "_nll"],
                   "example": tokenizer.decode(conts[0])})
  # Reference: the positive-concept runs with |r| > 1. Here r < 0 steers away from the concept (<h, w> < 0):
  # averaged in, it would cancel the r > 1 gains.
  big = [r for r in rs if r > 1.0] or [r for r in rs if r > 0] or list(rs)
  for mode in ("add", "glp"):   # the summaries the scaling collector reads
    out[f"steer_{mode}_concept"] = float(np.mean([out[f"steer_{mode}_r{r:g}_concept"] for r in big]))
    out[f"steer_{mode}_nll"] = float(np.mean([out[f"steer_{mode}_r{r:g}_nll"] for r in big]))
    if 0.0 in rs:   # relative to unsteered generation: what the scaling plots use
      out[f"steer_{mode}_concept_gain"] = out[f"steer_{mode}_concept"] - out["steer_add_r0_concept"]
      out[f"steer_{mode}_nll_increase"] = out[f"steer_{mode}_nll"] - out["steer_add_r0_nll"]
  out["steer_seconds"] = time.time() - t0
  if plot_path:
    plot_frontier(rows, plot_path)
  return out, rows


def plot_frontier(rows: list[dict], path: str) -> str:
  """Concept vs NLL, one line per mode, points labelled with r."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 4))
  for mode, label in (("add", "add alpha*w"), ("glp", "add alpha*w + GLP projection")):
    pts = [r for r in rows if r["mode"] == mode]
    ax.plot([p["nll"] for p in pts], [p["concept"] for p in pts], "o-", label=label)
    for p in pts:
      ax.annotate(f"r={p['r']:g}", (p["nll"], p["concept"]), fontsize=7)
  ax.set_xlabel("continuation NLL under the base LM (lower = more fluent)")
  ax.set_ylabel("concept score <h, w>")
  ax.legend(fontsize=8)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path


# --- optional LLM judge (AxBench-style 0-2 ratings) ------------------------------------------------------

_CONCEPT_PROMPT = ("Rate how strongly the text below expresses the concept \"{concept}\".\n"
                   "0 = not at all, 1 = somewhat, 2 = clearly and strongly.\n\nText: {text}\n\n"
                   "Explain briefly, then end with \"Rating: [[score]]\".")
_FLUENCY_PROMPT = ("Rate the fluency of the continuation below (grammar, coherence with the start).\n"
                   "0 = broken or repetitive, 1 = somewhat fluent, 2 = fully fluent.\n\nStart: {prompt}\n"
                   "Continuation: {text}\n\nExplain briefly, then end with \"Rating: [[score]]\".")


def parse_rating(reply: str) -> float:
  """The last 'Rating: [[n]]' in a judge reply (NaN when absent)."""
  found = re.findall(r"Rating:\s*\[\[\s*([0-9.]+)\s*\]\]", reply)
  return float(found[-1]) if found else float("nan")


def openai_judge(model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0
                 ) -> JudgeFn:
  """A judge calling an OpenAI-compatible /chat/completions endpoint; used only when explicitly configured."""
  key = os.environ.get(api_key_env)
  if not key:
    raise ValueError(f"the judge needs an API key in ${api_key_env}")

  def ask(content: str) -> str:
    body = json.dumps({"model": model, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=body,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
      return json.load(resp)["choices"][0]["message"]["content"]

  def judge(prompt: str, continuation: str, concept: str) -> tuple[float, float]:
    c = parse_rating(ask(_CONCEPT_PROMPT.format(concept=concept, text=prompt + continuation)))
    f = parse_rating(ask(_FLUENCY_PROMPT.format(prompt=prompt, text=continuation)))
    return c, f
  return judge
