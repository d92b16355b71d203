"""Forward hooks that read or replace a module's output, whatever its shape (torch only).

A decoder layer's output is a tensor in transformers 5.x (Llama, Qwen, ...) and a tuple `(hidden, ...)` in
older releases and some families (GPT-2 keeps a tuple); TransformerLens hook points return the tensor.
`hidden_of` and `edit_output` handle every case, so the extractor, the evaluations and `steer` share one
implementation:

  with edit_output(model.model.layers[7], lambda h_BxSxD: h_BxSxD + w_D):
    model.generate(...)
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

EditFn = Callable[[torch.Tensor], torch.Tensor]


def hidden_of(output: Any) -> torch.Tensor:
  """The hidden state in a module output: the tensor itself, or the first element of a tuple/list."""
  return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
  """`output` with its hidden state replaced, keeping the container type (tensor, tuple or list)."""
  if isinstance(output, tuple):
    return (hidden,) + tuple(output[1:])
  if isinstance(output, list):
    return [hidden] + list(output[1:])
  return hidden


@contextlib.contextmanager
def edit_output(module: nn.Module, edit_fn: EditFn) -> Iterator[None]:
  """Within the block, `module` outputs `edit_fn(hidden)` in place of its own hidden state.

  The edit runs before every other forward hook on `module`, whenever that one was registered (a capture,
  transformers' `output_hidden_states` recorder, installed at a model's first forward): they all see the
  edited output, as the next module does. Edits nested on one module apply innermost first.
  """
  def hook(mod, args, output):
    del mod, args
    return replace_hidden(output, edit_fn(hidden_of(output)))

  # prepend: a fixed order, whether hooks were registered before or after this one
  handle = module.register_forward_hook(hook, prepend=True)
  try:
    yield
  finally:
    handle.remove()
