r"""glp-eval: downstream evaluations of a prior; each writes one flat JSON object to `<out>/eval_<name>.json`.

  glp-eval fd       --prior=runs/d6 [--num_samples=50000 --steps=1000]
  glp-eval delta_lm --prior=runs/d6 [--num_docs=256 --max_length=128]
  glp-eval steer    --prior=runs/d6 [--rs=0,0.25,0.5,1,2 --max_new_tokens=20]
  glp-eval probe    --prior=runs/d6 [--tasks=builtin | --tasks=/path/to/sae_probes_csvs]
  glp-eval all      --prior=exports/d6 --store=STORE --out=DIR

`--prior` is a glp_jax run dir, an exported / reference prior folder, or a Hugging Face Hub repo id of one (fetched
into the Hub cache; then `--out` is required). Several, comma-separated (`--prior=runs/a,runs/b`), are evaluated in
one process, each into its own folder: the LM is loaded once and its prior-independent forwards (the probe tasks'
activations) run once, as a sweep's evaluations want. The LM, its layer, the real held-out activations (fd) and the
held-out documents (delta_lm) come from the activation store the run was trained on (`--store` overrides; an
export's recorded store is used when it is reachable, else it and a reference folder need `--store` or
`--lm/--layer`; the layer a prior was trained on, from its provenance or its tracedict_config, a reference folder's
config.yaml included, is preferred to the store's first). `--quick` shrinks every evaluation to a smoke-test size
(used by `make demo`). Keys written (docs/design.md lists them all): fd: fd, fd_floor; delta_lm: delta_lm,
delta_lm_sem, delta_lm_mean, delta_lm_identity; steer: steer_{add,glp}_{concept,nll} and per-r rows; probe:
probe_auc_{raw,mlp,t0.1,t0.5} with _lo/_hi bootstrap CIs. What would silently weaken a number is logged as a
warning on the `glp_jax` logger and recorded: fd sample counts at or below D (`fd_rank_deficient`) or below 2D,
small probe classes (`probe_class_min/<task>`, `probe_small_tasks`, `probe_skipped_tasks`), fewer steering prompts
than asked (`steer_num_prompts`) and empty continuations (`steer_<mode>_r<r>_empty`).
"""
from __future__ import annotations

import dataclasses
import json

from absl import flags

from glp_jax.evals import runner
from glp_jax.util import cli
from glp_jax.util.errors import ConfigError

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
           tuple: flags.DEFINE_list}

FLAGS = cli.flag_values()
for _f in dataclasses.fields(runner.Options):   # the flags are the runner's options: one set of defaults
  _type = {"bool": bool, "int": int, "float": float, "str": str}.get(str(_f.type).split(" ")[0].split("[")[0], tuple)
  _default = list(_f.default) if isinstance(_f.default, tuple) else _f.default
  _DEFINE[_type](_f.name, _default, _f.metadata["help"], flag_values=FLAGS)


def options(fv: flags.FlagValues) -> runner.Options:
  return runner.Options(**{f.name: tuple(fv[f.name].value) if isinstance(fv[f.name].value, list)
                           else fv[f.name].value for f in dataclasses.fields(runner.Options)})


def main(fv: flags.FlagValues, args: list[str]) -> None:
  if len(args) != 1:
    raise ConfigError(f"usage: glp-eval {{{','.join(runner.NAMES)},all}} --prior=RUN_OR_EXPORT [flags]; "
                             f"got {args}")
  for prior, results in runner.evaluate_priors(args[0], options(fv)).items():
    for name, res in results.items():
      print(json.dumps({"eval": name, "prior": prior, **res}), flush=True)


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-eval)."""
  cli.run(main, FLAGS, __doc__, argv, positional=True, prog="glp-eval")


if __name__ == "__main__":
  run()
