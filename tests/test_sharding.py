"""Mesh construction, partitioning rules, and FSDP really sharding parameters (8 fake CPU devices)."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from glp_jax.core import model as model_lib
from glp_jax.training import sharding
from glp_jax.util.config import ConfigError


def mesh_cfg(data, fsdp):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


def test_mesh_shape_resolves_the_rest_and_rejects_misfits():
  assert sharding.mesh_shape(mesh_cfg(-1, 1), 8) == (8, 1)
  assert sharding.mesh_shape(mesh_cfg(2, -1), 8) == (2, 4)
  assert sharding.mesh_shape(mesh_cfg(1, 8), 8) == (1, 8)
  with pytest.raises(ConfigError, match="does not divide the 8 devices"):
    sharding.mesh_shape(mesh_cfg(3, -1), 8)
  with pytest.raises(ConfigError, match="product must equal"):
    sharding.mesh_shape(mesh_cfg(2, 2), 8)
  with pytest.raises(ConfigError, match="at most one axis"):
    sharding.mesh_shape(mesh_cfg(-1, -1), 8)


def test_auto_fsdp_splits_what_the_devices_and_widths_allow():
  """mesh.fsdp = 0: small models replicate; large ones shard over the largest device divisor that divides the
  widths (6 devices, 2048-wide: 2, not a 6 that divides nothing); with mesh.data set, fsdp takes what is left."""
  big = model_lib.ModelConfig(d_input=2048, d_model=2048, d_mlp=8192, n_layers=6)
  small = model_lib.ModelConfig(d_input=16, d_model=32, d_mlp=64, n_layers=2)
  assert sharding.resolve_mesh(mesh_cfg(-1, 0), small, 8) == {"data": -1, "fsdp": 1}
  assert sharding.resolve_mesh(mesh_cfg(-1, 0), big, 8) == {"data": 1, "fsdp": 8}
  assert sharding.resolve_mesh(mesh_cfg(-1, 0), big, 6) == {"data": 3, "fsdp": 2}
  assert sharding.resolve_mesh(mesh_cfg(-1, 0), big, 12) == {"data": 3, "fsdp": 4}
  assert sharding.resolve_mesh(mesh_cfg(4, 0), small, 8) == {"data": 4, "fsdp": 2}
  assert sharding.resolve_mesh(mesh_cfg(2, 4), small, 8) == {"data": 2, "fsdp": 4}   # explicit: kept


def test_make_mesh_axes_and_batch_checks():
  mesh = sharding.make_mesh(mesh_cfg(2, -1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sharding.batch_divisor(mesh) == 8
  sharding.check_batch(64, mesh)
  with pytest.raises(ConfigError, match="batch_size=12 is not divisible by the 8 batch shards"):
    sharding.check_batch(12, mesh)
  x = sharding.put_global(np.arange(32.0).reshape(16, 2), sharding.batch_sharding(mesh))
  assert x.sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in x.addressable_shards} == {(2, 2)}
  np.testing.assert_array_equal(np.asarray(x), np.arange(32.0).reshape(16, 2))


def test_every_model_logical_axis_has_a_rule():
  assert set(model_lib.LOGICAL_AXES) <= {name for name, _ in sharding.LOGICAL_RULES}


def test_spec_for_picks_largest_divisible_dim_once():
  mesh = sharding.make_mesh(mesh_cfg(2, 4))
  assert sharding.spec_for((64, 256), ("embed", "mlp"), mesh) == P(None, "fsdp")
  assert sharding.spec_for((256, 64), ("mlp", "embed"), mesh) == P("fsdp", None)
  assert sharding.spec_for((64, 64), ("embed", "cond"), mesh) == P("fsdp", None)  # tie: first dim
  assert sharding.spec_for((64, 6), ("embed", "input"), mesh) == P("fsdp", None)    # 6 % 4 != 0
  assert sharding.spec_for((6, 10), ("input", "embed"), mesh) == P(None, None)     # nothing divides
  assert sharding.spec_for((64,), ("norm",), mesh) == P(None)                     # LayerNorm: replicated
  assert sharding.spec_for((64,), None, mesh) == P()
  one = sharding.make_mesh(mesh_cfg(8, 1))
  assert sharding.spec_for((64, 256), ("embed", "mlp"), one) == P(None, None)    # fsdp=1: replicated


def test_fsdp_shards_every_kernel_and_optimizer_state():
  import optax
  mesh = sharding.make_mesh(mesh_cfg(1, 8))
  cfg = model_lib.ModelConfig(d_input=16, d_model=32, d_mlp=64, n_layers=2)

  def create():
    m = model_lib.Denoiser(cfg, rngs=nnx.Rngs(0))
    return m, nnx.Optimizer(m, optax.adam(1e-3), wrt=nnx.Param)
  model, opt = sharding.create_sharded(create, mesh)
  kernels = [(p, v[...]) for p, v in nnx.state(model, nnx.Param).flat_state() if p[-1] == "kernel"]
  assert len(kernels) == 2 + 2 + 4 * 2  # in/out, time_embed x2, 4 per block
  for path, k in kernels:
    assert "fsdp" in tuple(k.sharding.spec), path
    dim = list(k.sharding.spec).index("fsdp")
    shard_shapes = {s.data.shape for s in k.addressable_shards}
    assert shard_shapes == {tuple(n // 8 if i == dim else n for i, n in enumerate(k.shape))}, path
    assert len({s.device for s in k.addressable_shards}) == 8
  # Adam moments follow their parameters.
  mu = [v[...] for p, v in nnx.state(opt).flat_state() if "mu" in map(str, p) and p[-1] == "kernel"]
  assert mu and all("fsdp" in tuple(a.sharding.spec) for a in mu)
  # Numerically the same parameters as an unsharded build from the same seed.
  ref = model_lib.Denoiser(cfg, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(model.layers[1].up_proj.kernel[...]),
                                np.asarray(ref.layers[1].up_proj.kernel[...]))


def test_abstract_target_carries_current_mesh_shardings():
  mesh = sharding.make_mesh(mesh_cfg(1, 2), devices=jax.devices()[:2])
  cfg = model_lib.ModelConfig(d_input=16, d_model=32, d_mlp=64, n_layers=1)
  _, target = sharding.abstract_state_with_shardings(lambda: model_lib.Denoiser(cfg, rngs=nnx.Rngs(0)), mesh)
  leaves = jax.tree.leaves(target)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert all(x.sharding.mesh.devices.size == 2 for x in leaves)
  assert any("fsdp" in tuple(x.sharding.spec) for x in leaves)
