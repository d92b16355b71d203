"""LM-side evaluations on a random-init tiny Llama (saved to tmp) and, where a real LM is needed, SmolLM2."""
import numpy as np
import pytest

pytestmark = pytest.mark.torch

DOCS = ["The quick brown fox jumps over the lazy dog near the quiet river bank today.",
        "Python lists are mutable sequences, typically used to store collections of items.",
        "A function returns a value to its caller when it reaches a return statement.",
        "Every morning the baker opens the shop and sells fresh bread to the neighbours."]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
  import torch
  import transformers
  from glp_jax.torch import lm
  torch.manual_seed(0)
  tok = lm.load_tokenizer(lm.EMBEDDED)
  cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)
  path = str(tmp_path_factory.mktemp("tiny_llama"))
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  tok.save_pretrained(path)
  return lm.load_causal_lm(path, dtype="float32")


def _stats_prior(model, tok, layer):
  from glp_jax.evals import prior as prior_lib, tasks
  x = tasks.last_token_activations(model, tok, DOCS * 4, layer)
  return prior_lib.gaussian_prior(x.mean(0), x.var(0) + 1e-3)


def test_per_doc_loss_matches_hf_loss(tiny_lm):
  import torch
  from glp_jax.evals import delta_lm, tasks
  model, tok = tiny_lm
  docs = delta_lm.tokenize_documents(tok, DOCS[:2], max_length=32)
  assert all(d[0] == tok.bos_token_id for d in docs)
  ids, mask = tasks.pad(docs, tasks.pad_id(tok))
  with torch.no_grad():
    got = delta_lm.per_doc_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    for i, d in enumerate(docs):
      t = torch.as_tensor([d])
      np.testing.assert_allclose(got[i], float(model(input_ids=t, labels=t).loss), rtol=1e-5)


def test_delta_lm_identity_is_exactly_zero(tiny_lm):
  from glp_jax.evals import delta_lm
  model, tok = tiny_lm
  res = delta_lm.evaluate_delta_lm(_stats_prior(model, tok, 0), model, tok, DOCS, layer=0, max_length=32,
                                   batch_size=3)
  assert res["delta_lm_identity"] == 0.0
  assert np.isfinite(res["delta_lm"]) and np.isfinite(res["delta_lm_sem"]) and res["delta_lm_docs"] == 4
  assert res["delta_lm"] != 0.0


def test_a_store_extracted_without_bos_is_evaluated_without_one(tiny_lm):
  """prepend_bos off with a tokenizer that adds none trains the prior on every position, the first included:
  the evaluations fed text with a BOS anyway, and delta LM never edited position 0."""
  from glp_jax.evals import delta_lm, tasks
  model, tok = tiny_lm
  plain = tok(DOCS[0], add_special_tokens=False)["input_ids"]
  assert tasks.encode(tok, DOCS[0], 8, bos=False) == plain[:8]
  assert tasks.encode(tok, DOCS[0], 8, keep_end=True, bos=False) == plain[-8:]
  assert tasks.encode(tok, DOCS[0], 8) == [tok.bos_token_id] + plain[:7]
  edited = []

  def record(h_BxSxD, mask_BxS):
    edited.append(mask_BxS.clone())
    return h_BxSxD
  delta_lm.delta_lm_losses(model, tok, DOCS[:2], 0, {"id": record}, max_length=16, bos=False)
  delta_lm.delta_lm_losses(model, tok, DOCS[:2], 0, {"id": record}, max_length=16)
  assert bool(edited[0][:, 0].all()) and not bool(edited[1][:, 0].any())
  assert int(edited[0].sum()) == sum(len(d) for d in delta_lm.tokenize_documents(tok, DOCS[:2], 16, bos=False))


def test_a_tokenizer_without_bos_gets_its_first_token_edited(tiny_lm):
  """encode prepends no BOS when the tokenizer defines none (Qwen-style); delta LM still left position 0, a real
  token then, unedited."""
  import copy
  from glp_jax.evals import delta_lm
  model, tok = tiny_lm
  tok = copy.deepcopy(tok)
  tok.bos_token = None
  assert tok.bos_token_id is None
  edited = []

  def record(h_BxSxD, mask_BxS):
    edited.append(mask_BxS.clone())
    return h_BxSxD
  delta_lm.delta_lm_losses(model, tok, DOCS[:2], 0, {"id": record}, max_length=16)
  assert bool(edited[0][:, 0].all())


def test_delta_lm_mean_replacement_hurts_a_real_lm():
  from glp_jax.torch import lm
  from glp_jax.evals import delta_lm, tasks
  model, tok = lm.load_causal_lm(lm.EMBEDDED, dtype="float32")
  x = tasks.last_token_activations(model, tok, DOCS, 10, max_length=24)
  edits = {"mean": delta_lm.constant_edit(x.mean(0)), "identity": delta_lm.identity_edit}
  res = delta_lm.delta_lm_losses(model, tok, DOCS, 10, edits, max_length=24, batch_size=4)
  assert res["identity"]["delta"] == 0.0
  assert res["mean"]["delta"] > 0.5 and res["mean"]["delta"] > 3 * res["mean"]["sem"], res


def test_steering_concept_grows_with_alpha(tiny_lm, tmp_path):
  from glp_jax.evals import steer, tasks
  model, tok = tiny_lm
  pos, neg = tasks.sentiment_texts()
  prior = _stats_prior(model, tok, 1)
  out, rows = steer.evaluate_steering(prior, model, tok, 1, pos[::40], neg[::40], tasks.neutral_prompts()[:3],
                                rs=(0.0, 1.0, 3.0), max_new_tokens=5, plot_path=str(tmp_path / "f.png"))
  assert len(rows) == 6 and (tmp_path / "f.png").stat().st_size > 1000
  c = [out[f"steer_add_r{r:g}_concept"] for r in (0, 1, 3)]
  assert c[0] < c[1] < c[2], c
  assert out["steer_glp_r3_concept"] > out["steer_glp_r0_concept"], out
  assert all(np.isfinite(out[k]) for k in ("steer_add_nll", "steer_glp_nll", "steer_glp_concept"))


def test_continuations_end_at_every_stop_token_of_the_generation_config(tiny_lm, monkeypatch):
  """An Instruct model's generation config lists several stop tokens besides the tokenizer's EOS, and a finished
  row is filled with the pad id (0 for a tokenizer without a pad, as Llama 3's): the continuation kept the stop
  token and the pads, and they were scored as generated text."""
  from glp_jax.evals import steer, tasks
  model, tok = tiny_lm
  prompts = tasks.neutral_prompts()[:2]
  first = steer.generate(model, tok, prompts, max_new_tokens=4)[0]
  stop = first[-1]   # a token the first continuation emits: made a stop token of the generation config
  monkeypatch.setattr(tasks, "pad_id", lambda tokenizer: 0)   # the tokenizer's pad is its EOS: make it another
  monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, stop])
  conts = steer.generate(model, tok, prompts, max_new_tokens=4)
  assert conts[0] == first[:first.index(stop)] and all(stop not in c and 0 not in c for c in conts), conts


def test_judge_rating_parser():
  from glp_jax.evals import steer
  assert steer.parse_rating("blah Rating: [[1]] ... Rating: [[2]]") == 2.0
  assert np.isnan(steer.parse_rating("no rating"))
  with pytest.raises(ValueError, match="API key"):
    steer.openai_judge("m", "http://localhost:1", api_key_env="GLP_TEST_NO_SUCH_KEY")


def test_a_judge_reply_without_a_rating_is_left_out_not_a_nan_mean(tiny_lm):
  """parse_rating gives NaN for a reply without 'Rating: [[n]]'; one such reply made that r's judge means NaN."""
  from glp_jax.evals import steer, tasks
  model, tok = tiny_lm
  pos, neg = tasks.sentiment_texts()
  prompts = tasks.neutral_prompts()[:3]
  judge = lambda prompt, cont, concept: (float("nan"), 0.0) if prompt == prompts[0] else (2.0, 1.0)
  out, _ = steer.evaluate_steering(_stats_prior(model, tok, 1), model, tok, 1, pos[::80], neg[::80], prompts,
                                   rs=(0.0,), max_new_tokens=2, judge=judge)
  for mode in ("add", "glp"):
    assert out[f"steer_{mode}_r0_judge_concept"] == 2.0, out   # the fluency reply was parsed: it counts
    assert out[f"steer_{mode}_r0_judge_fluency"] == pytest.approx(2 / 3), out
    assert out[f"steer_{mode}_r0_judge_unparsed"] == 1.0


def test_last_token_activations_and_mlp_neurons(tiny_lm):
  import torch
  from glp_jax.torch import lm
  from glp_jax.evals import tasks
  model, tok = tiny_lm
  texts = ["A short one.", "A somewhat longer sentence than the first one is."]
  x, mlp = tasks.last_token_activations(model, tok, texts, layer=1, mlp_neurons=True)
  assert x.shape == (2, 64) and mlp.shape == (2, 128)
  x0 = tasks.last_token_activations(model, tok, texts, layer=0)   # hidden_states[1]; [2] is final-normed
  mlp_mod = lm.decoder_layers(model)[1].mlp
  for i, t in enumerate(texts):                 # unpadded, one at a time, full forward
    ids = torch.as_tensor([tasks.encode(tok, t)])
    seen = []
    handle = mlp_mod.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
      hs = model(input_ids=ids, output_hidden_states=True).hidden_states
      h = seen[0][0, -1]
      neurons = mlp_mod.act_fn(mlp_mod.gate_proj(h)) * mlp_mod.up_proj(h)
    handle.remove()
    np.testing.assert_allclose(x0[i], hs[1][0, -1].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mlp[i], neurons.numpy(), rtol=1e-4, atol=1e-5)


def test_projections_draw_fresh_noise_at_every_call_from_one_seeded_stream():
  """Steering projects once per generated token and delta LM once per batch; one seed per call gave every token
  (every batch's k-th document) the same noise, a bias that does not average out (the reference: randn per call)."""
  import torch
  from glp_jax.evals import delta_lm, prior as prior_lib, steer
  rng = np.random.default_rng(0)
  prior = prior_lib.gaussian_prior(rng.standard_normal(6), rng.uniform(0.5, 2.0, 6))
  x_BxSxD = torch.as_tensor(rng.standard_normal((1, 3, 6)), dtype=torch.float32)
  mask_BxS = torch.ones(1, 3, dtype=torch.bool)

  def steering(seed):   # the edit's projection, as the steering hook calls it
    projection = steer._Projection(prior, seed)
    return lambda: projection.sample_on_manifold(x_BxSxD[0], 0.5, 20)

  def delta(seed):
    edit = delta_lm.project_edit(prior, seed=seed)
    return lambda: edit(x_BxSxD, mask_BxS)[0]
  for make in (steering, delta):
    f, g = make(5), make(5)
    first, second = f(), f()
    assert not torch.allclose(first, second)   # fresh noise for the same input
    assert torch.equal(g(), first) and torch.equal(g(), second)   # the same seeded stream


def test_steering_summary_averages_only_r_above_one(tiny_lm, monkeypatch):
  """The scaling metric is the mean over |r| > 1 (reference); r = 1 was averaged in too."""
  from glp_jax.evals import steer, tasks
  model, tok = tiny_lm
  pos, neg = tasks.sentiment_texts()
  out, _ = steer.evaluate_steering(_stats_prior(model, tok, 1), model, tok, 1, pos[::80], neg[::80],
                                   tasks.neutral_prompts()[:2], rs=(0.0, 1.0, 2.0, 3.0), max_new_tokens=3)
  for mode in ("add", "glp"):
    for m in ("concept", "nll"):
      want = np.mean([out[f"steer_{mode}_r{r}_{m}"] for r in (2, 3)])
      assert out[f"steer_{mode}_{m}"] == pytest.approx(want), (mode, m)


def test_steering_summary_leaves_out_negative_r(tiny_lm):
  """A grid with r < 0 (steering away from the concept, whose <h, w> is negative) averaged r = -2 with r = 2 into
  the summary: the concept gains cancelled. The reference's metric is over the positive-concept runs only."""
  from glp_jax.evals import steer, tasks
  model, tok = tiny_lm
  pos, neg = tasks.sentiment_texts()
  out, _ = steer.evaluate_steering(_stats_prior(model, tok, 1), model, tok, 1, pos[::80], neg[::80],
                                   tasks.neutral_prompts()[:2], rs=(-2.0, 0.0, 2.0), max_new_tokens=3)
  for mode in ("add", "glp"):
    for m in ("concept", "nll"):
      assert out[f"steer_{mode}_{m}"] == pytest.approx(out[f"steer_{mode}_r2_{m}"]), (mode, m)


@pytest.mark.parametrize("family", ["phi", "gptj", "mpt"])
def test_mlp_neurons_of_other_families(tiny_lm, family):
  """Phi-1/2, GPT-J and MPT name their MLP down-projection mlp.fc2, mlp.fc_out and ffn.down_proj: the probe's
  MLP-neuron baseline was silently missing (None) for them."""
  import torch
  import transformers as T
  from glp_jax.evals import tasks
  _, tok = tiny_lm
  v = len(tok)
  cls, cfg = {
      "phi": (T.PhiForCausalLM, T.PhiConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4)),
      "gptj": (T.GPTJForCausalLM, T.GPTJConfig(vocab_size=v, n_embd=32, n_inner=64, n_layer=2, n_head=4,
                                               rotary_dim=4)),
      "mpt": (T.MptForCausalLM, T.MptConfig(vocab_size=v, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2)),
  }[family]
  torch.manual_seed(0)
  model = cls(cfg).eval()
  texts = ["A short one.", "A somewhat longer sentence than the first one is."]
  x, mlp = tasks.last_token_activations(model, tok, texts, layer=1, mlp_neurons=True)
  down = tasks._mlp_down_proj(model, 1)
  assert x.shape == (2, 32) and mlp is not None and mlp.shape == (2, down.in_features)
  ids = torch.as_tensor([tasks.encode(tok, texts[1])])
  seen = []
  handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
  with torch.no_grad():
    model(input_ids=ids)
  handle.remove()
  np.testing.assert_allclose(mlp[1], seen[0][0, -1].numpy(), rtol=1e-5, atol=1e-6)
