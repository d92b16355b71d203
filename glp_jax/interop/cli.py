r"""glp-export and glp-import: trained runs <-> PyTorch prior folders.

  glp-export --workdir=runs/d6 --out=exports/d6 [--step=N] [--dtype=float32|bfloat16]
  glp-import --src=/path/glp-llama1b-d3 --workdir=runs/ref_d3 [--checkpoint=checkpoints/epoch_0032]
             [--config=configs/train.py:...]

An export loads with `glp_jax.torch.GLP.from_pretrained(out)` where only torch is installed, and with the
reference's `load_glp`. An import writes a run that glp-eval, glp-export and glp-train (continuing from
step 0) accept.
"""
from __future__ import annotations

import json

from absl import flags

from glp_jax.interop import export, import_ref
from glp_jax.torch import io as torch_io
from glp_jax.util import cli
from glp_jax.util.errors import ConfigError

EXPORT_FLAGS = cli.flag_values()
flags.DEFINE_string("workdir", None, "Run directory written by glp-train (or glp-import).", flag_values=EXPORT_FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step to export; default the latest.", flag_values=EXPORT_FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=EXPORT_FLAGS)
flags.DEFINE_enum("dtype", "float32", sorted(torch_io.DTYPES), "Weight dtype of the safetensors files.",
                  flag_values=EXPORT_FLAGS)

IMPORT_FLAGS = cli.flag_values()
cli.define_config(IMPORT_FLAGS, "Train config for the run (default configs/train.py).")
flags.DEFINE_string("src", None, "Reference checkpoint folder (config.yaml + rep_statistics.pt + "
                    "final.safetensors) or a glp-export folder.", flag_values=IMPORT_FLAGS)
flags.DEFINE_string("workdir", None, "New run directory to create.", flag_values=IMPORT_FLAGS)
flags.DEFINE_string("checkpoint", None, "Weights file stem inside --src (default final / model).",
                    flag_values=IMPORT_FLAGS)


def export_main(fv: flags.FlagValues) -> None:
  if not fv.workdir or not fv.out:
    raise ConfigError("--workdir and --out are required (see --help)")
  result = export.export(fv.workdir, fv.out, fv.step, fv.dtype)
  print(json.dumps({k: result[k] for k in ("out", "dtype", "architecture", "provenance")}), flush=True)


def import_main(fv: flags.FlagValues) -> None:
  if not fv.src or not fv.workdir:
    raise ConfigError("--src and --workdir are required (see --help)")
  print(json.dumps(import_ref.import_prior(fv.src, fv.workdir, fv.checkpoint, fv.config)), flush=True)


def run_export(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-export)."""
  cli.run(export_main, EXPORT_FLAGS, __doc__, argv)


def run_import(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-import)."""
  cli.run(import_main, IMPORT_FLAGS, __doc__, argv)
