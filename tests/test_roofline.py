"""glp_jax.training.roofline (a compiled program's kernels, bytes, FLOPs and floor) and bench/roofline.py, which
compiles the trainer's step for a GPU this host does not have."""
import json
import os
import subprocess
import sys

import pytest

from glp_jax.core import flops
from glp_jax.training import roofline
from glp_jax.training import state as train_lib
from train_fakes import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "/x/flax/nnx/nn/linear.py"
2 "/x/optax/_src/update.py"

FunctionNames
1 "Linear.__call__"
2 "apply_updates"

FileLocations
1 {file_name_id=1 function_name_id=1 line=422 end_line=428 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=42 end_line=42 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}


%fused_add (param_0: f32[1000], param_1: f32[1000]) -> f32[1000] {
  %param_0 = f32[1000]{0} parameter(0)
  %param_1 = f32[1000]{0} parameter(1)
  ROOT %add.1 = f32[1000]{0} add(%param_0, %param_1), metadata={op_name="jit(step)/add" stack_frame_id=2}
}

%gemm_computation (p0: bf16[64,128], p1: bf16[128,32]) -> bf16[64,32] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,32]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (loop: (s32[], f32[1000])) -> (s32[], f32[1000]) {
  %loop = (s32[], f32[1000]{0}) parameter(0)
  %i = s32[] get-tuple-element(%loop), index=0
  %v = f32[1000]{0} get-tuple-element(%loop), index=1
  %twice = f32[1000]{0} fusion(%v, %v), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[1000]{0}) tuple(%i, %twice)
}

ENTRY %main.1 (a: f32[1000], b: f32[1000], x: bf16[64,128], w: bf16[128,32]) -> (f32[1000], bf16[64,32]) {
  %a = f32[1000]{0} parameter(0)
  %b = f32[1000]{0} parameter(1)
  %x = bf16[64,128]{1,0} parameter(2)
  %w = bf16[128,32]{1,0} parameter(3)
  %sum = f32[1000]{0} fusion(%a, %b), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/add" stack_frame_id=2}
  %gemm = bf16[64,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(step)/dot_general" stack_frame_id=1}, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %cublas = (bf16[64,32]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %conv = bf16[64,32]{1,0:T(8,128)(2,1)} convolution(%x, %w), dim_labels=bf_io->bf
  %ar = f32[1000]{0} all-reduce-start(%sum), replica_groups={}, to_apply=%fused_add
  %ard = f32[1000]{0} all-reduce-done(%ar)
  %ag = (f32[1000]{0}, f32[8000]{0}) all-gather-start(%a), dimensions={0}, replica_groups={}
  %agd = f32[8000]{0} all-gather-done(%ag)
  %zero = s32[] constant(0)
  %init = (s32[], f32[1000]{0}) tuple(%zero, %sum)
  %loop = (s32[], f32[1000]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = (f32[1000]{0}, bf16[64,32]{1,0}) tuple(%sum, %gemm)
}
"""


def test_kernels_count_operand_and_result_bytes_and_matmul_flops():
  """A fusion reads its operands and writes its result; a GEMM (Triton fusion, cuBLAS call whose workspace result
  is not data, or a TPU program's convolution) has 2 M N K FLOPs; a loop body's kernels count once; views and
  tuples are free; each kernel is named by the source function of its stack frame; a collective's `-done` only
  waits, its `-start` sends its operand."""
  ks = {k["name"]: k for k in roofline.kernels(roofline.parse(HLO))}
  assert set(ks) == {"sum", "gemm", "cublas", "conv", "twice", "ar", "ag"}
  assert ks["ar"]["sent"] == 4000 and ks["ar"]["bytes"] == 8000 and ks["sum"]["sent"] == 0
  assert ks["ag"]["sent"] == 4000 and ks["ag"]["bytes"] == 4000 + 32000   # its result's copy of %a is no data
  assert roofline.group_of(ks["ar"]) == "collective: all-reduce"
  gemm_bytes = 2 * (64 * 128 + 128 * 32 + 64 * 32)
  assert ks["sum"]["bytes"] == 3 * 4000 and ks["sum"]["flops"] == 0
  assert ks["twice"]["bytes"] == 2 * 4000          # the same operand twice is read once
  assert ks["gemm"]["flops"] == ks["cublas"]["flops"] == ks["conv"]["flops"] == 2 * 64 * 32 * 128
  assert ks["gemm"]["bytes"] == ks["cublas"]["bytes"] == ks["conv"]["bytes"] == gemm_bytes
  assert ks["gemm"]["kind"] == "fusion/__triton_gemm" and ks["cublas"]["kind"] == "custom-call/__cublas$gemm"
  assert ks["sum"]["kind"] == "fusion/kLoop"
  assert ks["sum"]["where"] == "apply_updates (_src/update.py:42)"

  r = roofline.roofline(HLO, flops_per_s=1e9, bytes_per_s=1e6)
  assert r["kernels"] == 7 and r["flops"] == 3 * 2 * 64 * 32 * 128 and r["sent_bytes"] == 8000
  floor_gemm = max(2 * 64 * 32 * 128 / 1e9, gemm_bytes / 1e6)
  assert r["matmul_floor_s"] == pytest.approx(3 * floor_gemm)
  assert r["floor_s"] == pytest.approx(3 * floor_gemm + (3 * 4000 + 2 * 4000 + 2 * 4000 + 36000) / 1e6)
  assert r["groups"]["apply_updates"]["kernels"] == 1 and r["top"][0]["bound"] == "memory"


def test_the_compiled_steps_matmul_flops_are_the_analytic_count():
  """On the real optimised HLO of the trainer's step (this CPU, 8 fake devices, FSDP over 2): the GEMMs it
  runs are the analytic training FLOPs minus the two input gradients nobody needs (the data's into in_proj and
  the sinusoid's into the time MLP), per device."""
  config = get_config()
  config.model.d_input, config.batch_size, config.mesh.data, config.mesh.fsdp = 16, 32, -1, 2
  compiled, mesh, mc = train_lib.compile_step(config)
  r = roofline.roofline(compiled.as_text(), 1e12, 1e11)
  unused = 2 * (mc.d_input * mc.d_model + mc.d_model * mc.d_model)
  per_device = (flops.train_flops_per_example(mc) - unused) * config.batch_size / mesh.size
  assert r["flops"] == pytest.approx(per_device, rel=1e-9)
  assert r["kernels"] > 10 and r["groups"]["matmul"]["kernels"] >= 3 * (2 + 4 * mc.n_layers) - 2
  assert set(r["groups"]) > {"matmul"}   # the rest is named by source function


def test_hbm_bandwidth_matches_the_most_specific_device_kind():
  assert roofline.hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
  assert roofline.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
  assert roofline.hbm_bandwidth("NVIDIA H200") == 4.8e12
  assert roofline.hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
  assert roofline.hbm_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
  assert roofline.hbm_bandwidth("cpu") is None


def test_profile_step_puts_each_top_ops_floor_beside_its_time(monkeypatch):
  """bench/profile_step.py on a GPU of known bandwidth: each traced top op gets its roofline floor and group."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  from test_bench import _import_bench
  profile_step = _import_bench("profile_step")
  import jax
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(roofline, "hbm_bandwidth", lambda kind: 1e6)
  profile = {"top": [{"op": "sum", "ms_per_step": 20.0}, {"op": "not-in-hlo", "ms_per_step": 1.0}]}
  floor = profile_step._floors(HLO, 1e9, profile)
  assert profile["top"][0]["floor_ms"] == pytest.approx(12.0) and profile["top"][0]["group"] == "apply_updates"
  assert "floor_ms" not in profile["top"][1]
  assert floor["kernels"] == 7 and floor["floor_ms"] == pytest.approx(1e3 * roofline.roofline(HLO, 1e9, 1e6)["floor_s"])


def _bench(*args, tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_COMPILATION_CACHE"))}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "roofline.py"), "--quick", *args,
                        f"--out_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _plugin_matches_jaxlib() -> bool:
  import glob
  import jaxlib
  return bool(glob.glob(os.path.join(ROOT, ".gpu_aot", f"jax_cuda*_plugin-{jaxlib.__version__}.dist-info")))


@pytest.mark.skipif(not _plugin_matches_jaxlib(), reason="needs `make gpu-aot` for this jaxlib (make test runs it)")
@pytest.mark.parametrize("gpus", [1, 2])
def test_the_step_compiles_for_h100s_without_one(tmp_path, gpus):
  """bench/roofline.py --target: XLA's GPU compiler builds the trainer's real step for one H100, or FSDP over two,
  on this CPU (so a change that breaks the CUDA compile fails here, not on a scarce card), in bf16 compute by
  default, each device with its share of the GEMM FLOPs of the CPU program; FSDP's all-gathers and
  reduce-scatters are there."""
  r = _bench("--target=h100", f"--gpus={gpus}", f"--fsdp={gpus}", tmp_path=tmp_path)
  assert r["device"] == "NVIDIA H100 80GB HBM3" and r["compute_dtype"] == "bfloat16" and r["gpus"] == gpus
  assert r["peak_flops"] == 989e12 and r["bytes_per_s"] == 3.35e12
  d, m = r["d_input"], 2 * r["d_input"]
  unused = 2 * r["batch"] * (d * m + m * m)
  assert r["hlo_tflop"] * 1e12 == pytest.approx((r["analytic_tflop"] * 1e12 - unused) / gpus)
  assert 0 < r["mfu_ceiling"] < 1 and r["floor_ms"] >= r["matmul_floor_ms"] > 0
  if gpus == 1:
    assert r["collectives"] == {} and r["collective_gb_sent"] == 0
  else:
    assert r["collectives"]["all-gather"] > 0 and r["collectives"]["reduce-scatter"] > 0 and r["collective_gb_sent"] > 0
  hlo = (tmp_path / "step.hlo.txt").read_text()
  module = roofline.parse(hlo)
  operand_dtypes = set()
  for body in module.computations.values():
    shapes = {i.name: i.shapes for i in body}
    for ins in body:
      if ins.op == "dot":
        operand_dtypes |= {shapes[o][0][0] for o in ins.operands}
  assert operand_dtypes == {"bf16"}                      # every GEMM reads bf16 (it may accumulate into f32)
  assert "__triton" in hlo or "__cublas" in hlo          # GPU kernels, not the CPU's
