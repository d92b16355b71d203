"""glp-export says what a prior models: LM, layer, store and corpus (also for runs on the embedded default
store), the model card README.md with the run's eval numbers and command line, and the Hub round trip of
glp-export --push_to_hub / glp-import --src=org/name (a stand-in HfApi and a local Hub cache; no network)."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import yaml  # noqa: E402

from glp_jax.data.store import default_store_path  # noqa: E402
from glp_jax.interop import cli as interop_cli  # noqa: E402
from glp_jax.interop import export as export_lib  # noqa: E402
from glp_jax.torch import GLP, hub  # noqa: E402
from hub_fakes import install_fake_hub  # noqa: E402
from test_export import (DEFAULT_CORPUS, DEFAULT_LM, default_store_cache, make_run,  # noqa: E402,F401
                         tiny_default_store, train_config)

pytestmark = pytest.mark.torch


def check_identity(out: str, cache: str) -> dict:
  """The export in `out` names the default store's LM, layer 3, the store and its corpus; returns config.json."""
  conf = json.loads(open(os.path.join(out, "config.json")).read())
  prov = conf["provenance"]
  assert (prov["lm"], prov["layer"], prov["store"]) == (DEFAULT_LM, 3, default_store_path(cache))
  assert prov["corpus"] == DEFAULT_CORPUS and prov["store_rows"] == 2048
  assert prov["bos"] is True   # how the LM was fed (a store not written by glp-extract: with a BOS)
  ycfg = yaml.safe_load(open(os.path.join(out, "config.yaml")))
  assert ycfg["model_name"] == DEFAULT_LM and ycfg["glp_kwargs"]["tracedict_config"]["layers"] == [3]
  card = open(os.path.join(out, "README.md")).read()
  assert f"`{DEFAULT_LM}`" in card and "| LM layer (residual stream after it) | 3 |" in card
  assert "Python documentation (tiny test copy)" in card
  return conf


def test_export_of_a_default_store_run_names_what_it_models(tmp_path, tiny_default_store):
  run = str(tmp_path / "run")
  make_run(run)   # config.data.store = "" (configs/train.py's default): the embedded default store
  assert json.loads(open(os.path.join(run, "config.json")).read())["data"]["store"] == ""
  export_lib.export(run, str(tmp_path / "out"))
  conf = check_identity(str(tmp_path / "out"), tiny_default_store)
  card = open(tmp_path / "out" / "README.md").read()
  assert "| eval loss (flow matching, held-out rows) | 1 ± 0.1 (SEM) at step 6 |" in card
  assert f"glp-export --workdir={os.path.abspath(run)} --out={tmp_path / 'out'} --step=6 --dtype=float32" in card
  assert conf["provenance"]["export_command"] in card
  # A license given to export() is in the card's metadata, so the command that reproduces the card names it.
  prov = export_lib.export(run, str(tmp_path / "licensed"), license="apache-2.0")["provenance"]
  assert prov["export_command"].endswith("--dtype=float32 --license=apache-2.0") and prov["license"] == "apache-2.0"


def test_store_of_another_width_is_not_claimed(tmp_path, monkeypatch, caplog):
  """A default store rebuilt since (another LM, another D) must not label the prior."""
  from glp_jax.data.writer import StoreWriter
  cache = str(tmp_path / "cache")
  st = StoreWriter.create(default_store_path(cache), layers=[15], d=8, dtype="float32",
                          metadata={"model": "other/lm"})
  st.append({15: np.ones((4, 8), np.float32)}, doc_id=0, positions=np.arange(4))
  st.close()
  monkeypatch.setenv("GLP_JAX_CACHE", cache)
  make_run(str(tmp_path / "run"))
  prov = export_lib.export(str(tmp_path / "run"), str(tmp_path / "out"))["provenance"]
  assert prov["lm"] is None and prov["layer"] is None and "D=8 but the prior models D=16" in caplog.text


def test_card_carries_the_run_evals_and_cli_pushes_to_the_hub(tmp_path, monkeypatch, tiny_default_store):
  fake = install_fake_hub(monkeypatch, str(tmp_path / "hub"))
  run, out = str(tmp_path / "run"), str(tmp_path / "out")
  make_run(run)
  with open(os.path.join(run, "eval_fd.json"), "w") as fh:
    json.dump({"fd": 7.5, "fd_floor": 2.0, "fd_num_samples": 300.0, "fd_rank_deficient": 1.0}, fh)
  fv = interop_cli.EXPORT_FLAGS
  fv(["glp-export", f"--workdir={run}", f"--out={out}", "--push_to_hub=org/glp-d16", "--license=mit"])
  try:
    interop_cli.export_main(fv)
  finally:
    fv.unparse_flags()
  assert [c[0] for c in fake.calls] == ["init", "create_repo", "upload_folder"]
  assert fake.calls[1][1]["private"] is None
  card = open(os.path.join(out, "README.md")).read()
  assert "| fd | `fd` | 7.5 |" in card and "| fd | `fd_rank_deficient` | 1 |" in card
  assert f"glp-export --workdir={run} --out={out} --push_to_hub=org/glp-d16 --license=mit" in card
  assert 'GLP.from_pretrained("org/glp-d16")' in card and hub.read_card_metadata(out)["license"] == "mit"
  # What was pushed loads by repo id (offline, from the Hub cache) and is the exported prior.
  a, b = GLP.from_pretrained(out), GLP.from_pretrained("org/glp-d16")
  z, t = torch.randn(3, 16), torch.rand(3) * 1000
  assert torch.equal(a(z, t), b(z, t)) and b.meta["provenance"]["lm"] == DEFAULT_LM
  # An earlier step: an eval file that records no checkpoint is about the latest one: it stays out of the card.
  prov = export_lib.export(run, str(tmp_path / "out4"), step=4)["provenance"]
  assert prov["evals"] == {} and "| fd |" not in open(tmp_path / "out4" / "README.md").read()
  # glp-eval --step=4 records the checkpoint it measured: then it goes into step 4's card and not the latest's.
  with open(os.path.join(run, "eval_fd.json"), "w") as fh:
    json.dump({"fd": 9.5, "ckpt_step": 4.0}, fh)
  assert export_lib.export(run, str(tmp_path / "out4b"), step=4)["provenance"]["evals"]["fd"]["fd"] == 9.5
  assert export_lib.export(run, str(tmp_path / "out6"))["provenance"]["evals"] == {}
  # A bad repo id is refused before any export work.
  fv(["glp-export", f"--workdir={run}", f"--out={tmp_path / 'never'}", "--push_to_hub=a/b/c"])
  try:
    with pytest.raises(Exception, match="push_to_hub"):
      interop_cli.export_main(fv)
  finally:
    fv.unparse_flags()
  assert not os.path.exists(tmp_path / "never")


def test_glp_import_from_a_hub_repo_id(tmp_path, monkeypatch):
  install_fake_hub(monkeypatch, str(tmp_path / "hub"))
  run = str(tmp_path / "run")
  make_run(run)
  export_lib.export(run, str(tmp_path / "out"))
  hub.push_folder(str(tmp_path / "out"), "org/glp-d16")
  fv = interop_cli.IMPORT_FLAGS
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  fv(["glp-import", "--src=org/glp-d16", f"--workdir={tmp_path / 'imported'}",
      f"--config={root}/configs/train.py:runlocal"])
  try:
    interop_cli.import_main(fv)
  finally:
    fv.unparse_flags()
  source = json.loads(open(tmp_path / "imported" / "imported_from.json").read())
  assert source["layout"] == "glp_jax" and source["model_name"] == DEFAULT_LM
  assert "models--org--glp-d16" in source["src"]
  assert source["hub"] == {"repo_id": "org/glp-d16", "revision": None,   # where the cache folder came from
                           "commit": os.path.basename(os.path.normpath(source["src"]))}
  # Re-exporting the imported run keeps the identity of the original (it trained on nothing here).
  prov = export_lib.export(str(tmp_path / "imported"), str(tmp_path / "again"))["provenance"]
  assert (prov["lm"], prov["layer"], prov["corpus"]) == (DEFAULT_LM, 3, DEFAULT_CORPUS)


@pytest.mark.slow
def test_trained_default_store_run_exports_its_identity(tmp_path, tiny_default_store):
  """glp-train with data.store = "" on a (tiny) default store, then glp-export: nothing is null."""
  from glp_jax.training import trainer
  run = str(tmp_path / "run")
  summary = trainer.train_and_evaluate(train_config(""), run)
  assert json.loads(open(os.path.join(run, "config.json")).read())["data"]["store"] == ""
  interop_cli.EXPORT_FLAGS(["glp-export", f"--workdir={run}", f"--out={tmp_path / 'out'}"])
  try:
    interop_cli.export_main(interop_cli.EXPORT_FLAGS)
  finally:
    interop_cli.EXPORT_FLAGS.unparse_flags()
  conf = check_identity(str(tmp_path / "out"), tiny_default_store)
  prov = conf["provenance"]
  assert prov["eval_loss"] == summary["eval_loss"] and prov["activations_seen"] == 384
  card = open(tmp_path / "out" / "README.md").read()
  assert f"{summary['eval_loss']:.6g}" in card and "training compute (FLOPs)" in card
