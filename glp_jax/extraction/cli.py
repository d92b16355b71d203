r"""glp-extract: residual-stream activations of a causal LM over a corpus, into an activation store.

  glp-extract --config=configs/extract.py --workdir=runs/extract            # embedded default, ~311k rows
  glp-extract --config=configs/extract.py:runlocal --workdir=runs/quick      # ~40k rows, resumable
  glp-extract --config=configs/extract.py:stream=4000000 --workdir=runs/live  # feed running trainers

Rerunning the same command resumes where a killed run stopped (or returns at once when complete).
Writes <workdir>/config.json, <workdir>/store/ (or config.store.path) and <workdir>/summary.json.
"""
from __future__ import annotations

import json

from absl import flags, logging

from glp_jax.extraction import extractor
from glp_jax.util import cli
from glp_jax.util import config as config_lib

FLAGS = cli.flag_values()
cli.define_config(FLAGS, "Extraction config file (configs/extract.py:<args>).", "configs/extract.py")
flags.DEFINE_string("workdir", None, "Run directory (config.json, summary.json, store/).", flag_values=FLAGS)


def main(fv: flags.FlagValues) -> None:
  config, workdir = fv.config, fv.workdir
  if config is None or not workdir:
    raise config_lib.ConfigError("--config and --workdir are required (see --help)")
  summary = extractor.run(config, workdir)
  logging.info("done: %s", json.dumps(summary))
  print(json.dumps(summary))


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-extract)."""
  cli.run(main, FLAGS, __doc__, argv, prog="glp-extract")


if __name__ == "__main__":
  run()
