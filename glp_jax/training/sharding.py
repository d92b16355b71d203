"""The device mesh and every partitioning rule of glp_jax (one place, as in nanodo's fsdp.py).

Mesh axes: `data` (pure data parallel) and `fsdp` (parameters and optimizer state sharded; the batch is split
over both). The model annotates each kernel with *logical* axis names (metadata only, `core.model.LOGICAL_AXES`);
`LOGICAL_RULES` maps them to mesh axes here. A dimension that the mesh axis does not divide stays replicated,
and a mesh axis is used at most once per array (on the largest eligible dimension), so every model shape gets
a valid layout. Axes are `Auto`: XLA inserts the FSDP all-gathers and reduce-scatters, and the model code needs
no per-call sharding annotations.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from glp_jax.core import flops
from glp_jax.util.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device

# Logical axis (the names of `model.LOGICAL_AXES`) -> mesh axis (None = replicated; unknown names too). The
# denoiser's width dimensions (input = D, embed = M, mlp = F, cond = the embedding MLP hidden) are all FSDP
# candidates; per array the largest one that the fsdp axis divides is sharded, so a [M, F] kernel splits F and
# a [D, M] kernel splits M. LayerNorm parameters stay replicated (small, and read by every row).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("input", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("cond", "fsdp"),
    ("norm", None),
    ("batch", BATCH_AXES),   # activations: the model pins its residual stream's rows here
)
_METADATA_KEYS = ("out_sharding", "sharding_names", "sharding")


REPLICATE_BELOW_BYTES = 1 << 30   # train-state size under which `mesh.fsdp = 0` (auto) replicates


def resolve_mesh(mesh_cfg: Any, model_cfg: Any, n_devices: int) -> dict[str, int]:
  """`mesh.fsdp = 0` (auto) shards parameters and optimizer state once the replicated train state (f32
  parameters + two AdamW moments) would pass 1 GiB per device (MaxText's default at small scale), and replicates
  smaller models (`fsdp = 1`: pure data parallel is fastest there). Sharded, fsdp is the largest divisor of the
  device count that divides the model's widths D, M and F, so every kernel really is split (6 devices on a
  2048-wide model: fsdp 2, data 3, not an fsdp of 6 that divides nothing), and the rest goes to `data`. With
  `mesh.data` set, fsdp takes the devices it leaves. Explicit sizes are kept; the result goes into config.json."""
  data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
  if fsdp != 0:
    return {"data": data, "fsdp": fsdp}
  if data > 0:   # the devices data leaves (mesh_shape names a data size that does not divide them)
    return {"data": data, "fsdp": n_devices // data if n_devices % data == 0 else 1}
  if 12 * flops.param_count(model_cfg) < REPLICATE_BELOW_BYTES:
    return {"data": -1, "fsdp": 1}
  widths = math.gcd(model_cfg.d_input, model_cfg.d_model, model_cfg.d_mlp)
  fsdp = max(k for k in range(1, n_devices + 1) if n_devices % k == 0 and widths % k == 0)
  return {"data": n_devices // fsdp, "fsdp": fsdp}


def mesh_shape(mesh_cfg: Any, n_devices: int) -> tuple[int, ...]:
  """Resolves the config's axis sizes (-1 = the rest of the devices); raises ConfigError when they don't fit."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if n_devices % known:
    raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide the {n_devices} devices: "
                      f"choose axis sizes whose product divides {n_devices} (or set one to -1)")
  sizes = [n_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n_devices:
    raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of the "
                      f"{n_devices} devices: the product must equal the device count (use -1 for one axis)")
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp') mesh over `devices` (default: all), with Auto axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
  """The number of batch shards: the global batch must be a multiple of it."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  n = batch_divisor(mesh)
  if batch_size % n:
    raise ConfigError(f"config.batch_size={batch_size} is not divisible by the {n} batch shards of mesh "
                      f"{dict(mesh.shape)}: use a multiple of {n}")


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Rows split over every device, the feature dimension replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The same value on every device (step counters, scalar metrics)."""
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_context(mesh: jax.sharding.Mesh):
  """Steps traced inside see the mesh and the logical rules, so the model's 'batch' constraints apply."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
    yield


def shardings_of(abstract: Any) -> Any:
  """The NamedSharding of every leaf of a tree of ShapeDtypeStructs (e.g. `abstract_state_with_shardings`)."""
  return jax.tree.map(lambda a: a.sharding, abstract)


def logical_axes_of(variable: nnx.Variable) -> tuple | None:
  """The logical axis names a model attached to a variable (None when unannotated)."""
  meta = variable.get_metadata()
  for key in _METADATA_KEYS:
    names = meta.get(key)
    if names:
      return tuple(names)
  return None


def spec_for(shape: Sequence[int], logical: Sequence[str | None] | None, mesh: jax.sharding.Mesh,
             rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
  """PartitionSpec of one array: logical names -> mesh axes, each mesh axis on its largest divisible dim."""
  if not shape or logical is None:
    return P()
  table = dict(rules)
  wanted = [table.get(name) if name is not None else None for name in logical]
  spec: list[Any] = [None] * len(shape)
  for axis in {a for a in wanted if isinstance(a, str)}:
    size = dict(mesh.shape).get(axis, 1)
    dims = [d for d, a in enumerate(wanted) if a == axis and shape[d] % size == 0]
    if size > 1 and dims:
      spec[max(dims, key=lambda d: (shape[d], -d))] = axis
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """A tree of NamedShardings matching an (abstract) nnx state: variables by their logical axes.

  Optimizer moments are Variables that copy their parameter's metadata, so they shard like the parameter.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value() if hasattr(x, "get_value") else x[...]
      return x.replace(NamedSharding(mesh, spec_for(np.shape(value), logical_axes_of(x), mesh)))
    return NamedSharding(mesh, spec_for(np.shape(x), None, mesh))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(create_fn: Callable[[], Any], mesh: jax.sharding.Mesh) -> Any:
  """Runs `create_fn` (returning an nnx graph: module, tuple of modules, ...) with its state born sharded.

  nanodo style: trace abstractly, derive shardings from the logical axes, then `jax.jit(init,
  out_shardings=...)` so no device ever holds a full copy. Eager sharding is off while tracing: the logical
  names are not mesh axes, and the layout comes from `out_shardings` alone.
  """
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(create_fn)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)
    # No `jax.set_mesh` here: the model would then switch eager sharding on for its logical names.
    state = jax.jit(lambda: nnx.split(create_fn())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_state_with_shardings(create_fn: Callable[[], Any], mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(graphdef, state of ShapeDtypeStructs carrying NamedShardings): the target of a sharded restore."""
  with nnx.use_eager_sharding(False):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create_fn))
  shardings = state_shardings(abstract_state, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
  return graphdef, target


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) as a global array with `sharding`.

  Each process contributes only the shards of its own devices.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
