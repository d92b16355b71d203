r"""glp-train: train a GLP denoiser on an activation store (sharded, checkpointed, resumable).

  glp-train --config=configs/train.py:runlocal --workdir=runs/local        # tiny prior, ~100 steps, CPU
  glp-train --config=configs/train.py:model=llama1b-d6 --dry_run           # params, FLOPs, memory; no store
  glp-train --config=configs/train.py:model=tiny --config.data.store=runs/extract/store \
            --config.num_activations=2e6 --workdir=runs/tiny

Rerunning the same command on the same workdir resumes from its latest checkpoint. SIGTERM / SIGINT save a
checkpoint and exit with status 128 + signal.
"""
from __future__ import annotations

import json
import sys

from absl import flags

from glp_jax.training import state as state_lib
from glp_jax.training import trainer
from glp_jax.util import cli
from glp_jax.util.errors import ConfigError

FLAGS = cli.flag_values()
cli.define_config(FLAGS, "Train config file (configs/train.py:<args>).", "configs/train.py")
flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints, summary).", flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Build abstractly, AOT-compile the step, print one JSON object, exit.",
                  flag_values=FLAGS)
flags.DEFINE_bool("allow_changes", False, "Resume a workdir although plan fields (budget, schedule, model, data "
                  "plan; never the batch size) or the store changed; the changes are logged in metrics.jsonl.",
                  flag_values=FLAGS)


def main(fv: flags.FlagValues) -> None:
  if fv.config is None:
    raise ConfigError("--config is required (e.g. --config=configs/train.py:runlocal)")
  if fv.dry_run:
    print(json.dumps(state_lib.dry_run(fv.config)), flush=True)
    return
  if not fv.workdir:
    raise ConfigError("--workdir is required")
  summary = trainer.train_and_evaluate(fv.config, fv.workdir, allow_changes=fv.allow_changes)
  print(json.dumps(summary), flush=True)
  if summary.get("stopped_by_signal"):
    sys.exit(128 + int(summary["stopped_by_signal"]))


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-train)."""
  cli.run(main, FLAGS, __doc__, argv, prog="glp-train")


if __name__ == "__main__":
  run()
