"""Every glp-* tool describes itself: --help lists its own flags and, for config-driven tools, the config's
fields with their comments; startup stays quiet unless --verbose."""
import subprocess

import pytest

from tools import tool

CONFIG_TOOLS = {"glp-train": ("configs/train.py", ("opt.lr", "peak learning rate", "--workdir", "dry_run", "allow_changes")),
                "glp-extract": ("configs/extract.py", ("store.dtype", "context_length", "--workdir")),
                "glp-sweep": ("configs/sweep.py", ("budgets", "--root", "--emit"))}
PLAIN_TOOLS = {"glp-fit": ("--runs", "--points", "--n_bootstrap"), "glp-export": ("--workdir", "--push_to_hub"),
               "glp-import": ("--src", "--checkpoint"), "glp-eval": ("--prior", "--num_samples", "--tasks")}


@pytest.mark.parametrize("given", [True, False], ids=["with_config", "default_config"])
@pytest.mark.parametrize("name", sorted(CONFIG_TOOLS))
def test_config_tools_list_their_fields(name, given, tmp_path):
  config, words = CONFIG_TOOLS[name]
  # Without --config, from a folder without configs/: the tool's own (packaged) config's fields.
  args, cwd = ([f"--config={config}"], None) if given else ([], str(tmp_path))
  out = subprocess.run([tool(name), *args, "--help"], capture_output=True, text=True, timeout=120, cwd=cwd)
  assert out.returncode == 0, out.stderr
  for w in words + ("print_config", "debug", "verbose"):
    assert w in out.stdout, (name, w)
  assert "--jax_" not in out.stdout and "--xla_" not in out.stdout   # not buried among library flags


@pytest.mark.parametrize("name", sorted(PLAIN_TOOLS))
def test_other_tools_list_their_flags(name):
  out = subprocess.run([tool(name), "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[0].startswith(name.replace("glp-", "glp-")[:8]) or name in out.stdout
  for w in PLAIN_TOOLS[name]:
    assert w in out.stdout, (name, w)


def test_print_config_resolves_args_and_overrides():
  out = subprocess.run([tool("glp-train"), "--config=configs/train.py:runlocal", "--config.opt.lr=0.01",
                        "--print_config"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert '"lr": 0.01' in out.stdout and '"batch_size": 256' in out.stdout
