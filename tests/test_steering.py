"""glp_jax.torch.steer: forward-hook steering of HF models (tensor or tuple layer outputs), with and without a
prior's on-manifold projection; and docs/steering.md's transformers example, run as written."""
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from glp_jax.torch import hooks, lm  # noqa: E402
from glp_jax.torch import GLP, DenoiserConfig, steer, steering_edit  # noqa: E402
from glp_jax.torch.steering import position_mask  # noqa: E402

pytestmark = pytest.mark.torch
D, LAYER = 64, 1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = lm.save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")), hidden=D, n_layers=3)
  model, tok = lm.load_causal_lm(path, "float32", "cpu")
  return path, model, tok


def random_prior(d: int = D, seed: int = 0, multi: int | None = None) -> GLP:
  torch.manual_seed(seed)
  shape = (multi, d) if multi else (d,)
  glp = GLP(DenoiserConfig(d, 64, 128, 2, multi), torch.randn(shape) * 0.1, torch.rand(shape) + 0.5)
  with torch.no_grad():   # non-trivial weights: the zero-init output layer would make the velocity constant
    for p in glp.denoiser.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return glp.eval()


def unit(seed: int = 1) -> torch.Tensor:
  w = torch.randn(D, generator=torch.Generator().manual_seed(seed))
  return w / w.norm()


def batch(tok):
  ids = [tok(t)["input_ids"] for t in ("The weather today is", "My neighbour told me that the")]
  s = max(map(len, ids))
  ids_BxS = torch.full((2, s), tok.eos_token_id, dtype=torch.long)
  mask_BxS = torch.zeros(2, s, dtype=torch.long)
  for i, x in enumerate(ids):   # left padding, as for generation
    ids_BxS[i, s - len(x):], mask_BxS[i, s - len(x):] = torch.tensor(x), 1
  return ids_BxS, mask_BxS


def layer_output(model, ids, mask, ctx=None):
  """The steered layer's output (as the next layer sees it) and the logits, under `ctx`."""
  import contextlib
  with ctx or contextlib.nullcontext(), lm.ResidualCapture(model, [LAYER], stop=False) as cap:
    with torch.inference_mode():
      logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return cap.outputs[LAYER], logits


def greedy(model, tok, ids, mask, ctx=None, n: int = 8):
  import contextlib
  with ctx or contextlib.nullcontext(), torch.inference_mode():
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=tok.eos_token_id)[:, ids.shape[1]:]


@pytest.mark.parametrize("positions", [None, "last", [0, -2], "mask"])
def test_alpha_zero_without_prior_is_exactly_the_identity(tiny, positions):
  _, model, tok = tiny
  ids, mask = batch(tok)
  if positions == "mask":
    positions = mask.bool()
  h0, logits0 = layer_output(model, ids, mask)
  h, logits = layer_output(model, ids, mask, steer(model, LAYER, unit(), 0.0, positions=positions))
  assert torch.equal(h, h0) and torch.equal(logits, logits0)
  assert torch.equal(greedy(model, tok, ids, mask, steer(model, LAYER, unit(), 0.0, positions)),
                     greedy(model, tok, ids, mask))


def test_large_alpha_changes_greedy_generation_and_the_hook_goes_away(tiny):
  _, model, tok = tiny
  ids, mask = batch(tok)
  plain = greedy(model, tok, ids, mask)
  h0, _ = layer_output(model, ids, mask)
  alpha = 20.0 * float(h0.norm(dim=-1).mean())
  own_hooks = set(lm.decoder_layers(model)[LAYER]._forward_hooks)   # transformers installs hooks of its own
  for prior in (None, random_prior()):
    steered = greedy(model, tok, ids, mask, steer(model, LAYER, unit(), alpha, positions="last", prior=prior,
                                                  generator=torch.Generator().manual_seed(0)))
    assert steered.shape == plain.shape and not torch.equal(steered, plain), prior
  assert set(lm.decoder_layers(model)[LAYER]._forward_hooks) == own_hooks
  assert torch.equal(greedy(model, tok, ids, mask), plain)


@pytest.mark.parametrize("positions,want", [
    ("last", [[False] * 5 + [True]] * 2),
    ("all", [[True] * 6] * 2),
    (2, [[False, False, True, False, False, False]] * 2),
    ([0, -1, 7], [[True, False, False, False, False, True]] * 2),   # 7 is outside S = 6: ignored
    (torch.tensor([[1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool),
     [[True, False, False, False, False, True], [False, True, False, False, False, False]]),
])
def test_positions_select_where_alpha_w_is_added(positions, want):
  h = torch.randn(2, 6, D, dtype=torch.bfloat16)
  w = unit()
  out = steering_edit(w, 3.0, positions)(h)
  moved = (out.float() - h.float()).abs().amax(-1) > 0
  assert moved.tolist() == want and out.dtype == torch.bfloat16
  sel = torch.tensor(want)
  assert torch.equal(out[sel], (h[sel].float() + 3.0 * w).to(torch.bfloat16))
  assert torch.equal(out[~sel], h[~sel])
  # A mask for another sequence length (e.g. the prompt's, during cached decoding) selects nothing.
  assert not position_mask(torch.ones(4, dtype=torch.bool), torch.Size([2, 6]), h.device).any()


@pytest.mark.parametrize("positions", [0, [0, 1, 2], -1])
def test_indices_leave_the_one_token_forwards_of_generate_alone(tiny, positions):
  """Indices address the prompt's forward (docs/steering.md); 0 and -1 also fit every one-token forward of
  cached generation, so positions=[0, 1, 2] (the first prompt tokens) steered every generated token too."""
  _, model, tok = tiny
  ids, mask = batch(tok)
  seen = []   # (sequence length, steered?) of each forward
  edit = steering_edit(unit(), 50.0, positions)
  def record(h):
    out = edit(h)
    seen.append((h.shape[-2], not torch.equal(out, h)))
    return out
  with hooks.edit_output(lm.decoder_layers(model)[LAYER], record), torch.no_grad():
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                   pad_token_id=tok.eos_token_id)
  assert seen == [(ids.shape[1], True), (1, False), (1, False)], seen


def test_prior_projects_exactly_the_edited_positions(tiny):
  _, model, tok = tiny
  ids, mask = batch(tok)
  glp, w, alpha = random_prior(), unit(), 5.0
  h0, _ = layer_output(model, ids, mask)
  h, _ = layer_output(model, ids, mask, steer(model, LAYER, w, alpha, positions="last", prior=glp,
                                              generator=torch.Generator().manual_seed(3)))
  want = glp.sample_on_manifold(h0[:, -1] + alpha * w, generator=torch.Generator().manual_seed(3))
  torch.testing.assert_close(h[:, -1], want, rtol=1e-5, atol=1e-5)
  assert not torch.allclose(h[:, -1], h0[:, -1] + alpha * w, atol=1e-3)   # really projected
  assert torch.equal(h[:, :-1], h0[:, :-1])
  # start/steps reach the prior: a later start (less noise) gives a different projection.
  other, _ = layer_output(model, ids, mask, steer(model, LAYER, w, alpha, positions="last", prior=glp, start=0.9,
                                                  generator=torch.Generator().manual_seed(3)))
  assert not torch.allclose(other[:, -1], h[:, -1])


def test_multi_layer_prior_is_conditioned_on_the_hooked_layer():
  glp = random_prior(multi=3)
  seen = []
  real = glp.sample_on_manifold
  glp.sample_on_manifold = lambda x, *a, **k: (seen.append(k["layer_idx"]), real(x, *a, **k))[1]

  class Toy(torch.nn.Module):   # returns a tuple, as GPT-2-style and older decoder layers do
    def forward(self, h):
      return h * 1.0, "extra"

  class ToyLM(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.config = type("Cfg", (), {"num_hidden_layers": 3})()
      self.model = torch.nn.Module()
      self.model.layers = torch.nn.ModuleList([Toy() for _ in range(3)])

    def forward(self, h):
      for layer in self.model.layers:
        h, extra = layer(h)
      return h, extra

  toy = ToyLM()
  h = torch.randn(2, 4, D)
  with steer(toy, 2, unit(), 1.0, positions="last", prior=glp):
    out, extra = toy(h)
  assert seen == [2] and extra == "extra"
  assert torch.equal(out[:, :-1], h[:, :-1]) and not torch.allclose(out[:, -1], h[:, -1])
  with steer(toy, toy.model.layers[0], unit(), 0.0):   # a module passed directly
    assert torch.equal(toy(h)[0], h)


def test_bad_arguments_are_named(tiny):
  _, model, tok = tiny
  ids, mask = batch(tok)
  with pytest.raises(ValueError, match="D=63"):
    layer_output(model, ids, mask, steer(model, LAYER, torch.ones(63), 1.0))
  with pytest.raises(ValueError, match="positions"):
    layer_output(model, ids, mask, steer(model, LAYER, unit(), 1.0, positions="first"))
  with pytest.raises(ValueError, match="out of range"):
    with steer(model, 3, unit(), 1.0):
      pass
  with pytest.raises(ValueError, match="prior models D=32"):
    steering_edit(unit(), 1.0, prior=random_prior(d=32))


def doc_block(title: str) -> str:
  """The first ```python block after the heading `title` in docs/steering.md."""
  text = open(os.path.join(ROOT, "docs", "steering.md")).read()
  section = text[text.index(title):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_transformers_example_runs_as_written(tiny, tmp_path):
  path, _, _ = tiny
  random_prior().save_pretrained(str(tmp_path / "prior"))
  code = doc_block("## Hugging Face transformers")
  setting = 'LM, PRIOR, LAYER = "meta-llama/Llama-3.2-1B", "org/glp-llama1b-d6", 7'
  assert setting in code   # the line the test swaps for a tiny LM and a local prior
  code = code.replace(setting, f"LM, PRIOR, LAYER = {path!r}, {str(tmp_path / 'prior')!r}, {LAYER}")
  scope: dict = {}
  exec(compile(code, "docs/steering.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["steered"].shape[0] == scope["plain"].shape[0] == 1
  assert np.isfinite(float(scope["act_norm"])) and abs(float(scope["w"].norm()) - 1) < 1e-5
