"""Parameter counts (reference table, without allocating) and FLOPs (analytic vs XLA's cost analysis)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from glp_jax.core import flops
from glp_jax.core import flow
from glp_jax.core import model as M

# glp_reference.md §1 (paper Table 1 sizes).
REFERENCE_PARAMS = {
    "llama1b-d3": 453_117_952,
    "llama1b-d6": 855_881_728,
    "llama1b-d12": 1_661_409_280,
    "llama1b-d24": 3_272_464_384,
    "llama1b-d12-multi": 1_694_971_904,
    "llama8b-d6": 3_423_039_488,
}


def _preset(name):
  return M.model_config(ml_collections.ConfigDict(dict(preset=name, d_input=0, multi_layer_n_layers=0,
                                                       compute_dtype="float32")))


def _abstract_count(cfg):
  abstract = nnx.eval_shape(lambda: M.Denoiser(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(v.shape)) for _, v in nnx.state(abstract, nnx.Param).flat_state())


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_reference_param_counts_without_allocating(name):
  cfg = _preset(name)
  assert flops.param_count(cfg) == REFERENCE_PARAMS[name]
  assert _abstract_count(cfg) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("cfg", [M.ModelConfig(5, 7, 11, 1), M.ModelConfig(12, 16, 40, 3, 4)])
def test_param_count_matches_real_model(cfg):
  model = M.Denoiser(cfg, rngs=nnx.Rngs(0))
  real = sum(v.size for v in M.to_reference_state_dict(model).values())
  assert flops.param_count(cfg) == real
  kernels = sum(v.size for k, v in M.to_reference_state_dict(model).items() if k.endswith("proj.weight")
                or ("embed" in k and k.endswith("weight")))
  assert flops.matmul_params(cfg) == kernels


def test_flop_conventions():
  cfg = _preset("llama1b-d3")
  fwd = flops.forward_flops_per_example(cfg)
  assert fwd == 2 * (2 * 2048 * 4096 + 2 * 4096 ** 2 + 3 * 4 * 4096 * 8192)
  assert flops.train_flops_per_example(cfg) == 3 * fwd
  assert flops.six_n_flops(cfg) == 6 * 453_117_952
  # 6N counts biases and norms too; they are < 0.1% of the parameters at reference widths.
  assert 0 < flops.six_n_flops(cfg) / flops.train_flops_per_example(cfg) - 1 < 1e-3
  # Paper Fig. 13's colour bar starts at 6 * 0.45B params * 1M activations ~ 2.72e15.
  assert flops.six_n_flops(cfg) * 1e6 == pytest.approx(2.72e15, rel=2e-3)


@pytest.mark.parametrize("cfg,batch", [(M.ModelConfig(64, 128, 256, 2), 256),
                                       (M.ModelConfig(96, 96, 384, 3, multi_layer_n_layers=4), 128)])
def test_analytic_train_flops_match_xla_cost_analysis(cfg, batch):
  model = M.Denoiser(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.01), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  layer = jnp.zeros((batch,), jnp.int32) if cfg.multi_layer_n_layers else None

  def train_step(state, x, key):
    m, o = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: flow.loss(m, x, key, layer))(m)
    o.update(m, grads)
    return nnx.state((m, o)), loss

  x = jax.ShapeDtypeStruct((batch, cfg.d_input), jnp.float32)
  cost = jax.jit(train_step).lower(state, x, jax.random.key(0)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_per_example = cost["flops"] / batch
  ratio = xla_per_example / flops.train_flops_per_example(cfg)
  assert abs(ratio - 1) < 0.05, ratio


def test_peak_flops_table_matches_the_most_specific_name():
  """A device kind takes the first table name it contains, so longer names must come first: an L40 is not an L4,
  an H100 NVL not an H100 SXM; an unknown device (a CPU) gives no peak at all, and so no MFU."""
  from types import SimpleNamespace
  from glp_jax.training.metrics import peak_flops
  kinds = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
           "NVIDIA H100 NVL": 835e12, "NVIDIA H200 NVL": 835e12, "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12,
           "NVIDIA L4": 121e12, "TPU v5 lite": 197e12}
  for kind, peak in kinds.items():
    assert peak_flops([SimpleNamespace(device_kind=kind)]) == peak, kind
  assert peak_flops([SimpleNamespace(device_kind="NVIDIA H200")] * 8) == 8 * 989e12
  assert peak_flops([SimpleNamespace(device_kind="NVIDIA H200"), SimpleNamespace(device_kind="cpu")]) is None
