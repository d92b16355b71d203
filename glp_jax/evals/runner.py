"""The evaluations behind `glp-eval`, callable from Python: `evaluate(name, prior, store=None, out=None, **opts)`.

Each evaluation writes one flat `{key: float}` JSON object to `<out>/eval_<name>.json` (see `glp_jax.evals.cli`
for the keys); `Options` holds every setting with its default, and the CLI's flags are made from it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from glp_jax.evals import fd as fd_lib
from glp_jax.evals import prior as prior_lib
from glp_jax.util import files
from glp_jax.util.errors import ConfigError

NAMES = ("fd", "delta_lm", "steer", "probe")
log = logging.getLogger("glp_jax")


def _opt(default, help_text):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class Options:
  """Every evaluation setting (the CLI's flags, by the same names)."""
  prior: str = _opt("", "glp_jax run dir, exported prior folder or Hub repo id (org/name); several, "
                    "comma-separated, are evaluated in one process (evaluate_priors).")
  revision: str | None = _opt(None, "Branch, tag or commit when --prior is a Hub repo id.")
  step: int | None = _opt(None, "Checkpoint step of a run dir (default: latest).")
  out: str | None = _opt(None, "Where eval_<name>.json goes (default: the prior folder; required for a Hub repo id).")
  store: str | None = _opt(None, "Activation store (default: the run config's data.store).")
  lm: str | None = _opt(None, "LM name/folder (default: the store's model).")
  layer: int | None = _opt(None, "LM layer the prior models (default: the store's layer).")
  lm_dtype: str = _opt("float32", "LM forward dtype: float32 | bfloat16 | auto (--quick uses auto: "
                        "lm.resolve_dtype).")
  device: str = _opt("auto", "Device of the LM and of an exported (torch) prior: auto | cpu | cuda.")
  quick: bool = _opt(False, "Smoke-test sizes (seconds to minutes on CPU).")
  seed: int = _opt(42, "Seed for samples, noise and splits.")
  num_samples: int = _opt(50_000, "fd: samples per side (capped at half the held-out rows).")
  steps: int = _opt(1000, "fd: Euler steps.")
  fd_method: str = _opt("eigh", f"fd: matrix square-root route, one of {fd_lib.METHODS}.")
  heldout_rows: int | None = _opt(None, "fd: held-out rows at the store's end (a streaming run's: its start), for "
                                  "stores without a held-out split (default: run config).")
  num_docs: int = _opt(256, "delta_lm: held-out documents.")
  max_length: int = _opt(128, "delta_lm: tokens per document.")
  batch_size: int = _opt(8, "delta_lm: documents per forward.")
  start: float = _opt(0.5, "On-manifold start (reference u; 0.5 -> sigma ~0.474).")
  manifold_steps: int = _opt(20, "On-manifold grid length.")
  rs: tuple[str, ...] = _opt(("0", "0.25", "0.5", "1", "2"), "steer: alpha / mean activation norm grid.")
  max_new_tokens: int = _opt(20, "steer: greedy tokens per continuation.")
  num_prompts: int = _opt(10, "steer: neutral prompts.")
  judge_model: str = _opt("", "steer: LLM judge model name (off when empty; needs --judge_url).")
  judge_url: str = _opt("", "steer: OpenAI-compatible base URL of the judge.")
  tasks: str = _opt("builtin", "probe: 'builtin' or an SAE-Probes CSV file/folder.")
  sigmas: tuple[str, ...] = _opt(("0.1", "0.5"), "probe: noise levels of the meta-neuron forward.")
  top_k: int = _opt(512, "probe: features kept by class-mean difference.")
  n_per_task: int = _opt(400, "probe: examples per built-in task / max rows per CSV task.")


def resolve_prior(prior: str, revision: str | None = None) -> str:
  """A local run dir or prior folder as given; a Hub repo id fetched into the Hub cache (torch side)."""
  if files.exists(prior) and revision is None:
    return prior
  from glp_jax.torch import hub   # only for repo ids: a run dir must evaluate without torch
  return hub.resolve(prior, revision)


def _run_config(path: str) -> dict:
  return files.read_json(os.path.join(path, "config.json"), {})


def _cfg(config: dict, *keys, default=None):
  for k in keys:
    if not isinstance(config, dict) or k not in config:
      return default
    config = config[k]
  return config


class Context:
  """The prior plus the LM side it belongs to, resolved once per invocation. `shared` holds what does not
  depend on the prior (the loaded LM, the probe tasks' LM activations, the steering direction and the plain
  steering, the held-out texts): the priors of one `evaluate_priors` call pass the same dict, so a sweep's priors
  load the LM and run those forwards once."""

  def __init__(self, opts: Options, shared: dict | None = None):
    self.opts = opts
    self.shared = {} if shared is None else shared
    self.path = resolve_prior(opts.prior, opts.revision)
    self.config = _run_config(self.path) if prior_lib.is_run_dir(self.path) else {}
    prov = prior_lib.export_provenance(self.path)
    imported = files.read_json(os.path.join(self.path, "imported_from.json")) if self.config else None
    if imported:   # a glp-import run: it was trained elsewhere, on what its source folder says
      prov = dict(imported.get("source_provenance") or {}, lm=imported.get("model_name"))
      if prov.get("layer") is None and int(_cfg(self.config, "data", "layer", default=-1)) >= 0:
        prov["layer"] = int(self.config["data"]["layer"])
    self.store = opts.store or _cfg(self.config, "data", "store") or prov.get("store")
    if not self.store and self.config and not imported:  # trained on the embedded default store (data.store="")
      from glp_jax.training.input import default_store
      self.store = default_store()
    if self.store and not opts.store and not files.exists(os.path.join(self.store, "manifest.json")):
      # A recorded path from the machine that trained or exported it (a downloaded or copied prior): probe,
      # steer and delta_lm need only the LM (--lm, --layer); fd says it needs --store.
      log.warning("the prior's recorded store %s is not reachable here: evaluating without it (pass --store "
                  "for fd, --lm and --layer if they are not recorded)", self.store)
      self.store = None
    # The layer the prior was trained on: a run's config, else an export's (or an imported run's source's)
    # provenance (the store alone would answer with its first). A multi-layer prior models several: load_prior
    # refuses one without --layer.
    hint = _cfg(self.config, "data", "layer") if self.config and not imported else prov.get("layer")
    hint = hint if isinstance(hint, int) else None
    info = prior_lib.lm_info_from_store(self.store, hint) if self.store else {}
    self.lm_name = opts.lm or info.get("lm") or prov.get("lm")
    self.layer = opts.layer if opts.layer is not None else info.get("layer", prov.get("layer"))
    # Whether the prior's documents began with a BOS: evaluations feed text the same way. The store says; out of
    # its reach, what the export or the run's checkpoint recorded of it; recorded nowhere (older runs): they did.
    if "bos" not in info and "bos" not in prov and prior_lib.is_run_dir(self.path):
      from glp_jax.training.prior import checkpoint_step   # JAX: run dirs load it anyway
      prov["bos"] = checkpoint_step(self.path, opts.step)[1].get("identity", {}).get("store", {}).get("bos")
    self.bos = info.get("bos", prov.get("bos") is not False)
    self.prior = prior_lib.load_prior(self.path, opts.step, opts.layer, opts.device)
    if self.store:   # a prior of another width would fail only after minutes of sampling
      from glp_jax.data.store import ActivationStore
      st = ActivationStore.open(self.store)
      st.check_files()
      width = st.d
      if width != self.prior.d:
        raise ConfigError(f"the prior {opts.prior} models activations of width {self.prior.d}, but the store "
                          f"{self.store} holds width {width}: pass the store it was trained on (--store)")
    self._lm, self._lm_id = None, ()

  def lm(self):
    opts = self.opts
    if self._lm is None:
      from glp_jax.torch import lm
      if not self.lm_name or self.layer is None:
        raise ConfigError("cannot tell which LM/layer this prior models: pass --store or --lm and --layer")
      dtype = "auto" if opts.quick else opts.lm_dtype   # auto: bf16 where this CPU has native bf16 (~3x faster)
      self._lm_id = (self.lm_name, dtype, opts.device)
      self._lm = self.share(("lm", *self._lm_id),
                            lambda: lm.load_causal_lm(self.lm_name, dtype=dtype, device=opts.device))
    return self._lm

  def lm_key(self) -> tuple:
    """What an LM-side result depends on besides its own inputs: the LM as loaded, the layer, the BOS rule."""
    self.lm()
    return (*self._lm_id, self.layer, self.bos)

  def share(self, key: tuple, make):
    """`make()`, computed once per `shared` dict for `key`."""
    if key not in self.shared:
      self.shared[key] = make()
    return self.shared[key]


def run_fd(ctx: Context) -> dict:
  opts = ctx.opts
  from glp_jax.data import store as store_lib
  if not ctx.store:
    raise ConfigError("fd needs real activations: pass --store")
  st = store_lib.ActivationStore.open(ctx.store)
  if st.has_heldout_docs:   # the held-out documents: never trained on, never in the statistics
    real = fd_lib.StoreRows(st, ctx.layer, heldout=True)
  else:                      # a v1 store: the rows its run's loader held out
    from glp_jax.data.loader import v1_heldout_rows
    n_held = min(opts.heldout_rows or _cfg(ctx.config, "data", "heldout_rows", default=4096), st.num_rows)
    rows = v1_heldout_rows(st, n_held, streaming=bool(_cfg(ctx.config, "data", "streaming", default=False)))
    real = fd_lib.StoreRows(st, ctx.layer, heldout=False, rows=rows)
  n, steps = (1024, 100) if opts.quick else (opts.num_samples, opts.steps)
  return fd_lib.evaluate_fd(ctx.prior, real, num_samples=n, steps=steps, seed=opts.seed,
                            method=opts.fd_method)   # warns (and records it) when n is too small for D


def _heldout_texts(ctx: Context, n: int) -> list[str]:
  from glp_jax.extraction import corpus as corpus_lib
  from glp_jax.data import store as store_lib
  desc = store_lib.ActivationStore.open(ctx.store).metadata.get("corpus", {}) if ctx.store else {}
  held = desc.get("heldout", {})
  if not desc.get("source"):
    log.warning("delta_lm: %s records no corpus (not written by glp-extract): scoring held-out documents of the "
                "embedded Python-docs corpus", ctx.store or "no store")
  source = desc.get("source", corpus_lib.EMBEDDED)
  if desc.get("revision"):   # an hf: store: its texts at the commit it was extracted from, not today's main
    source += "@" + desc["revision"]
  corpus = corpus_lib.Corpus(source, text_field=desc.get("text_field", "text"),
                             txt_mode=desc.get("txt_mode", "file"), seed=held.get("seed", desc.get("seed", 0)),
                             heldout_fraction=held.get("fraction", 0.05), max_docs=n)
  return [d.text for d in corpus.heldout()]


def run_delta_lm(ctx: Context) -> dict:
  opts = ctx.opts
  from glp_jax.evals import delta_lm
  model, tok = ctx.lm()
  n, length = (8, 48) if opts.quick else (opts.num_docs, opts.max_length)
  texts = ctx.share(("heldout_texts", ctx.store, n), lambda: _heldout_texts(ctx, n))
  anchors = ctx.share(("delta_lm_anchors", *ctx.lm_key(), tuple(texts), length, opts.batch_size), dict)
  return delta_lm.evaluate_delta_lm(ctx.prior, model, tok, texts, ctx.layer, length, opts.batch_size,
                                    opts.start, opts.manifold_steps, opts.seed, bos=ctx.bos, cache=anchors)


def run_steer(ctx: Context, out_dir: str) -> dict:
  opts = ctx.opts
  from glp_jax.evals import steer, tasks
  model, tok = ctx.lm()
  pos, neg = tasks.sentiment_texts()
  quick = opts.quick
  rs = (0.0, 0.2, 0.5) if quick else tuple(float(r) for r in opts.rs)
  judge = steer.openai_judge(opts.judge_model, opts.judge_url) if opts.judge_model else None
  wanted = 2 if quick else opts.num_prompts
  prompts = tasks.neutral_prompts()[:wanted]
  if len(prompts) < wanted:
    log.warning("steer: --num_prompts=%d but only %d neutral prompts exist; using %d (recorded as "
                "steer_num_prompts)", wanted, len(prompts), len(prompts))
  pos, neg = pos[::16 if quick else 1], neg[::16 if quick else 1]
  w = ctx.share(("steer_direction", *ctx.lm_key(), tuple(pos), tuple(neg)),
                lambda: steer.diffmean_direction(model, tok, pos, neg, ctx.layer, bos=ctx.bos))
  res, rows = steer.evaluate_steering(ctx.prior, model, tok, ctx.layer, pos, neg, prompts, rs=rs, direction=w,
                                      plain_cache=ctx.share(("steer_plain", *ctx.lm_key()), dict),
                                      max_new_tokens=8 if quick else opts.max_new_tokens, start=opts.start,
                                      steps=opts.manifold_steps, seed=opts.seed, judge=judge,
                                      plot_path=os.path.join(out_dir, "steer_frontier.png"), bos=ctx.bos)
  res["steer_num_prompts_requested"] = float(wanted)
  files.write_json(os.path.join(out_dir, "steer_rows.json"), rows, indent=1, sort_keys=True)
  return res


def run_probe(ctx: Context) -> dict:
  opts = ctx.opts
  from glp_jax.evals import probe, tasks
  model, tok = ctx.lm()
  n = 120 if opts.quick else opts.n_per_task
  if opts.tasks == "builtin":
    task_list = tasks.builtin_tasks(n, seed=opts.seed)
  else:
    task_list = tasks.load_sae_probes_csv(opts.tasks, max_rows=n)
  data, baselines = {}, {}
  for t in task_list:
    texts = list(t.texts)
    x, mlp = ctx.share(("probe_activations", *ctx.lm_key(), tuple(texts)),
                       lambda: tasks.last_token_activations(model, tok, texts, ctx.layer, mlp_neurons=True,
                                                            bos=ctx.bos))
    data[t.name] = (x, t.labels)
    if mlp is not None:
      baselines[t.name] = {"mlp": mlp}
  sigmas = tuple(float(s) for s in opts.sigmas)
  return probe.evaluate_probe(ctx.prior, data, sigmas, top_k=128 if opts.quick else opts.top_k,
                              seed=opts.seed, n_bootstrap=1000 if opts.quick else 10_000,
                              baselines=baselines)


def evaluate(name: str, ctx: Context, out_dir: str) -> dict:
  """Runs one evaluation and writes `<out_dir>/eval_<name>.json`; returns the flat result."""
  t0 = time.time()
  runners = {"fd": run_fd, "delta_lm": run_delta_lm, "probe": run_probe,
             "steer": lambda c: run_steer(c, out_dir)}
  res = runners[name](ctx)
  res = {k: float(v) for k, v in res.items()}
  res[f"{name}_wall_seconds"] = time.time() - t0
  if ctx.layer is not None:
    res.setdefault("lm_layer", float(ctx.layer))
  if ctx.prior.info.get("step") is not None:   # a run dir's checkpoint: --step may not be the latest
    res.setdefault("ckpt_step", float(ctx.prior.info["step"]))
  files.write_json(os.path.join(out_dir, f"eval_{name}.json"), res, indent=1, sort_keys=True)
  return res


def evaluate_all(names, opts: Options, shared: dict | None = None) -> dict[str, dict]:
  """Runs evaluations `names` (or "all") of `opts.prior` into `opts.out` (default: the prior folder); `shared`:
  see `Context`."""
  names = NAMES if names in ("all", ("all",)) else ((names,) if isinstance(names, str) else tuple(names))
  unknown = [n for n in names if n not in NAMES]
  if unknown or not opts.prior:
    raise ConfigError(f"evaluations are {NAMES} (or 'all'), got {unknown}; and a prior is required" if unknown
                      else "a prior (run dir, exported folder or Hub repo id) is required")
  if not opts.out and not files.exists(opts.prior):
    from glp_jax.torch import hub
    if hub.is_repo_id(opts.prior):   # or a mistyped local path: the message must not assume either
      raise ConfigError(f"--prior={opts.prior}: no such local folder; if it is a Hub repo id, pass --out (the "
                        "Hub cache is not a place to write results)")
  ctx = Context(opts, shared)
  out_dir = opts.out or opts.prior
  files.makedirs(out_dir)
  return {name: evaluate(name, ctx, out_dir) for name in names}


def evaluate_priors(names, opts: Options) -> dict[str, dict[str, dict]]:
  """`evaluate_all` of each prior in the comma-separated `opts.prior`, in one process: the LM is loaded once and
  its prior-independent forwards run once (--quick on 2 cores: ~13 s per prior after the first, not ~48 s).
  Each prior's results go to its own folder. Returns {prior: {name: result}}."""
  priors = [p for p in opts.prior.split(",") if p] or [""]
  if len(priors) > 1 and opts.out:
    raise ConfigError(f"--out names one folder, but {len(priors)} priors were given: each writes into its own "
                      "folder (evaluate them one at a time to send results elsewhere)")
  shared: dict = {}
  return {p: evaluate_all(names, dataclasses.replace(opts, prior=p), shared) for p in priors}
