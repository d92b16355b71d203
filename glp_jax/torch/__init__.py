"""glp_jax priors in PyTorch, with only torch + safetensors + numpy (no JAX, no Flax).

`GLP.from_pretrained(folder)` loads a `glp-export` folder or a reference GLP folder (config.yaml +
rep_statistics.pt + final.safetensors); see `glp_jax.torch.prior` for the API and `glp_jax.torch.io` for
the on-disk layouts. Nothing here may import jax or a glp_jax module that does.
"""
from glp_jax.torch.io import expected_shapes, read_folder, write_folder
from glp_jax.torch.model import Denoiser, DenoiserConfig, Normalizer, TransformerMLPDenoiser, sinusoidal_embedding
from glp_jax.torch.prior import GLP
from glp_jax.core.grid import manifold_start_index as start_index
from glp_jax.torch.sampling import euler_grid, euler_sample

__all__ = ["GLP", "Denoiser", "DenoiserConfig", "Normalizer", "TransformerMLPDenoiser", "euler_grid",
           "euler_sample", "expected_shapes", "read_folder", "sinusoidal_embedding", "start_index",
           "write_folder"]
