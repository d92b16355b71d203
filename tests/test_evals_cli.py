"""glp-eval end to end (--quick) on a tiny random Llama, a tiny store of its activations and a torch export."""
import dataclasses
import json
import os

import numpy as np
import pytest
from glp_jax.data.writer import StoreWriter

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  import torch
  import transformers
  from glp_jax.torch import lm
  from glp_jax.evals import tasks
  from glp_jax.torch import GLP, DenoiserConfig
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("cli")
  tok = lm.load_tokenizer(lm.EMBEDDED)
  cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  lm_dir = str(root / "lm")
  transformers.LlamaForCausalLM(cfg).save_pretrained(lm_dir)
  tok.save_pretrained(lm_dir)
  model, tok = lm.load_causal_lm(lm_dir, dtype="float32")
  pos, neg = tasks.sentiment_texts()
  x = tasks.last_token_activations(model, tok, pos[:300] + neg[:300], layer=1)
  st = StoreWriter.create(str(root / "store"), layers=[1], d=32, dtype="float32",
                                        metadata={"model": lm_dir})
  for i in range(0, len(x), 50):
    st.append({1: x[i:i + 50]}, doc_id=i // 50, positions=np.arange(1, 51))
  st.close()
  glp = GLP(DenoiserConfig(d_input=32, d_model=32, d_mlp=64, n_layers=2), torch.as_tensor(x.mean(0)),
            torch.as_tensor(x.var(0)))
  glp.save_pretrained(str(root / "export"))
  return str(root)


def test_cli_all_quick_writes_flat_json(setup):
  from glp_jax.evals import cli
  out = os.path.join(setup, "out")
  cli.FLAGS(["glp-eval", f"--prior={setup}/export", f"--store={setup}/store", f"--out={out}", "--quick"])
  try:
    cli.main(cli.FLAGS, ["all"])
  finally:
    cli.FLAGS.unparse_flags()
  res = {}
  for name in cli.runner.NAMES:
    with open(os.path.join(out, f"eval_{name}.json")) as f:
      res[name] = json.load(f)
    assert all(isinstance(v, (int, float)) for v in res[name].values()), name
    assert res[name]["lm_layer"] == 1
  assert res["fd"]["fd_num_samples"] == 300 and res["fd"]["fd"] > res["fd"]["fd_floor"] > 0
  assert res["delta_lm"]["delta_lm_identity"] == 0.0 and np.isfinite(res["delta_lm"]["delta_lm"])
  for kind in ("raw", "mlp", "t0.1", "t0.5"):
    assert 0.0 <= res["probe"][f"probe_auc_{kind}_lo"] <= res["probe"][f"probe_auc_{kind}"] <= 1.0
  # A random LM's last-token state mostly encodes the last token: '?' vs '.' separates, '.' vs '.' does not.
  assert res["probe"]["probe_auc_raw/question"] > 0.95
  assert np.isfinite(res["steer"]["steer_glp_concept"])
  assert os.path.exists(os.path.join(out, "steer_frontier.png"))
  assert not [f for f in os.listdir(out) if f.startswith("eval_") and f[5:-5] not in cli.runner.NAMES]


def test_several_priors_in_one_call_load_the_lm_once_and_equal_one_call_each(setup, tmp_path, monkeypatch, capsys):
  """`--prior=a,b`: each prior's results in its own folder, the same numbers as evaluating each alone, with the LM
  loaded once and its prior-independent forwards (probe tasks, steering direction, plain steering, delta LM's
  unedited and anchor forwards) run once."""
  import shutil
  import torch
  from glp_jax.evals import cli, runner, steer, tasks
  from glp_jax.torch import GLP, lm
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  shutil.copytree(f"{setup}/export", a)
  torch.manual_seed(1)
  first = GLP.from_pretrained(a)
  GLP(first.cfg, first.normalizer.mean, first.normalizer.var).save_pretrained(b)   # other weights, same shape
  alone = {p: runner.evaluate_all("all", runner.Options(prior=p, store=f"{setup}/store", out=f"{p}_alone",
                                                        quick=True)) for p in (a, b)}
  calls = {"load": 0, "forward": 0, "generate": 0, "delta_lm_edit": 0}
  def counted(name, fn):
    def wrapped(*args, **kw):
      calls[name] += 1
      return fn(*args, **kw)
    return wrapped
  monkeypatch.setattr(lm, "load_causal_lm", counted("load", lm.load_causal_lm))
  monkeypatch.setattr(tasks, "last_token_activations", counted("forward", tasks.last_token_activations))
  monkeypatch.setattr(steer, "generate", counted("generate", steer.generate))
  from glp_jax.evals import delta_lm
  monkeypatch.setattr(delta_lm, "per_doc_loss", counted("delta_lm_edit", delta_lm.per_doc_loss))
  cli.FLAGS(["glp-eval", f"--prior={a},{b}", f"--store={setup}/store", "--quick"])
  try:
    cli.main(cli.FLAGS, ["all"])
  finally:
    cli.FLAGS.unparse_flags()
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert [(r["prior"], r["eval"]) for r in printed] == [(p, n) for p in (a, b) for n in runner.NAMES]
  assert calls["load"] == 1
  n_tasks = len(tasks.builtin_tasks(120, seed=runner.Options.seed))
  assert calls["forward"] == n_tasks + 2   # each probe task once, plus the steering direction's two sets
  # --quick steers at 3 strengths: plain steering (b copies a's normaliser, so the same norm) once, the prior's
  # on-manifold steering for each prior
  assert calls["generate"] == 3 + 2 * 3
  # delta LM, one batch of --quick's 8 documents: the unedited, mean and identity forwards once (b has a's
  # normaliser mean), the on-manifold one for each prior
  assert calls["delta_lm_edit"] == 3 + 2
  timing = ("_seconds", "_wall_seconds")
  for p in (a, b):
    for name in runner.NAMES:
      got = json.load(open(os.path.join(p, f"eval_{name}.json")))
      want = alone[p][name]
      assert {k for k in got if not k.endswith(timing)} == {k for k in want if not k.endswith(timing)}
      assert {k: v for k, v in got.items() if not k.endswith(timing)} == \
          {k: v for k, v in want.items() if not k.endswith(timing)}, (p, name)
  assert alone[a]["fd"]["fd"] != alone[b]["fd"]["fd"]   # two priors really were evaluated
  with pytest.raises(runner.ConfigError, match="--out names one folder"):
    runner.evaluate_priors("fd", runner.Options(prior=f"{a},{b}", out=str(tmp_path / "one")))


def test_jax_run_and_torch_export_give_the_same_fd(setup, tmp_path):
  # The same weights as a glp_jax run dir (glp-import of the export) and as the torch export: one number.
  from glp_jax.interop import import_ref
  from glp_jax.evals import runner
  cfg = import_ref.default_config()
  cfg.batch_size, cfg.num_activations = 8, 80
  cfg.model.compute_dtype = "bfloat16"   # as a run trained on a GPU records: evaluated in float32 all the same
  run = str(tmp_path / "run")
  import_ref.import_prior(f"{setup}/export", run, config=cfg)
  assert json.load(open(os.path.join(run, "config.json")))["model"]["compute_dtype"] == "bfloat16"
  from glp_jax.evals import prior as prior_lib
  samples = [prior_lib.load_prior(p).sample_raw(64, steps=50) for p in (run, f"{setup}/export")]
  np.testing.assert_allclose(samples[0], samples[1], rtol=1e-4, atol=1e-4 * np.abs(samples[1]).max())
  got = {}
  for name, prior in (("jax", run), ("torch", f"{setup}/export")):   # from Python, no flags involved
    got[name] = runner.evaluate_all("fd", runner.Options(prior=prior, store=f"{setup}/store",
                                                         out=str(tmp_path / name), quick=True))["fd"]
  assert got["jax"]["fd_floor"] == got["torch"]["fd_floor"]
  np.testing.assert_allclose(got["jax"]["fd"], got["torch"]["fd"], rtol=1e-3)
  from glp_jax.training.prior import checkpoint_step
  assert got["jax"]["ckpt_step"] == checkpoint_step(run, None)[0] and "ckpt_step" not in got["torch"]


def test_export_is_evaluated_at_its_own_layer_reading_only_the_rows_it_compares(setup, tmp_path, monkeypatch):
  """An export of a layer-1 prior, evaluated on a store of layers 0 and 1, is measured against layer 1 (not the
  store's first layer), and fd reads just the 2n rows it compares."""
  from glp_jax.data.store import ActivationStore
  from glp_jax.evals import fd as fd_lib, runner
  from glp_jax.torch import GLP
  x = ActivationStore.open(f"{setup}/store").read(0, 600, 1)
  st = StoreWriter.create(str(tmp_path / "store01"), layers=[0, 1], d=32, dtype="float32",
                          metadata={"model": f"{setup}/lm"})
  noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32) * 9
  for i in range(0, len(x), 50):
    st.append({0: noise[i:i + 50], 1: x[i:i + 50]}, doc_id=i // 50, positions=np.arange(1, 51))
  st.close()
  GLP.from_pretrained(f"{setup}/export").save_pretrained(str(tmp_path / "export1"), provenance={"layer": 1})
  ctx = runner.Context(runner.Options(prior=str(tmp_path / "export1"), store=str(tmp_path / "store01"),
                                      num_samples=50, steps=10))
  assert ctx.layer == 1
  taken = []
  monkeypatch.setattr(ActivationStore, "_read", lambda *a: pytest.fail("read a whole block of rows"))
  take = ActivationStore.take
  monkeypatch.setattr(ActivationStore, "take", lambda self, rows, *a, **k: taken.append(len(rows)) or
                      take(self, rows, *a, **k))
  res = runner.run_fd(ctx)
  assert taken == [50, 50] and res["fd_num_samples"] == 50
  # The same halves as from the rows in memory: the numbers do not depend on how the rows are read.
  lazy = fd_lib.split_halves(fd_lib.StoreRows(ActivationStore.open(str(tmp_path / "store01")), 1, False,
                                              np.arange(100, 600)), 50, seed=3)
  eager = fd_lib.split_halves(x[100:600], 50, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(lazy, eager))


def test_fd_of_a_streaming_run_compares_against_the_rows_it_held_out(setup, monkeypatch):
  """A streaming run on a store without a held-out split holds out its FIRST rows and trains on the rest; fd
  took the last rows (trained on) as its real set."""
  import types
  from glp_jax.evals import fd as fd_lib, runner
  seen = {}
  monkeypatch.setattr(fd_lib, "evaluate_fd", lambda prior, real, **k: seen.setdefault("rows", real.rows))
  for streaming, want in ((True, np.arange(100)), (False, np.arange(500, 600))):
    ctx = types.SimpleNamespace(opts=runner.Options(quick=True), store=f"{setup}/store", layer=1, prior=None,
                                config={"data": {"streaming": streaming, "heldout_rows": 100}})
    seen.clear()
    runner.run_fd(ctx)
    np.testing.assert_array_equal(seen["rows"], want)


def test_a_multi_layer_prior_needs_its_layer_named_and_an_export_takes_no_step(setup, tmp_path):
  """It was measured at the store's first layer, silently (its provenance lists several layers)."""
  import torch
  from glp_jax.evals import runner
  from glp_jax.torch import GLP, DenoiserConfig
  from glp_jax.util.errors import ConfigError
  glp = GLP(DenoiserConfig(d_input=32, d_model=32, d_mlp=64, n_layers=2, multi_layer_n_layers=2),
            torch.zeros(2, 32), torch.ones(2, 32))
  glp.save_pretrained(str(tmp_path / "multi"), provenance={"layer": [0, 1]})
  opts = runner.Options(prior=str(tmp_path / "multi"), store=f"{setup}/store", quick=True)
  with pytest.raises(ConfigError, match="multi-layer prior: say which LM layer"):
    runner.Context(opts)
  assert runner.Context(dataclasses.replace(opts, layer=1)).layer == 1
  # An export holds one set of weights: a --step was ignored, and its results recorded as if measured there.
  with pytest.raises(ConfigError, match="--step=3 picks a checkpoint of a glp_jax run dir"):
    runner.Context(dataclasses.replace(opts, layer=1, step=3))


def test_prior_as_a_hub_repo_id(setup, tmp_path, monkeypatch):
  """--prior=org/name resolves through the Hub cache (offline); results then need --out."""
  from glp_jax.evals import cli
  from glp_jax.util.errors import ConfigError
  from hub_fakes import install_fake_hub
  from glp_jax.torch import hub
  install_fake_hub(monkeypatch, str(tmp_path / "hub"))
  hub.push_folder(f"{setup}/export", "org/tiny-prior")
  cli.FLAGS(["glp-eval", "--prior=org/tiny-prior", f"--store={setup}/store", f"--out={tmp_path / 'out'}",
             "--quick"])
  try:
    cli.main(cli.FLAGS, ["fd"])
  finally:
    cli.FLAGS.unparse_flags()
  res = json.load(open(tmp_path / "out" / "eval_fd.json"))
  assert res["fd_num_samples"] == 300 and res["fd_rank_deficient"] == 0.0 and res["lm_layer"] == 1
  cli.FLAGS(["glp-eval", "--prior=org/tiny-prior", f"--store={setup}/store"])
  try:
    with pytest.raises(ConfigError, match="no such local folder; if it is a Hub repo id, pass --out"):
      cli.main(cli.FLAGS, ["fd"])
  finally:
    cli.FLAGS.unparse_flags()


def test_imported_run_is_not_taken_for_a_default_store_run(setup, tmp_path, monkeypatch):
  """An imported run's config has data.store = "" too: it must not be evaluated on the embedded default."""
  from glp_jax.evals import runner
  from glp_jax.interop import import_ref
  from glp_jax.training import input as input_lib
  monkeypatch.setattr(input_lib, "default_store", lambda: pytest.fail("resolved the default store"))
  cfg = import_ref.default_config()
  cfg.batch_size, cfg.num_activations = 8, 80
  import_ref.import_prior(f"{setup}/export", str(tmp_path / "run"), config=cfg)
  ctx = runner.Context(runner.Options(prior=str(tmp_path / "run")))
  assert ctx.store is None and ctx.lm_name is None


def test_a_downloaded_export_whose_recorded_store_is_elsewhere_evaluates_with_the_lm(setup, tmp_path, caplog):
  """An export records its machine's store path; on another machine Context raised StoreError before any
  eval, though probe / steer / delta_lm need only --lm and --layer. A store passed explicitly must exist."""
  from glp_jax.evals import runner
  from glp_jax.torch import GLP
  from glp_jax.util.errors import ConfigError
  GLP.from_pretrained(f"{setup}/export").save_pretrained(
      str(tmp_path / "copied"), provenance={"lm": f"{setup}/lm", "layer": 1, "store": "/elsewhere/extract/store"})
  with caplog.at_level("WARNING", logger="glp_jax"):
    ctx = runner.Context(runner.Options(prior=str(tmp_path / "copied"), quick=True))
  assert ctx.store is None and ctx.lm_name == f"{setup}/lm" and ctx.layer == 1
  assert "/elsewhere/extract/store is not reachable here" in caplog.text
  with pytest.raises(ConfigError, match="fd needs real activations: pass --store"):
    runner.run_fd(ctx)
  with pytest.raises(Exception, match="/elsewhere/extract/store"):
    runner.Context(runner.Options(prior=str(tmp_path / "copied"), store="/elsewhere/extract/store"))
  # An export of a store fed without a BOS says so, and is evaluated alike where its store is out of reach.
  assert ctx.bos is True
  GLP.from_pretrained(f"{setup}/export").save_pretrained(
      str(tmp_path / "no_bos"), provenance={"lm": f"{setup}/lm", "layer": 1, "store": "/elsewhere", "bos": False})
  assert runner.Context(runner.Options(prior=str(tmp_path / "no_bos"), quick=True)).bos is False


def test_fewer_steering_prompts_than_asked_are_warned_and_recorded(tmp_path, monkeypatch, caplog):
  from glp_jax.evals import runner, steer
  seen = {}

  def fake_steering(prior, model, tok, layer, pos, neg, prompts, **kw):
    seen["prompts"] = prompts
    return {"steer_num_prompts": float(len(prompts))}, []
  monkeypatch.setattr(steer, "evaluate_steering", fake_steering)
  ctx = type("Ctx", (), {"prior": None, "layer": 1, "bos": True, "lm": lambda self: (None, None),
                         "lm_key": lambda self: (), "share": lambda self, key, make: None,
                         "opts": runner.Options(prior="x", num_prompts=50)})()
  with caplog.at_level("WARNING", logger="glp_jax"):
    res = runner.run_steer(ctx, str(tmp_path))
  assert len(seen["prompts"]) == 10 and res["steer_num_prompts_requested"] == 50
  assert "--num_prompts=50 but only 10 neutral prompts exist" in caplog.text


def test_python_api_evaluate_all_returns_every_result(monkeypatch):
  import glp_jax
  from glp_jax.evals import runner
  got = {"fd": {"fd": 1.0}, "probe": {"probe_auc_raw": 0.5}}
  monkeypatch.setattr(runner, "evaluate_all", lambda names, opts: dict(got))
  assert glp_jax.evaluate("all", "runs/x") == got and glp_jax.evaluate("fd", "runs/x") == got["fd"]


def test_an_imported_run_is_evaluated_at_its_source_layer(tmp_path):
  """A run glp-import wrote from an export whose layer is in its provenance only (no tracedict_config) has
  data.layer = -1: it was evaluated at the store's first layer, the export itself at its own."""
  import torch
  from glp_jax.evals import runner
  from glp_jax.interop import import_ref
  from glp_jax.torch import GLP, DenoiserConfig
  _two_layer_store(str(tmp_path / "store01"))
  torch.manual_seed(0)
  GLP(DenoiserConfig(d_input=8, d_model=16, d_mlp=32, n_layers=1)).save_pretrained(
      str(tmp_path / "export"), provenance={"layer": 1, "lm": "lm"})
  cfg = import_ref.default_config()
  cfg.batch_size, cfg.num_activations = 8, 80
  import_ref.import_prior(str(tmp_path / "export"), str(tmp_path / "run"), config=cfg)
  for prior in ("export", "run"):
    ctx = runner.Context(runner.Options(prior=str(tmp_path / prior), store=str(tmp_path / "store01")))
    assert (ctx.layer, ctx.lm_name) == (1, "lm"), prior


def _two_layer_store(path: str) -> None:
  """A small store of LM layers 0 and 1 (D = 8) of an LM named "lm"."""
  rng = np.random.default_rng(0)
  st = StoreWriter.create(path, layers=[0, 1], d=8, dtype="float32", metadata={"model": "lm"})
  for i in range(2):
    st.append({l: rng.standard_normal((20, 8)).astype(np.float32) for l in (0, 1)}, doc_id=i,
              positions=np.arange(1, 21))
  st.close()


def test_a_reference_folder_is_evaluated_at_the_layer_its_config_yaml_names(tmp_path):
  """A reference prior names its LM layer only in config.yaml's tracedict_config (and so does an export re-saved
  from it): both were evaluated at the store's first layer."""
  import torch
  from glp_jax.evals import runner
  from glp_jax.torch import GLP, DenoiserConfig, io as torch_io
  _two_layer_store(str(tmp_path / "store01"))
  torch.manual_seed(0)
  glp = GLP(DenoiserConfig(d_input=8, d_model=16, d_mlp=32, n_layers=1))
  ref = str(tmp_path / "ref")
  torch_io.write_folder(ref, glp.denoiser.state_dict(), glp.cfg, glp.normalizer.mean, glp.normalizer.var,
                        tracedict={"layer_prefix": "model.layers", "layers": [1], "retain": "output"},
                        reference_extra={"model_name": "ref-lm"})
  for name in ("config.json", "model.safetensors", "README.md"):   # the reference layout only
    os.remove(os.path.join(ref, name))
  GLP.from_pretrained(ref).save_pretrained(str(tmp_path / "resaved"))
  for prior, lm in ((ref, "ref-lm"), (str(tmp_path / "resaved"), "ref-lm")):
    ctx = runner.Context(runner.Options(prior=prior, store=str(tmp_path / "store01")))
    assert ctx.layer == 1, prior
    assert runner.Context(runner.Options(prior=prior)).lm_name == lm   # without a store: its model_name
