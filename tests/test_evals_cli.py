"""glp-eval end to end (--quick) on a tiny random Llama, a tiny store of its activations and a torch export."""
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
  from glp_jax.extraction import lm
  from glp_jax.data import store as store_lib
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
  for name in cli.NAMES:
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
  assert not [f for f in os.listdir(out) if f.startswith("eval_") and f[5:-5] not in cli.NAMES]


def test_jax_run_and_torch_export_give_the_same_fd(setup, tmp_path):
  # The same weights as a glp_jax run dir (glp-import of the export) and as the torch export: one number.
  from glp_jax.interop import import_ref
  from glp_jax.evals import cli
  cfg = import_ref.default_config()
  cfg.batch_size, cfg.num_activations = 8, 80
  run = str(tmp_path / "run")
  import_ref.import_prior(f"{setup}/export", run, config=cfg)
  got = {}
  for name, prior in (("jax", run), ("torch", f"{setup}/export")):
    cli.FLAGS(["glp-eval", f"--prior={prior}", f"--store={setup}/store", f"--out={tmp_path / name}",
               "--quick"])
    try:
      os.makedirs(tmp_path / name)
      got[name] = cli.evaluate("fd", cli.Context(), str(tmp_path / name))
    finally:
      cli.FLAGS.unparse_flags()
  assert got["jax"]["fd_floor"] == got["torch"]["fd_floor"]
  np.testing.assert_allclose(got["jax"]["fd"], got["torch"]["fd"], rtol=1e-3)
