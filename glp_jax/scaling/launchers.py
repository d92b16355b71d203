"""Launchers of a sweep's runs on a cluster: a SLURM array script and a TPU-VM script. Each holds environment
set-up and the same glp-train entry point as a local run, nothing else; which runs they hold is the sweep's
business (`sweep.expand`)."""
from __future__ import annotations

import os
import shlex

import ml_collections

from glp_jax.scaling.sweep import Run
from glp_jax.util import files


def slurm_script(config: ml_collections.ConfigDict, runs: list[Run], root: str) -> str:
  """A SLURM array script: task i runs run i with one process per GPU (srun), joined by jax.distributed; at
  most `slurm.array_limit` tasks at once (0: no limit; `parallel` is for local runs only)."""
  s = config.slurm
  n_tasks = s.nodes * s.gpus_per_node
  limit = f"%{s.array_limit}" if s.array_limit else ""
  # SLURM writes job output to a file system: a sweep on a bucket gets it in the submit folder.
  output = "slurm-%A_%a.out" if files.is_remote(root) else os.path.join(root, "slurm-%A_%a.out")
  head = ["#!/bin/bash", "#SBATCH --job-name=glp-sweep", f"#SBATCH --array=0-{len(runs) - 1}{limit}",
          f"#SBATCH --nodes={s.nodes}", f"#SBATCH --ntasks-per-node={s.gpus_per_node}",
          f"#SBATCH --gpus-per-node={s.gpus_per_node}", f"#SBATCH --cpus-per-task={s.cpus_per_task}",
          f"#SBATCH --time={s.time}", "#SBATCH --signal=TERM@300", f"#SBATCH --output={output}"]
  head += [f"#SBATCH --partition={s.partition}"] * bool(s.partition)
  head += [f"#SBATCH --account={s.account}"] * bool(s.account)
  body = [f"# {len(runs)} runs of glp-sweep; {n_tasks} processes (one per GPU) per run. Written by glp-sweep.",
          "set -euo pipefail", s.setup, "case \"$SLURM_ARRAY_TASK_ID\" in"]
  for i, r in enumerate(runs):
    body.append(f"  {i}) ARGS=({' '.join(shlex.quote(a) for a in r.args)}) ;;  # {r.name}")
  body += ["  *) echo \"no run for array task $SLURM_ARRAY_TASK_ID\" >&2; exit 1 ;;", "esac",
           "# jax.distributed: the first node coordinates; process count and ids come from SLURM (srun). The host",
           "# is assigned apart from the export so that a failing scontrol stops the task (set -e); the port comes",
           "# from the task's own job id, so array tasks of two sweeps sharing a node do not collide.",
           "COORDINATOR_HOST=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\"",
           "export JAX_COORDINATOR_ADDRESS=\"$COORDINATOR_HOST:$((20000 + SLURM_JOB_ID % 10000))\"",
           "export GLP_DISTRIBUTED=1",
           "# SLURM >= 22.05: srun no longer inherits --cpus-per-task from sbatch; pass it on.",
           "if [[ -n \"${SLURM_CPUS_PER_TASK:-}\" ]]; then export SRUN_CPUS_PER_TASK=\"$SLURM_CPUS_PER_TASK\"; fi",
           "srun --kill-on-bad-exit=1 glp-train \"${ARGS[@]}\""]
  return "\n".join(head + [""] + [b for b in body if b]) + "\n"


def tpu_script(config: ml_collections.ConfigDict, runs: list[Run]) -> str:
  """One `gcloud compute tpus tpu-vm ssh --worker=all` line per run (the runs go one after another). A failed run
  (e.g. a diverged lr of a search) is reported and the next one starts, as locally and in SLURM arrays; the
  script's exit status says whether any failed."""
  t = config.tpu
  project = f" --project={shlex.quote(t.project)}" if t.project else ""
  lines = ["#!/bin/bash", f"# {len(runs)} runs of glp-sweep on TPU VM {t.name}; every worker runs the same "
           "glp-train and jax.distributed reads the slice from the TPU metadata. Written by glp-sweep.",
           "set -uo pipefail", "failed=0"]
  for r in runs:
    remote = " && ".join(x for x in (t.setup, "GLP_DISTRIBUTED=1 glp-train " +
                                      " ".join(shlex.quote(a) for a in r.args)) if x)
    lines.append(f"gcloud compute tpus tpu-vm ssh {shlex.quote(t.name)} --zone={shlex.quote(t.zone)}{project} "
                 f"--worker=all --command={shlex.quote(remote)} || "
                 f"{{ echo \"glp-sweep: run {r.name} failed (rc=$?)\" >&2; failed=1; }}")
  lines.append("exit $failed")
  return "\n".join(lines) + "\n"
