"""Binary probing tasks and steering concepts, built offline; plus a loader for SAE-Probes CSV files.

Built-in tasks come from templates over small word lists (deterministic given the seed) and from Python's
own documentation (`pydoc_data.topics`, present in every interpreter), so the suite needs no download:
  sentiment        "The film was wonderful." vs "... dreadful."        (label 1 = positive)
  animal_vehicle   sentences about animals vs vehicles                (1 = animal)
  question         questions vs statements on the same nouns          (1 = question)
  tense            past vs present tense                               (1 = past)
  code_prose       code blocks vs prose paragraphs of the Python docs        (1 = code)
`load_sae_probes_csv(path)` reads one SAE-Probes dataset (columns `prompt`, `target`); a folder gives all
its CSVs. Activations for probing are the LM's last-token residual at one layer (`last_token_activations`).
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import random
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  texts: tuple[str, ...]
  labels: np.ndarray  # [N] bool


_NOUNS = ("film", "meal", "book", "hotel", "concert", "trip", "game", "service", "show", "class", "party",
          "lecture", "song", "play", "visit", "interview", "product", "weekend", "holiday", "dinner")
_POS = ("wonderful", "delightful", "excellent", "fantastic", "lovely", "brilliant", "superb", "amazing",
        "joyful", "charming", "great", "pleasant")
_NEG = ("dreadful", "awful", "terrible", "horrible", "miserable", "disappointing", "boring", "painful",
        "disgusting", "unpleasant", "bad", "depressing")
_SENT_TEMPLATES = ("The {n} was {a}.", "I thought the {n} was {a}.", "Honestly, the {n} felt {a}.",
                   "Everyone agreed that the {n} was {a}.", "What a {a} {n} it was.", "Our {n} turned out {a}.")
_ANIMALS = ("dog", "cat", "horse", "rabbit", "fox", "owl", "deer", "wolf", "bear", "goat", "sheep", "eagle")
_VEHICLES = ("car", "truck", "bus", "train", "bicycle", "motorcycle", "tractor", "van", "taxi", "tram",
             "scooter", "lorry")
_PLACES = ("near the river", "by the old barn", "on the hill", "in the village", "at the edge of town",
           "behind the school", "along the road", "in the park")
_TOPIC_TEMPLATES = ("I saw a {x} {p}.", "There was a {x} {p} this morning.", "A {x} stood {p}.",
                    "We noticed the {x} {p}.", "Someone pointed at a {x} {p}.")
_QUESTION = ("Where is the {n}?", "Did you like the {n}?", "When does the {n} start?", "Why was the {n} late?",
             "Who planned the {n}?", "How long is the {n}?")
_STATEMENT = ("The {n} is over there.", "You liked the {n}.", "The {n} starts at noon.", "The {n} was late.",
              "Anna planned the {n}.", "The {n} is two hours long.")
_SUBJECTS = ("my sister", "the teacher", "our neighbour", "the old man", "a student", "the manager", "my friend",
             "the driver")
_VERBS = (("walks", "walked"), ("cooks", "cooked"), ("paints", "painted"), ("writes", "wrote"),
          ("sings", "sang"), ("runs", "ran"), ("reads", "read"), ("drives", "drove"), ("works", "worked"),
          ("plays", "played"))
_TAILS = ("every day.", "in the garden.", "before lunch.", "with great care.", "at the weekend.", "quietly.")


def _balanced(name: str, pos: Sequence[str], neg: Sequence[str], n: int, seed: int) -> Task:
  rng = random.Random(seed)
  pos, neg = sorted(set(pos)), sorted(set(neg))
  k = min(n // 2, len(pos), len(neg))
  items = [(t, True) for t in rng.sample(pos, k)] + [(t, False) for t in rng.sample(neg, k)]
  rng.shuffle(items)
  return Task(name, tuple(t for t, _ in items), np.array([l for _, l in items], bool))


def sentiment_texts() -> tuple[list[str], list[str]]:
  """(positive, negative) sentences; also the steering concept sets."""
  pos = [t.format(n=n, a=a) for t, n, a in itertools.product(_SENT_TEMPLATES, _NOUNS, _POS)]
  neg = [t.format(n=n, a=a) for t, n, a in itertools.product(_SENT_TEMPLATES, _NOUNS, _NEG)]
  return pos, neg


def _code_prose_blocks() -> tuple[list[str], list[str]]:
  """(code, prose) paragraphs of the Python help topics: indented blocks with code punctuation vs flush text."""
  from pydoc_data import topics
  code, prose = [], []
  for text in topics.topics.values():
    for block in text.split("\n\n"):
      lines = [l for l in block.splitlines() if l.strip()]
      if not lines:
        continue
      body = "\n".join(l.rstrip() for l in lines)[:200]
      wordy = sum(c.isalpha() or c == " " for c in body) / len(body)   # prose-like share of characters
      if all(l.startswith("   ") for l in lines) and wordy < 0.8 and len(body) >= 15:
        code.append(body)
      elif not any(l.startswith(" ") for l in lines) and len(body) >= 80 and body[0].isupper():
        prose.append(body)
  return code, prose


def builtin_tasks(n_per_task: int = 400, seed: int = 0, names: Sequence[str] | None = None) -> list[Task]:
  """The offline binary tasks (balanced, <= n_per_task examples each)."""
  makers = {
      "sentiment": lambda: sentiment_texts(),
      "animal_vehicle": lambda: (
          [t.format(x=x, p=p) for t, x, p in itertools.product(_TOPIC_TEMPLATES, _ANIMALS, _PLACES)],
          [t.format(x=x, p=p) for t, x, p in itertools.product(_TOPIC_TEMPLATES, _VEHICLES, _PLACES)]),
      "question": lambda: ([t.format(n=n) for t, n in itertools.product(_QUESTION, _NOUNS)],
                           [t.format(n=n) for t, n in itertools.product(_STATEMENT, _NOUNS)]),
      "tense": lambda: (
          [f"{s.capitalize()} {v[1]} {t}" for s, v, t in itertools.product(_SUBJECTS, _VERBS, _TAILS)],
          [f"{s.capitalize()} {v[0]} {t}" for s, v, t in itertools.product(_SUBJECTS, _VERBS, _TAILS)]),
      "code_prose": _code_prose_blocks,
  }
  names = list(makers) if names is None else list(names)
  unknown = [n for n in names if n not in makers]
  if unknown:
    raise ValueError(f"unknown built-in task(s) {unknown}; known: {sorted(makers)}")
  return [_balanced(name, *makers[name](), n_per_task, seed + i) for i, name in enumerate(names)]


def neutral_prompts() -> list[str]:
  """Short neutral prefixes for steering (no sentiment words)."""
  return ["The weather today", "My neighbour told me that", "Yesterday we went to the", "The report says",
          "In the morning I usually", "The train to the city", "At the meeting, the manager",
          "She opened the box and", "The history of the town", "When I think about the"]


def load_sae_probes_csv(path: str, text_column: str = "prompt", label_column: str = "target",
                        max_rows: int = 0) -> list[Task]:
  """SAE-Probes datasets: one CSV (or every *.csv in a folder) with a text and a binary label column.

  Labels may be 0/1, booleans or any two distinct strings (sorted; the second is the positive class).
  `max_rows` > 0 keeps a seeded random sample of that many rows per file.
  """
  files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".csv")) \
      if os.path.isdir(path) else [path]
  if not files:
    raise FileNotFoundError(f"no .csv files in {path!r}")
  tasks = []
  for file in files:
    with open(file, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
      if missing:
        raise KeyError(f"{file}: missing column(s) {missing}; has {reader.fieldnames}")
      rows = [(r[text_column], r[label_column].strip()) for r in reader if r[text_column]]
    if max_rows and len(rows) > max_rows:   # a seeded sample, not the first rows: a CSV may be sorted by label
      rows = [rows[i] for i in np.sort(np.random.default_rng(0).choice(len(rows), max_rows, replace=False))]
    values = sorted({lab for _, lab in rows})
    if len(values) != 2:
      raise ValueError(f"{file}: label column {label_column!r} has {len(values)} distinct values, need 2")
    positive = "1" if set(values) == {"0", "1"} else ("True" if set(values) == {"False", "True"} else values[1])
    name = os.path.splitext(os.path.basename(file))[0]
    tasks.append(Task(name, tuple(t for t, _ in rows), np.array([lab == positive for _, lab in rows], bool)))
  return tasks


def encode(tokenizer, text: str, max_length: int = 128, keep_end: bool = False, bos: bool = True) -> list[int]:
  """Token ids with a leading BOS, as the extractor feeds documents (BOS prepended when the tokenizer adds
  none), truncated to `max_length` tokens in all: the text's first tokens, or with `keep_end` its last ones
  (what a last-token probe reads). `bos=False` for a store whose documents started without one (extracted with
  prepend_bos off from a tokenizer that adds none: `prior.leads_with_bos`): the text's tokens alone."""
  bos = tokenizer.bos_token_id if bos else None
  # Cut by the tokenizer when the start is kept (one spare token: it may add a BOS of its own).
  ids = list(tokenizer(text, truncation=not keep_end, max_length=None if keep_end else max_length + 1)["input_ids"])
  if bos is not None and ids and ids[0] == bos:
    ids = ids[1:]
  room = max_length - (bos is not None)
  ids = ids[len(ids) - room:] if keep_end and len(ids) > room else ids[:room]
  return ([bos] if bos is not None else []) + ids


def pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False):
  """(input_ids_BxS, attention_mask_BxS) torch int64, padded on the right (or left, for generation)."""
  import torch
  s = max(len(q) for q in seqs)
  ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
  mask = torch.zeros((len(seqs), s), dtype=torch.long)
  for i, q in enumerate(seqs):
    sl = slice(s - len(q), s) if left else slice(0, len(q))
    ids[i, sl], mask[i, sl] = torch.as_tensor(list(q), dtype=torch.long), 1
  return ids, mask


def pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _mlp_down_proj(model, layer: int):
  """The LM layer's MLP down-projection (its input = the MLP neurons), or None when it cannot be found."""
  from glp_jax.torch import lm
  block = lm.decoder_layers(model)[layer]
  # Llama-likes, GPT-2/StarCoder2, NeoX/Falcon/Bloom, OPT, Phi-1/2, GPT-J/CodeGen, MPT
  for path in ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2", "mlp.fc2", "mlp.fc_out",
               "ffn.down_proj"):
    obj = block
    for part in path.split("."):
      obj = getattr(obj, part, None)
    if obj is not None:
      return obj
  return None


def last_token_activations(model, tokenizer, texts: Sequence[str], layer: int, batch_size: int = 32,
                           max_length: int = 512, mlp_neurons: bool = False, bos: bool = True):
  """The residual stream after decoder layer `layer` at each text's last token: [N, D] float32. A text longer
  than `max_length` tokens keeps its end (the token read), after the BOS (`bos`: see `encode`).

  With `mlp_neurons`, returns (residual [N, D], MLP neurons [N, F] or None): the input of that layer's MLP
  down-projection at the same token (the reference's "raw MLP neuron" baseline).
  """
  import torch
  from glp_jax.torch import lm
  device = next(model.parameters()).device
  down = _mlp_down_proj(model, layer) if mlp_neurons else None
  seen = []
  handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) if down is not None else None
  out, mlp = [], []
  try:
    with lm.ResidualCapture(model, [layer]) as cap:
      for i in range(0, len(texts), batch_size):
        ids, mask = pad([encode(tokenizer, t, max_length, keep_end=True, bos=bos) for t in texts[i:i + batch_size]],
                         pad_id(tokenizer))
        seen.clear()
        h_BxSxD = cap.run(input_ids=ids.to(device), attention_mask=mask.to(device))[layer]
        rows, last = torch.arange(len(ids), device=device), (mask.sum(1) - 1).to(device)
        out.append(h_BxSxD[rows, last].float().cpu().numpy())
        if seen:
          mlp.append(seen[-1][rows, last].float().cpu().numpy())
  finally:
    if handle is not None:
      handle.remove()
  resid = np.concatenate(out)
  if not mlp_neurons:
    return resid
  return resid, (np.concatenate(mlp) if mlp else None)
