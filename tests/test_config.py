"""Config system: args parse with types, wrong keys fail fast naming the key, overrides via absl flags."""
import json
import os
import subprocess
import sys

import pytest

from glp_jax.util import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg_types_and_flags():
  a = config_lib.parse_arg("model=llama1b-d6,runlocal,budget=2e6,seed=3",
                           model="tiny", runlocal=False, budget=0.0, seed=0)
  assert a.model == "llama1b-d6" and a.runlocal is True and a.budget == 2e6 and a.seed == 3
  assert isinstance(a.seed, int) and isinstance(a.budget, float)


@pytest.mark.parametrize("arg,needle", [("modle=d6", "'modle'"), ("seed=abc", "'seed'"), ("model", "'model'")])
def test_parse_arg_errors_name_the_key(arg, needle):
  with pytest.raises(config_lib.ConfigError, match=needle):
    config_lib.parse_arg(arg, model="tiny", seed=0)


def test_train_config_wrong_arg_fails_fast():
  import importlib.util
  spec = importlib.util.spec_from_file_location("train_cfg", os.path.join(ROOT, "configs", "train.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.get_config("runlocal").batch_size > 0
  with pytest.raises(config_lib.ConfigError, match="'bugdet'"):
    mod.get_config("bugdet=1e6")


def test_write_config_round_trip(workdir):
  a = config_lib.parse_arg("seed=5", seed=0, name="x")
  path = config_lib.write_config(a, workdir)
  assert json.load(open(path)) == {"seed": 5, "name": "x"}


_FLAGS_SCRIPT = """
import sys
from absl import app
from ml_collections import config_flags
_CONFIG = config_flags.DEFINE_config_file("config", None, lock_config=True)
def main(_):
  print("LR", _CONFIG.value.opt.lr)
app.run(main)
"""


def test_absl_override_and_unknown_key(tmp_path):
  script = tmp_path / "s.py"
  script.write_text(_FLAGS_SCRIPT)
  cfg = os.path.join(ROOT, "configs", "train.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  ok = subprocess.run([sys.executable, str(script), f"--config={cfg}:runlocal", "--config.opt.lr=3e-4"],
                      capture_output=True, text=True, env=env, cwd=ROOT)
  assert ok.returncode == 0, ok.stderr
  assert "LR 0.0003" in ok.stdout
  bad = subprocess.run([sys.executable, str(script), f"--config={cfg}", "--config.opt.lrr=3e-4"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
  assert bad.returncode != 0 and "lrr" in bad.stderr


def test_override_sets_dotted_keys_and_rejects_unknown():
  import ml_collections
  c = ml_collections.ConfigDict({"opt": {"lr": 1.0}, "seed": 0})
  c.lock()
  assert config_lib.override(c, {"opt.lr": 3e-4, "seed": 2}).opt.lr == 3e-4 and c.seed == 2
  with pytest.raises(config_lib.ConfigError, match="'opt.lrr'"):
    config_lib.override(c, {"opt.lrr": 1.0})


def test_a_source_checkout_runs_without_being_installed(tmp_path):
  """PYTHONPATH=checkout and no install (how bench/gpu_check.sh runs on an accelerator image): the top-level
  configs/ is `glp_jax.configs` there too, so the package imports and `configs/train.py` resolves from any folder.
  `python -S` keeps the test venv's editable-install finder (a .pth file) out, as on such an image."""
  import sysconfig
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, sysconfig.get_paths()["purelib"]]), JAX_PLATFORMS="cpu")
  probe = ("import glp_jax; print(glp_jax.configs.__file__); "
           "print(glp_jax.configs.train(runlocal=True, batch_size=96).batch_size)")
  out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == [os.path.join(root, "configs", "__init__.py"), "96"]
  out = subprocess.run([sys.executable, "-S", "-m", "glp_jax.training.cli", "--config=configs/train.py:runlocal",
                        "--config.model.d_input=64", "--dry_run"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["params"] > 0


def test_a_run_records_its_store_as_an_absolute_path(tmp_path, monkeypatch):
  """config.json names the store so that glp-eval / glp-export find it from any folder; URLs stay as given."""
  from glp_jax.training import trainer
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "train.py"), "runlocal")
  monkeypatch.chdir(tmp_path)
  cfg.data.store = "runs/extract/store"
  assert trainer.resolve(cfg).data.store == str(tmp_path / "runs" / "extract" / "store")
  cfg.data.store = "gs://bucket/store"
  assert trainer.resolve(cfg).data.store == "gs://bucket/store"


def test_dry_run_of_a_preset_without_a_width_reads_it_from_the_store(tmp_path):
  """--dry_run read no store, so a width-less preset failed 'needs the activation width (from the store ...)'
  with a store given."""
  from train_fakes import D, write_store
  from glp_jax.training import state as state_lib
  store = write_store(str(tmp_path / "store"))
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "train.py"), "model=tiny")
  cfg.data.store = store
  assert state_lib.dry_run(cfg)["model"]["d_input"] == D


def test_a_resumed_run_resolves_auto_groups_to_what_it_recorded():
  """data.groups fixes the row order: a resume with groups=auto keeps the recorded value where this process count
  divides it (auto alone would pick the value for today's process count and the restart would be refused)."""
  from glp_jax.training import trainer
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "train.py"), "runlocal")
  assert cfg.data.groups == 0
  auto = trainer.resolve(cfg).data.groups
  assert trainer.resolve(cfg, {"data": {"groups": 2 * auto}}).data.groups == 2 * auto
  assert trainer.resolve(cfg, None).data.groups == auto


def test_only_a_configs_path_falls_back_on_the_packaged_config(tmp_path, monkeypatch):
  """Any missing path whose file name matched a packaged config ran that one: a mistyped
  `--config=/exp/mine/train.py` silently trained with the packaged configs/train.py."""
  monkeypatch.chdir(tmp_path)   # no configs/ here: the README's paths resolve to the package's copies
  shipped = config_lib.packaged_config("configs/train.py")
  assert shipped != "configs/train.py" and os.path.isfile(shipped)
  assert config_lib.packaged_config("./configs/train.py") == shipped
  for path in ("/exp/mine/train.py", "mine/train.py", "train.py", "/exp/configs/train.py"):
    assert config_lib.packaged_config(path) == path
