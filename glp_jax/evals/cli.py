r"""glp-eval: downstream evaluations of a prior; each writes one flat JSON object to `<out>/eval_<name>.json`.

  glp-eval fd       --prior=runs/d6 [--num_samples=50000 --steps=1000]
  glp-eval delta_lm --prior=runs/d6 [--num_docs=256 --max_length=128]
  glp-eval steer    --prior=runs/d6 [--rs=0,0.25,0.5,1,2 --max_new_tokens=20]
  glp-eval probe    --prior=runs/d6 [--tasks=builtin | --tasks=/path/to/sae_probes_csvs]
  glp-eval all      --prior=exports/d6 --store=STORE --out=DIR

`--prior` is a glp_jax run dir or an exported / reference prior folder. The LM, its layer, the real held-out
activations (fd) and the held-out documents (delta_lm) come from the activation store the run was trained on
(`--store` overrides; an export needs `--store` or `--lm/--layer`). `--quick` shrinks every evaluation to a
smoke-test size (used by `make demo`). Keys written (docs/design.md lists them all): fd: fd, fd_floor; delta_lm: delta_lm, delta_lm_sem,
delta_lm_mean, delta_lm_identity; steer: steer_{add,glp}_{concept,nll} and per-r rows; probe:
probe_auc_{raw,mlp,t0.1,t0.5} with _lo/_hi bootstrap CIs.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

from glp_jax.evals import fd as fd_lib
from glp_jax.evals import prior as prior_lib
from glp_jax.util import cli, files

NAMES = ("fd", "delta_lm", "steer", "probe")

FLAGS = cli.flag_values()
flags.DEFINE_string("prior", None, "glp_jax run dir or exported prior folder.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step of a run dir (default: latest).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Where eval_<name>.json goes (default: the prior folder).", flag_values=FLAGS)
flags.DEFINE_string("store", None, "Activation store (default: the run config's data.store).", flag_values=FLAGS)
flags.DEFINE_string("lm", None, "LM name/folder (default: the store's model).", flag_values=FLAGS)
flags.DEFINE_integer("layer", None, "LM layer the prior models (default: the store's layer).", flag_values=FLAGS)
flags.DEFINE_string("lm_dtype", "float32", "LM forward dtype: float32 | bfloat16 (--quick uses bfloat16).",
                    flag_values=FLAGS)
flags.DEFINE_string("device", "auto", "LM device: auto | cpu | cuda.", flag_values=FLAGS)
flags.DEFINE_bool("quick", False, "Smoke-test sizes (seconds to minutes on CPU).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 42, "Seed for samples, noise and splits.", flag_values=FLAGS)
# fd
flags.DEFINE_integer("num_samples", 50_000, "fd: samples per side (capped at half the held-out rows).",
                     flag_values=FLAGS)
flags.DEFINE_integer("steps", 1000, "fd: Euler steps.", flag_values=FLAGS)
flags.DEFINE_enum("fd_method", "eigh", fd_lib.METHODS, "fd: matrix square-root route.", flag_values=FLAGS)
flags.DEFINE_integer("heldout_rows", None, "fd: held-out rows at the store's end (default: run config).",
                     flag_values=FLAGS)
# delta_lm / steering projection
flags.DEFINE_integer("num_docs", 256, "delta_lm: held-out documents.", flag_values=FLAGS)
flags.DEFINE_integer("max_length", 128, "delta_lm: tokens per document.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "delta_lm: documents per forward.", flag_values=FLAGS)
flags.DEFINE_float("start", 0.5, "On-manifold start (reference u; 0.5 -> sigma ~0.474).", flag_values=FLAGS)
flags.DEFINE_integer("manifold_steps", 20, "On-manifold grid length.", flag_values=FLAGS)
# steer
flags.DEFINE_list("rs", ["0", "0.25", "0.5", "1", "2"], "steer: alpha / mean activation norm grid.",
                  flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 20, "steer: greedy tokens per continuation.", flag_values=FLAGS)
flags.DEFINE_integer("num_prompts", 10, "steer: neutral prompts.", flag_values=FLAGS)
flags.DEFINE_string("judge_model", "", "steer: LLM judge model name (off when empty; needs --judge_url).",
                    flag_values=FLAGS)
flags.DEFINE_string("judge_url", "", "steer: OpenAI-compatible base URL of the judge.", flag_values=FLAGS)
# probe
flags.DEFINE_string("tasks", "builtin", "probe: 'builtin' or an SAE-Probes CSV file/folder.", flag_values=FLAGS)
flags.DEFINE_list("sigmas", ["0.1", "0.5"], "probe: noise levels of the meta-neuron forward.", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 512, "probe: features kept by class-mean difference.", flag_values=FLAGS)
flags.DEFINE_integer("n_per_task", 400, "probe: examples per built-in task / max rows per CSV task.",
                     flag_values=FLAGS)


class Context:
  """The prior plus the LM side it belongs to, resolved once per invocation."""

  def __init__(self):
    self.config = _run_config(FLAGS.prior) if prior_lib.is_run_dir(FLAGS.prior) else {}
    prov = prior_lib.export_provenance(FLAGS.prior)
    self.store = FLAGS.store or _cfg(self.config, "data", "store") or prov.get("store")
    if not self.store and self.config:   # the run trained on the embedded default store (data.store = "")
      from glp_jax.training.input import default_store
      self.store = default_store()
    info = prior_lib.lm_info_from_store(self.store, _cfg(self.config, "data", "layer")) if self.store else {}
    self.lm_name = FLAGS.lm or info.get("lm") or prov.get("lm")
    self.layer = FLAGS.layer if FLAGS.layer is not None else info.get("layer", prov.get("layer"))
    self.prior = prior_lib.load_prior(FLAGS.prior, FLAGS.step, self.layer)
    self._lm = None

  def lm(self):
    if self._lm is None:
      from glp_jax.extraction import lm
      if not self.lm_name or self.layer is None:
        raise app.UsageError("cannot tell which LM/layer this prior models: pass --store or --lm and --layer")
      dtype = "bfloat16" if FLAGS.quick else FLAGS.lm_dtype   # bf16: ~3x faster on CPU, as the extractor
      self._lm = lm.load_causal_lm(self.lm_name, dtype=dtype, device=FLAGS.device)
    return self._lm


def _run_config(path: str) -> dict:
  return files.read_json(os.path.join(path, "config.json"), {})


def _cfg(config: dict, *keys, default=None):
  for k in keys:
    if not isinstance(config, dict) or k not in config:
      return default
    config = config[k]
  return config


def run_fd(ctx: Context) -> dict:
  import numpy as np
  from glp_jax.data import store as store_lib
  if not ctx.store:
    raise app.UsageError("fd needs real activations: pass --store")
  st = store_lib.ActivationStore.open(ctx.store)
  rows = st.heldout_rows()
  if not len(rows):   # the loader's rule: the last `heldout_rows` rows are never trained on
    n_held = FLAGS.heldout_rows or _cfg(ctx.config, "data", "heldout_rows", default=4096)
    rows = np.arange(max(0, st.num_rows - n_held), st.num_rows)
  starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)       # contiguous runs, one block read each
  ends = np.append(starts[1:], len(rows))
  real = np.concatenate([st.read(int(rows[a]), int(rows[b - 1]) + 1, ctx.layer) for a, b in zip(starts, ends)])
  n, steps = (1024, 100) if FLAGS.quick else (FLAGS.num_samples, FLAGS.steps)
  return fd_lib.evaluate_fd(ctx.prior, real.astype(np.float32), num_samples=n, steps=steps, seed=FLAGS.seed,
                            method=FLAGS.fd_method)


def _heldout_texts(ctx: Context, n: int) -> list[str]:
  from glp_jax.extraction import corpus as corpus_lib
  from glp_jax.data import store as store_lib
  desc = store_lib.ActivationStore.open(ctx.store).metadata.get("corpus", {}) if ctx.store else {}
  held = desc.get("heldout", {})
  corpus = corpus_lib.Corpus(desc.get("source", corpus_lib.EMBEDDED), text_field=desc.get("text_field", "text"),
                             txt_mode=desc.get("txt_mode", "file"), seed=held.get("seed", desc.get("seed", 0)),
                             heldout_fraction=held.get("fraction", 0.05), max_docs=n)
  return [d.text for d in corpus.heldout()]


def run_delta_lm(ctx: Context) -> dict:
  from glp_jax.evals import delta_lm
  model, tok = ctx.lm()
  n, length = (8, 48) if FLAGS.quick else (FLAGS.num_docs, FLAGS.max_length)
  return delta_lm.evaluate_delta_lm(ctx.prior, model, tok, _heldout_texts(ctx, n), ctx.layer, length,
                                    FLAGS.batch_size, FLAGS.start, FLAGS.manifold_steps, FLAGS.seed)


def run_steer(ctx: Context, out_dir: str) -> dict:
  from glp_jax.evals import steer, tasks
  model, tok = ctx.lm()
  pos, neg = tasks.sentiment_texts()
  quick = FLAGS.quick
  rs = (0.0, 0.2, 0.5) if quick else tuple(float(r) for r in FLAGS.rs)
  judge = steer.openai_judge(FLAGS.judge_model, FLAGS.judge_url) if FLAGS.judge_model else None
  res, rows = steer.evaluate_steering(ctx.prior, model, tok, ctx.layer, pos[::16 if quick else 1], neg[::16 if quick else 1],
                                tasks.neutral_prompts()[:2 if quick else FLAGS.num_prompts], rs=rs,
                                max_new_tokens=8 if quick else FLAGS.max_new_tokens, start=FLAGS.start,
                                steps=FLAGS.manifold_steps, seed=FLAGS.seed, judge=judge,
                                plot_path=os.path.join(out_dir, "steer_frontier.png"))
  files.write_json(os.path.join(out_dir, "steer_rows.json"), rows, indent=1, sort_keys=True)
  return res


def run_probe(ctx: Context) -> dict:
  from glp_jax.evals import probe, tasks
  model, tok = ctx.lm()
  n = 120 if FLAGS.quick else FLAGS.n_per_task
  if FLAGS.tasks == "builtin":
    task_list = tasks.builtin_tasks(n, seed=FLAGS.seed)
  else:
    task_list = tasks.load_sae_probes_csv(FLAGS.tasks, max_rows=n)
  data, baselines = {}, {}
  for t in task_list:
    x, mlp = tasks.last_token_activations(model, tok, list(t.texts), ctx.layer, mlp_neurons=True)
    data[t.name] = (x, t.labels)
    if mlp is not None:
      baselines[t.name] = {"mlp": mlp}
  sigmas = tuple(float(s) for s in FLAGS.sigmas)
  return probe.evaluate_probe(ctx.prior, data, sigmas, top_k=128 if FLAGS.quick else FLAGS.top_k,
                              seed=FLAGS.seed, n_bootstrap=1000 if FLAGS.quick else 10_000,
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
  files.write_json(os.path.join(out_dir, f"eval_{name}.json"), res, indent=1, sort_keys=True)
  return res


def main(fv: flags.FlagValues, args: list[str]) -> None:
  if len(args) != 1 or args[0] not in NAMES + ("all",):
    raise app.UsageError(f"usage: glp-eval {{{','.join(NAMES)},all}} --prior=RUN_OR_EXPORT [flags]; got {args}")
  if not fv.prior:
    raise app.UsageError("--prior is required")
  ctx = Context()
  out_dir = fv.out or fv.prior
  os.makedirs(out_dir, exist_ok=True)
  for name in NAMES if args[0] == "all" else (args[0],):
    res = evaluate(name, ctx, out_dir)
    print(json.dumps({"eval": name, **res}), flush=True)


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-eval)."""
  cli.run(main, FLAGS, __doc__, argv, positional=True)


if __name__ == "__main__":
  run()
