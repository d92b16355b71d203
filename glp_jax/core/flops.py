"""Analytic parameter and FLOP counts of the denoiser (per example = per activation row).

Two conventions: the reference's C = 6 N D (`six_n_flops`, N = all parameters), and the exact matmul count
(`forward_flops_per_example`, multiply-add = 2 FLOPs, including the time/layer embedding MLPs, which run
once per row). Elementwise work (LayerNorm, SiLU, products) is left out: it is < 1% of the matmuls at
reference widths. Training = the conventional 3 x forward (forward + input and weight gradients), which also
counts two input gradients the backward never computes (of `in_proj` from the data, of the embeddings' first
layer from the sinusoid): 2 (D M + E M^2) per row with E embedding MLPs (2 with layer conditioning), 0.3-2%
of a preset's count (more for tiny models).
"""
from __future__ import annotations

from glp_jax.core.model import ModelConfig


def _linear_params(d_in: int, d_out: int) -> int:
  return d_in * d_out + d_out


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters (weights, biases, LayerNorm scales and biases)."""
  d, m, f = cfg.d_input, cfg.d_model, cfg.d_mlp
  block = 3 * _linear_params(m, f) + _linear_params(f, m) + 2 * m
  embed_mlp = 2 * _linear_params(m, m)
  n_embed = 2 if cfg.multi_layer_n_layers else 1
  return (_linear_params(d, m) + _linear_params(m, d) + n_embed * embed_mlp + 2 * m
          + cfg.n_layers * block)


def matmul_params(cfg: ModelConfig) -> int:
  """Number of kernel (matrix) entries; each costs 2 FLOPs per row in the forward pass."""
  d, m, f = cfg.d_input, cfg.d_model, cfg.d_mlp
  n_embed = 2 if cfg.multi_layer_n_layers else 1
  return 2 * d * m + n_embed * 2 * m * m + cfg.n_layers * 4 * m * f


def forward_flops_per_example(cfg: ModelConfig) -> int:
  """Exact matmul FLOPs of one forward pass for one row."""
  return 2 * matmul_params(cfg)


def train_flops_per_example(cfg: ModelConfig) -> int:
  """Training FLOPs per row: forward + backward (2x forward) = 3x forward (see the module docstring)."""
  return 3 * forward_flops_per_example(cfg)


def six_n_flops(cfg: ModelConfig) -> int:
  """The reference's (Kaplan/Chinchilla) convention, 6 N FLOPs per training row: C = 6 N D."""
  return 6 * param_count(cfg)
