"""Every glp-* tool describes itself: --help lists its own flags and, for config-driven tools, the config's
fields with their comments; startup stays quiet unless --verbose."""
import subprocess

import pytest

from tools import tool

CONFIG_TOOLS = {"glp-train": ("configs/train.py",
                              ("opt.lr", "peak learning rate", "--workdir", "dry_run", "allow_changes")),
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


def test_help_lists_the_fields_the_config_builds_with_their_whole_comments(tmp_path):
  """Fields were read off the file's lines: a variant's fields appeared beside the defaults (glp-sweep listed
  the runlocal sizes and a study-only field that --config.<field> then refused), lines without an inline comment
  were missing (lr_search), and a comment continued on the next line was cut."""
  from glp_jax.util import cli
  cfg = tmp_path / "c.py"
  cfg.write_text('''import ml_collections
ARGS = {}
def get_config(arg=None):
  c = ml_collections.ConfigDict()
  # what the grid trains
  c.sizes = ("a", "b")
  c.lr = 1e-3                # the peak rate, which a long
                             # comment continues here
  c.sub = ml_collections.ConfigDict()
  c.sub.x = 1                # x
  if arg == "small":
    c.sizes = ("s",)         # small sizes
    c.only_small = 2         # a field of the variant
  return c
''')
  assert cli.config_fields(str(cfg)) == [("sizes", "('a', 'b')", "what the grid trains"),
                                         ("lr", "0.001", "the peak rate, which a long comment continues here"),
                                         ("sub.x", "1", "x")]
  assert ("only_small", "2", "a field of the variant") in cli.config_fields(str(cfg), "small")


def test_run_takes_config_overrides_from_the_argv_it_is_given(monkeypatch, capsys):
  """ml_collections reads which --config.x overrides exist from sys.argv, so `run_train(argv)` (any tool's entry
  point called from Python) refused an override in `argv`: "Unknown command line flag 'config.opt.lr'"."""
  import json
  import os
  import sys
  from glp_jax.util import cli
  monkeypatch.setattr(sys, "argv", ["python"])
  fv = cli.flag_values()
  cli.define_config(fv, "A config.", "configs/train.py")
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "train.py")
  with pytest.raises(SystemExit) as e:
    cli.run(lambda _: None, fv, "doc",
            ["glp-x", f"--config={config}:runlocal", "--config.opt.lr=0.01", "--print_config"])
  out = capsys.readouterr()
  assert e.value.code == 0, out.err
  assert json.loads(out.out)["opt"]["lr"] == 0.01 and sys.argv == ["python"]
