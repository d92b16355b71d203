"""docs/steering.md's TransformerLens and nnsight examples, run as written on a tiny random Llama and a random
prior. Neither library is in requirements/lock.txt: these tests skip unless it is installed (checked with
transformer-lens 4.3.0 and nnsight 0.8.1 installed on top of the lock)."""
import os

import pytest

torch = pytest.importorskip("torch")
from glp_jax.torch import lm  # noqa: E402
from test_steering import D, LAYER, doc_block, random_prior  # noqa: E402

pytestmark = pytest.mark.torch
SETTING = 'LM, PRIOR, LAYER = "meta-llama/Llama-3.2-1B", "org/glp-llama1b-d6", 7'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("eco")
  path = lm.save_tiny_llama(str(root / "lm"), hidden=D, n_layers=3)
  random_prior().save_pretrained(str(root / "prior"))
  return path, str(root / "prior")


def run_doc(title: str, tiny) -> dict:
  """Runs the block from a .py file of its own: nnsight re-reads the source of the code it traces."""
  import runpy
  code = doc_block(title)
  assert SETTING in code
  script = os.path.join(os.path.dirname(tiny[1]), title.strip("# ").replace(" ", "_") + ".py")
  with open(script, "w") as fh:
    fh.write(code.replace(SETTING, f"LM, PRIOR, LAYER = {tiny[0]!r}, {tiny[1]!r}, {LAYER}"))
  return runpy.run_path(script)


def test_transformer_lens_example(tiny):
  pytest.importorskip("transformer_lens")
  scope = run_doc("## TransformerLens", tiny)
  model, hook = scope["model"], scope["hook"]
  assert scope["steered"].startswith("The weather today") and scope["steered_too"].startswith("The weather")
  # The hook point is the HF model's residual stream after the layer, bit for bit.
  from transformers import AutoModelForCausalLM
  hf = AutoModelForCausalLM.from_pretrained(tiny[0], attn_implementation="eager").eval()
  ids = torch.tensor([[1, 50, 60, 70, 80]])
  with torch.no_grad():
    want = hf(ids, output_hidden_states=True).hidden_states[LAYER + 1]
    got = model.run_with_cache(ids, names_filter=hook)[1][hook]
  assert torch.equal(got, want)
  # steer() on the hook point adds alpha * w at the last position and nothing else.
  from glp_jax.torch import steer
  seen = {}
  w = scope["w"]
  with steer(model, model.blocks[LAYER].hook_resid_post, w, alpha=3.0, positions="last"):
    with model.hooks(fwd_hooks=[(hook, lambda resid, hook: seen.setdefault("h", resid.clone()))]):
      with torch.no_grad():
        model(ids)
  torch.testing.assert_close(seen["h"][:, -1], want[:, -1] + 3.0 * w)
  assert torch.equal(seen["h"][:, :-1], want[:, :-1])


def test_nnsight_example(tiny):
  pytest.importorskip("nnsight")
  scope = run_doc("## nnsight", tiny)
  # Both routes (a torch hook on the wrapped model, nnsight's own intervention) give the same tokens.
  assert torch.equal(scope["steered"], scope["steered_too"])
  with scope["model"].generate("The weather today", max_new_tokens=20, do_sample=False) as tracer:
    plain = tracer.result.save()
  assert not torch.equal(plain, scope["steered"])
  assert os.path.isdir(tiny[1])
