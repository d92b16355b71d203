r"""The trainer's step as XLA compiles it for a GPU, kernel by kernel, on a host without one: where its floor is.

  python bench/roofline.py --quick                   # < 30 s: the attached device (this CPU), d3, d_input 64
  make gpu-aot                                       # once: JAX's CUDA plugin into .gpu_aot/ (~130 MB, no CUDA needed)
  python bench/roofline.py --target=h200             # the d6 step at Llama-1B width, batch 4096, compiled for an H200
  python bench/roofline.py --target=h200 --mu_dtype=bfloat16        # what a bf16 AdamW first moment saves
  python bench/roofline.py --target=h200 --hlo=OUT/profile_d6/step.hlo.txt   # the HLO a card compiled (profile_step)
  python bench/roofline.py --target=h100 --gpus=8 --fsdp=8             # per device, FSDP over 8 cards of one host

With --target, XLA's GPU compiler builds the real step (training/state.py's, from an abstract state) for that card
from a description of it (no device, no autotuning: the GEMMs get the compiler's default Triton tiling, and the
card's autotuner may pick cuBLAS instead, but what it fuses is decided before that). glp_jax.training.roofline
then reads the optimised HLO: each kernel's bytes and FLOPs, its least time at the card's dense bf16 peak and
HBM bandwidth (vendor figures, or --tflops / --tbps, e.g. the rates a card reaches), grouped by the source
function that made it. The floor says how far a step can go before the program itself must change; a measured
step above it by more than launch gaps is the kernels' own inefficiency. `mfu_ceiling` is the trainer's MFU at
that floor: analytic training FLOPs / (floor x the peak its MFU is against). With --gpus the figures are per device
(the HLO is one device's program; the batch is global): `hlo_tflop` is one device's GEMM TFLOP per step,
`analytic_tflop` the whole step's analytic count and `analytic_tflop_per_device` its share per device (the one
to put beside `hlo_tflop`), and `collective_gb_sent` is what each device puts into all-reduces, all-gathers and
reduce-scatters per step (their interconnect time is not in the floor). The last line printed is one JSON
object.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Enough of a card for XLA's GPU compiler (a stream_executor.GpuTargetConfigProto): the vendor's figures.
GPU_TARGETS = {
    "h100": {"name": "NVIDIA H100 80GB HBM3", "cc": (9, 0), "sms": 132, "ghz": 1.98, "tbps": 3.35,
             "l2_mb": 50, "gib": 80},
    "h200": {"name": "NVIDIA H200", "cc": (9, 0), "sms": 132, "ghz": 1.98, "tbps": 4.8, "l2_mb": 50, "gib": 141},
    "a100": {"name": "NVIDIA A100-SXM4-80GB", "cc": (8, 0), "sms": 108, "ghz": 1.41, "tbps": 2.039,
             "l2_mb": 40, "gib": 80},
}


FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small and fast (< 30 s): d3, d_input 64, batch 32.")
flags.DEFINE_string("target", "", "Compile for this GPU without one: " + ", ".join(GPU_TARGETS) +
                    " (needs `make gpu-aot`); empty: the attached device.")
flags.DEFINE_string("plugin_dir", os.path.join(ROOT, ".gpu_aot"), "Where `make gpu-aot` put JAX's CUDA plugin.")
flags.DEFINE_integer("gpus", 1, "Devices the step is compiled for (a one-host topology of --target, or the attached).")
flags.DEFINE_integer("fsdp", 1, "Mesh fsdp axis size (parameters and optimizer state sharded; the rest is data).")
flags.DEFINE_integer("depth", 6, "Denoiser depth (3 with --quick).")
flags.DEFINE_integer("d_input", 0, "Activation width (0: 2048 = Llama-1B, or 64 with --quick).")
flags.DEFINE_integer("batch", 0, "Rows per step (0: 4096, or 32 with --quick).")
flags.DEFINE_string("jax_dtype", "auto", "Compute dtype: auto = bfloat16 for a GPU target, else the device's auto.")
flags.DEFINE_string("mu_dtype", "float32", "AdamW first-moment dtype.")
flags.DEFINE_float("tflops", 0.0, "GEMM rate of the floor in TFLOP/s (0: the peak: the vendor's dense bf16 figure, "
                   "or on CPU a measured GEMM rate). MFU is always against the peak.")
flags.DEFINE_float("tbps", 0.0, "Memory bandwidth in TB/s (0: the vendor's HBM figure; CPU: measured).")
flags.DEFINE_string("hlo", "", "Analyse this optimised-HLO file (e.g. profile_step's step.hlo.txt) instead.")
flags.DEFINE_string("out_dir", "", "Write the compiled step's HLO here (step.hlo.txt).")
flags.DEFINE_integer("top", 12, "Kernels and groups listed.")

def target_config(t: dict) -> str:
  smem_per_sm = 233472 if t["cc"][0] >= 9 else 167936
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {smem_per_sm - 1024}
  shared_memory_per_core: {smem_per_sm}
  threads_per_core_limit: 2048
  core_count: {t["sms"]}
  fpus_per_core: {128 if t["cc"][0] >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(t["tbps"] * 1e12)}
  l2_cache_size: {t["l2_mb"] << 20}
  clock_rate_ghz: {t["ghz"]}
  device_memory_size: {t["gib"] << 30}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {t["cc"][0]} minor: {t["cc"][1]} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{t["name"]}"
"""


def target_devices(name: str, n: int = 1):
  """The devices of a one-host topology of `n` cards `name`, from JAX's CUDA plugin (no GPU or CUDA install
  needed)."""
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(name, "cuda", target_config=target_config(GPU_TARGETS[name]),
                                        topology=f"1x1x{n}")
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"cannot compile for {name}: {type(e).__name__}: {e}\n"
                     "(JAX's CUDA plugin at the jaxlib version is needed: `make gpu-aot`)") from e
  return topo.devices


def plugin_version(folder: str) -> str | None:
  """The version of JAX's CUDA plugin installed (pip --target) into `folder`, from its dist-info name."""
  import glob
  names = glob.glob(os.path.join(folder, "jax_cuda*_plugin-*.dist-info"))
  return os.path.basename(names[0]).removesuffix(".dist-info").split("-")[1] if names else None


def measured_bandwidth() -> float:
  """A large on-device copy's bytes moved (read + write) per second, best of 5: the CPU's stand-in for HBM."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((64 << 20) // 4, jnp.float32)
  f = jax.jit(lambda a: a * 2.0)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * x.nbytes / best


def main(argv):
  del argv
  if FLAGS.target:
    if FLAGS.target not in GPU_TARGETS:
      raise SystemExit(f"--target: one of {sorted(GPU_TARGETS)}, got {FLAGS.target!r}")
    if os.path.isdir(FLAGS.plugin_dir):
      import jaxlib
      found = plugin_version(FLAGS.plugin_dir)
      if found != jaxlib.__version__:   # a plugin must match its jaxlib exactly, or it fails to load
        raise SystemExit(f"{FLAGS.plugin_dir} holds JAX's CUDA plugin {found}, this jaxlib is {jaxlib.__version__}: "
                         "run `make gpu-aot` (or pip install --target) for this jaxlib")
      sys.path.insert(0, FLAGS.plugin_dir)
    # The plugin only compiles here: the runtime stays on the CPU, and it skips its check of CUDA libraries.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  import jax
  from benchlib import jax_step
  from glp_jax.core import flops
  from glp_jax.core import model as model_lib
  from glp_jax.training import metrics
  from glp_jax.training import roofline
  from glp_jax.training import state as train_lib

  depth = 3 if FLAGS.quick and FLAGS["depth"].using_default_value else FLAGS.depth
  d_input = FLAGS.d_input or (64 if FLAGS.quick else 2048)
  batch = FLAGS.batch or (32 if FLAGS.quick else 4096)
  dtype = ("bfloat16" if FLAGS.target and FLAGS.jax_dtype == "auto"
           else model_lib.resolve_compute_dtype(FLAGS.jax_dtype))
  config = jax_step.config_for(depth, d_input, batch, dtype)
  config.opt.mu_dtype = FLAGS.mu_dtype
  config.mesh.data, config.mesh.fsdp = -1, FLAGS.fsdp
  mc = model_lib.model_config(config.model, None)

  devices = target_devices(FLAGS.target, FLAGS.gpus) if FLAGS.target else jax.devices()[:FLAGS.gpus]
  if len(devices) < FLAGS.gpus:
    raise SystemExit(f"--gpus={FLAGS.gpus}: {len(devices)} device(s) attached (use --target to compile for more)")
  kind = devices[0].device_kind
  compile_s = None
  if FLAGS.hlo:
    with open(FLAGS.hlo) as f:
      hlo = f.read()
  else:
    t = time.perf_counter()
    compiled, _, _ = train_lib.compile_step(config, devices)
    compile_s = time.perf_counter() - t
    hlo = compiled.as_text()
  if FLAGS.out_dir:
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "step.hlo.txt"), "w") as f:
      f.write(hlo)

  peak, peak_source = metrics.peak_flops(devices[:1]), f"vendor dense bf16 ({kind})"
  if not peak:   # the attached CPU: what its GEMM reaches
    peak, peak_source = jax_step.device_peak()
  rate = FLAGS.tflops * 1e12 or peak
  bandwidth = FLAGS.tbps * 1e12 or roofline.hbm_bandwidth(kind) or measured_bandwidth()
  r = roofline.roofline(hlo, rate, bandwidth, top=FLAGS.top)
  analytic = flops.train_flops_per_example(mc) * batch
  n = len(devices)
  collectives = {name.removeprefix("collective: "): g["kernels"] for name, g in r["groups"].items()
                 if name.startswith("collective: ")}
  print(f"{n} x {kind}: {r['kernels']} kernels per device, floor {1e3 * r['floor_s']:.2f} ms/step "
        f"(matmuls {1e3 * r['matmul_floor_s']:.2f} ms) at {rate / 1e12:.3g} TFLOP/s and {bandwidth / 1e12:.3g} TB/s")
  print(roofline.format_table(r, FLAGS.top), flush=True)
  groups = {name: {"ms": round(1e3 * g["floor_s"], 4), "gb": round(g["bytes"] / 1e9, 4), "kernels": g["kernels"]}
            for name, g in list(r["groups"].items())[:FLAGS.top]}
  top = [{"name": k["name"], "kind": k["kind"], "ms": round(1e3 * k["floor_s"], 4), "gb": round(k["bytes"] / 1e9, 4),
          "tflop": round(k["flops"] / 1e12, 4), "bound": k["bound"], "where": k["where"]} for k in r["top"]]
  result = {"bench": "roofline", "quick": FLAGS.quick, "target": FLAGS.target or None, "device": kind,
            "hlo_file": FLAGS.hlo or None, "gpus": n, "mesh": {"data": n // FLAGS.fsdp, "fsdp": FLAGS.fsdp},
            "depth": depth, "d_input": d_input, "batch": batch, "compute_dtype": dtype, "mu_dtype": FLAGS.mu_dtype,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "params": flops.param_count(mc), "compile_s": compile_s,
            "peak_flops": peak, "peak_source": peak_source, "flops_per_s": rate, "bytes_per_s": bandwidth,
            "kernels": r["kernels"], "floor_ms": 1e3 * r["floor_s"],
            "matmul_floor_ms": 1e3 * r["matmul_floor_s"], "other_floor_ms": 1e3 * (r["floor_s"] - r["matmul_floor_s"]),
            "gb_moved": r["bytes"] / 1e9, "collective_gb_sent": r["sent_bytes"] / 1e9, "collectives": collectives,
            # hlo_tflop is per device, like every HLO figure (one device's program); analytic_tflop is the global
            # step's (tests/test_roofline.py pins both names), so it is also given per device to compare like
            # with like
            "hlo_tflop": r["flops"] / 1e12, "analytic_tflop": analytic / 1e12,
            "analytic_tflop_per_device": analytic / n / 1e12,
            "mfu_ceiling": analytic / (r["floor_s"] * peak * n), "groups": groups, "top": top}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
