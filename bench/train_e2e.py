r"""glp-train end to end (loader, metrics, evals, checkpoints included) on a synthetic store, as a user runs it.

  python bench/train_e2e.py --quick                      # < 30 s on CPU: a tiny model on a small store
  python bench/train_e2e.py --model=llama1b-d6 --steps=300 --batch=4096    # the accelerator check (D = 2048)

Writes a store of Gaussian rows (bf16, like the extractor's default) of the preset's width, runs `glp-train` in a
subprocess with that store for `--steps` steps, and reports what the run measured itself (summary.json and
metrics.jsonl): median examples/s, TFLOP/s and MFU over the logged steps past the compile (`*_after_compile`;
summary.json's medians, which include the first line, beside them), the compute dtype, wall time. The last line
printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small and fast (< 30 s on CPU).")
flags.DEFINE_string("model", "", "Model preset (default: tiny with --quick, llama1b-d6 otherwise).")
flags.DEFINE_integer("d_input", 0, "Store width for presets without a fixed one (default 64).")
flags.DEFINE_integer("steps", 0, "Training steps (default 20 with --quick, 300).")
flags.DEFINE_integer("batch", 0, "Global batch (default 256 with --quick, 4096).")
flags.DEFINE_integer("rows", 0, "Store rows (default: enough for one pass of the run, at most 327,680).")
flags.DEFINE_string("workdir", "", "Where store and run go (default: a temporary folder, removed after).")


def write_store(path: str, rows: int, d: int) -> None:
  import ml_dtypes
  import numpy as np
  from glp_jax.data.writer import StoreWriter
  rng = np.random.default_rng(0)
  with StoreWriter.create(path, layers=[0], d=d, dtype="bfloat16", metadata={"model": "synthetic"}) as st:
    per_doc = 2048
    for doc in range(-(-rows // per_doc)):
      n = min(per_doc, rows - doc * per_doc)
      st.append({0: rng.standard_normal((n, d), dtype=np.float32).astype(ml_dtypes.bfloat16)}, doc,
                np.arange(n))


def main(argv):
  del argv
  from glp_jax.core import model as model_lib
  model = FLAGS.model or ("tiny" if FLAGS.quick else "llama1b-d6")
  preset_d = model_lib.PRESETS.get(model, {}).get("d_input")
  d = preset_d or FLAGS.d_input or 64
  steps = FLAGS.steps or (20 if FLAGS.quick else 300)
  batch = FLAGS.batch or (256 if FLAGS.quick else 4096)
  rows = FLAGS.rows or min(batch * steps + 8192, 327_680)
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="glp_bench_e2e_")
  store, workdir = os.path.join(root, "store"), os.path.join(root, "run")
  t0 = time.time()
  if not os.path.exists(os.path.join(store, "manifest.json")):
    write_store(store, rows, d)
  store_s = time.time() - t0
  log_every = max(steps // 20, 1)
  args = [f"--config=configs/train.py:model={model}", f"--workdir={workdir}", f"--config.data.store={store}",
          f"--config.batch_size={batch}", f"--config.num_activations={batch * steps}",
          f"--config.log_every={log_every}", f"--config.eval_every={steps}", f"--config.ckpt.every_steps={steps}",
          "--config.eval_rows=4096", "--config.data.heldout_rows=8192", "--config.log.loss_curve=false"]
  if not preset_d:
    args.append(f"--config.model.d_input={d}")
  t0 = time.time()
  out = subprocess.run([sys.executable, "-m", "glp_jax.training.cli", *args], capture_output=True, text=True)
  wall = time.time() - t0
  if out.returncode:
    sys.exit(f"glp-train failed:\n{out.stderr[-3000:]}")
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in l]
  import numpy as np
  steady_lines = lines[2:] or lines   # past the compile, like the examples/s beside them

  def steady(key):
    vals = [l[key] for l in steady_lines if l.get(key) is not None]
    return float(np.median(vals)) if vals else None
  result = {"bench": "train_e2e", "quick": FLAGS.quick, "model": model, "d_input": d, "batch": batch,
            "steps": steps, "store_rows": rows, "store_write_s": store_s, "glp_train_wall_s": wall,
            "compute_dtype": summary["compute_dtype"], "params": summary["params"],
            "median_examples_per_s": summary["median_examples_per_s"],
            "median_examples_per_s_after_compile": steady("examples_per_s"),
            "median_tflops_per_s_after_compile": steady("tflops_per_s"),
            "median_mfu_after_compile": steady("mfu"),
            "median_tflops_per_s": summary["median_tflops_per_s"], "median_mfu": summary["median_mfu"],
            "final_eval_loss": summary["eval_loss"]}
  print(f"{model}: {result['median_examples_per_s_after_compile']:.4g} examples/s, MFU "
        f"{result['median_mfu_after_compile']} (medians past the compile)")
  print(json.dumps(result))
  if not FLAGS.workdir:
    import shutil
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
