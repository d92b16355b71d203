r"""glp-export and glp-import: trained runs <-> PyTorch prior folders (local or on the Hugging Face Hub).

  glp-export --workdir=runs/d6 --out=exports/d6 [--step=N] [--dtype=float32|bfloat16]
             [--push_to_hub=org/glp-d6 [--private]] [--license=apache-2.0]
  glp-import --src=/path/glp-llama1b-d3 --workdir=runs/ref_d3 [--checkpoint=checkpoints/epoch_0032]
             [--config=configs/train.py:...]
  glp-import --src=org/glp-llama1b-d3 [--revision=main] --workdir=runs/ref_d3     # a Hub repo id

An export (with its model card README.md) loads with `glp_jax.torch.GLP.from_pretrained(out or repo id)`
where only torch is installed, and with the reference's `load_glp`. An import writes a run that glp-eval,
glp-export and glp-train (continuing from step 0) accept.
"""
from __future__ import annotations

import json
import os
import shlex

from absl import flags

from glp_jax.interop import export, import_ref
from glp_jax.torch import hub
from glp_jax.torch import io as torch_io
from glp_jax.util import cli
from glp_jax.util.errors import ConfigError

EXPORT_FLAGS = cli.flag_values()
flags.DEFINE_string("workdir", None, "Run directory written by glp-train (or glp-import).", flag_values=EXPORT_FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step to export; default the latest.", flag_values=EXPORT_FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=EXPORT_FLAGS)
flags.DEFINE_enum("dtype", "float32", sorted(torch_io.DTYPES), "Weight dtype of the safetensors files.",
                  flag_values=EXPORT_FLAGS)
flags.DEFINE_string("push_to_hub", None, "Also upload --out to this Hugging Face Hub model repo (org/name; "
                    "created when missing; token from `hf auth login` or $HF_TOKEN).", flag_values=EXPORT_FLAGS)
flags.DEFINE_bool("private", False, "With --push_to_hub: create the repo private.", flag_values=EXPORT_FLAGS)
flags.DEFINE_string("license", None, "Hub license id recorded in the model card (e.g. apache-2.0).",
                    flag_values=EXPORT_FLAGS)
# The flags that shape an export, in the order the model card's command line lists them.
_EXPORT_ARGS = ("workdir", "out", "step", "dtype", "push_to_hub", "private", "license")

IMPORT_FLAGS = cli.flag_values()
cli.define_config(IMPORT_FLAGS, "Train config for the run (default configs/train.py).", "configs/train.py")
flags.DEFINE_string("src", None, "Reference checkpoint folder (config.yaml + rep_statistics.pt + "
                    "final.safetensors) or a glp-export folder.", flag_values=IMPORT_FLAGS)
flags.DEFINE_string("workdir", None, "New run directory to create.", flag_values=IMPORT_FLAGS)
flags.DEFINE_string("checkpoint", None, "Weights file stem inside --src (default final / model).",
                    flag_values=IMPORT_FLAGS)
flags.DEFINE_string("revision", None, "Branch, tag or commit when --src is a Hub repo id.", flag_values=IMPORT_FLAGS)


def command_line(fv: flags.FlagValues) -> str:
  """The glp-export command as given (the flags set on the command line), for the model card."""
  return shlex.join(["glp-export"] + [fv[name].serialize() for name in _EXPORT_ARGS if fv[name].present])


def export_main(fv: flags.FlagValues) -> None:
  if not fv.workdir or not fv.out:
    raise ConfigError("--workdir and --out are required (see --help)")
  if fv.push_to_hub:   # a bad repo id fails before the export, not after
    try:
      hub.check_repo_id(fv.push_to_hub)
    except ValueError as e:
      raise ConfigError(f"--push_to_hub: {e}") from None
  result = export.export(fv.workdir, fv.out, fv.step, fv.dtype, command=command_line(fv), license=fv.license)
  summary = {k: result[k] for k in ("out", "dtype", "architecture", "provenance")}
  if fv.push_to_hub:
    info = hub.push_folder(fv.out, fv.push_to_hub, private=fv.private or None)
    summary["hub"] = {"repo_id": fv.push_to_hub, **hub.describe_commit(info)}
  print(json.dumps(summary), flush=True)


def import_main(fv: flags.FlagValues) -> None:
  if not fv.src or not fv.workdir:
    raise ConfigError("--src and --workdir are required (see --help)")
  src = hub.resolve(fv.src, fv.revision, fv.checkpoint)   # a Hub repo id -> its folder in the Hub cache
  # The cache folder is a snapshot named by the commit it holds (the requested revision may be a moving branch).
  origin = ({"repo_id": fv.src, "revision": fv.revision, "commit": os.path.basename(os.path.normpath(src))}
            if hub.is_repo_id(fv.src) else None)
  print(json.dumps(import_ref.import_prior(src, fv.workdir, fv.checkpoint, fv.config, hub=origin)), flush=True)


def run_export(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-export)."""
  cli.run(export_main, EXPORT_FLAGS, __doc__, argv, prog="glp-export")


def run_import(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-import)."""
  cli.run(import_main, IMPORT_FLAGS, __doc__, argv, prog="glp-import")
