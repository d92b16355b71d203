"""glp_jax priors in PyTorch, with only torch + safetensors + numpy + PyYAML + huggingface_hub (no JAX).

`GLP.from_pretrained(folder_or_repo_id)` loads a `glp-export` folder or a reference GLP folder (config.yaml +
rep_statistics.pt + final.safetensors), locally or from the Hugging Face Hub; see `glp_jax.torch.prior` for
the API, `glp_jax.torch.io` for the on-disk layouts, `glp_jax.torch.hub` for the Hub, and
`glp_jax.torch.steering` for `steer` (docs/steering.md), and `glp_jax.torch.lm` for loading any HF causal LM
and finding its decoder layers (transformers, imported when an LM is loaded; extraction and evals use it too).
Nothing here may import jax or a glp_jax module that does.
"""
from glp_jax.torch.hooks import edit_output, hidden_of
from glp_jax.torch.io import read_folder, write_folder
from glp_jax.torch.model import (Denoiser, DenoiserConfig, Normalizer, TransformerMLPDenoiser, expected_shapes,
                                  sinusoidal_embedding)
from glp_jax.torch.prior import GLP
from glp_jax.core.grid import manifold_start_index as start_index
from glp_jax.torch.sampling import euler_grid, euler_sample
from glp_jax.torch.steering import steer, steering_edit

__all__ = ["GLP", "Denoiser", "DenoiserConfig", "Normalizer", "TransformerMLPDenoiser", "edit_output",
           "euler_grid", "euler_sample", "expected_shapes", "hidden_of", "read_folder", "sinusoidal_embedding",
           "start_index", "steer", "steering_edit", "write_folder"]
