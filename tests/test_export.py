"""glp-export / glp-import: reference-layout folders in and out of glp_jax runs, provenance, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import ml_collections  # noqa: E402
import safetensors.torch  # noqa: E402
import yaml  # noqa: E402

from glp_jax.training import checkpoint as ckpt_lib  # noqa: E402
from glp_jax.util import config as config_lib  # noqa: E402
from glp_jax.interop import export as export_lib  # noqa: E402
from glp_jax.interop import import_ref  # noqa: E402
from glp_jax.training import sharding
from glp_jax.training import trainer as train
from glp_jax.training import state as train_lib
from glp_jax.core import model as model_lib  # noqa: E402
from glp_jax.core.normalizer import Normalizer  # noqa: E402
from glp_jax.torch import GLP  # noqa: E402
from glp_jax.data.writer import StoreWriter
from glp_jax.training import input as input_lib
from flax import nnx
from glp_jax.training.prior import load_prior

pytestmark = pytest.mark.torch
D, M, F, L = 16, 32, 64, 2

# A reference config.yaml as the reference trainer writes it (OmegaConf: unquoted interpolation, extra keys).
REF_YAML = """\
model_name: meta-llama/Llama-3.2-1B
batch_size: 4096
learning_rate: 5.0e-05
lr_scheduler:
  name: cosine_scheduler_with_warmup
  warmup_ratio: 0.01
rep_statistic: /data/llama1b/rep_statistics.pt
glp_kwargs:
  normalizer_config:
    rep_statistic: ${{rep_statistic}}
  denoiser_config:
    d_input: {d}
    d_model: {m}
    d_mlp: {f}
    n_layers: {n}
    multi_layer_n_layers: {multi}
  tracedict_config:
    layer_prefix: model.layers
    layers: {layers}
    retain: output
"""


def reference_tensors(multi: int, seed: int = 0) -> dict:
  """Random tensors under the key names and torch shapes documented for the reference checkpoint (§6)."""
  g = torch.Generator().manual_seed(seed)
  shapes = {"model.in_proj.weight": (M, D), "model.in_proj.bias": (M,), "model.out_proj.weight": (D, M),
            "model.out_proj.bias": (D,), "model.ln.weight": (M,), "model.ln.bias": (M,)}
  for emb in ["time_embed"] + (["layer_embed"] if multi else []):
    for i in (0, 2):
      shapes[f"model.{emb}.{i}.weight"], shapes[f"model.{emb}.{i}.bias"] = (M, M), (M,)
  for i in range(L):
    for name, shape in (("up_proj", (F, M)), ("gate_proj", (F, M)), ("time_proj", (F, M)), ("down_proj", (M, F))):
      shapes[f"model.layers.{i}.{name}.weight"], shapes[f"model.layers.{i}.{name}.bias"] = shape, shape[:1]
    shapes[f"model.layers.{i}.ln.weight"] = shapes[f"model.layers.{i}.ln.bias"] = (M,)
  return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def write_reference(path, multi: int = 0, seed: int = 0):
  os.makedirs(path, exist_ok=True)
  tensors = reference_tensors(multi, seed)
  g = torch.Generator().manual_seed(seed + 1)
  shape = (multi, D) if multi else (D,)
  stats = {"mean": torch.randn(shape, generator=g), "var": torch.rand(shape, generator=g) + 0.5}
  layers = list(range(multi)) if multi else [7]
  with open(os.path.join(path, "config.yaml"), "w") as fh:
    fh.write(REF_YAML.format(d=D, m=M, f=F, n=L, multi=multi or "null", layers=layers))
  torch.save(stats, os.path.join(path, "rep_statistics.pt"))
  safetensors.torch.save_file(tensors, os.path.join(path, "final.safetensors"))
  return tensors, stats


DEFAULT_LM = "tiny/default-lm"
DEFAULT_CORPUS = {"source": "embedded:pydoc", "description": "Python documentation (tiny test copy)",
                  "heldout": {"seed": 0, "fraction": 0.05}}


@pytest.fixture(scope="module")
def default_store_cache(tmp_path_factory):
  """A $GLP_JAX_CACHE whose embedded default store is a tiny synthetic one (LM DEFAULT_LM, layer 3, D)."""
  from glp_jax.data.store import default_store_path
  cache = str(tmp_path_factory.mktemp("glp_cache"))
  tiny_store(default_store_path(cache), metadata={"model": DEFAULT_LM, "corpus": DEFAULT_CORPUS})
  return cache


@pytest.fixture(autouse=True)
def tiny_default_store(default_store_cache, monkeypatch):
  """Runs with data.store = "" (make_run, imports) resolve the default store: never build the real one here."""
  monkeypatch.setenv("GLP_JAX_CACHE", default_store_cache)
  return default_store_cache


def small_config(ema: float = 0.0) -> ml_collections.ConfigDict:
  c = import_ref.default_config()
  c.batch_size, c.num_activations, c.opt.ema_decay = 8, 80, ema
  return c


@pytest.mark.parametrize("multi", [0, 4])
def test_reference_folder_import_then_export_is_identity(tmp_path, multi):
  tensors, stats = write_reference(tmp_path / "ref", multi)
  run = str(tmp_path / "run")
  out = import_ref.import_prior(str(tmp_path / "ref"), run, config=small_config())
  assert out["layout"] == "reference" and out["model"]["multi_layer_n_layers"] == multi
  # The run opens like a trained one: load_prior gives exactly the reference tensors and statistics.
  model, normalizer, config = load_prior(run)
  got = model_lib.to_reference_state_dict(model)
  assert set(got) == set(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
  np.testing.assert_array_equal(normalizer.mean, stats["mean"].numpy())
  np.testing.assert_array_equal(normalizer.var, stats["var"].numpy())
  assert multi or config.data.layer == 7
  # Export back: every tensor and statistic is bit-identical, in both layouts.
  res = export_lib.export(run, str(tmp_path / "out"))
  for name in ("final.safetensors", "model.safetensors"):
    back = safetensors.torch.load_file(str(tmp_path / "out" / name))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
      assert torch.equal(back[k], v), (name, k)
  back_stats = torch.load(tmp_path / "out" / "rep_statistics.pt")
  assert torch.equal(back_stats["mean"], stats["mean"]) and torch.equal(back_stats["var"], stats["var"])
  ycfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
  assert ycfg["glp_kwargs"]["normalizer_config"]["rep_statistic"] == "${rep_statistic}"
  assert ycfg["glp_kwargs"]["denoiser_config"] == dict(d_input=D, d_model=M, d_mlp=F, n_layers=L,
                                                       multi_layer_n_layers=multi or None)
  assert ycfg["glp_kwargs"]["tracedict_config"]["layers"] == (list(range(multi)) if multi else [7])
  # A reference folder records no training figures: unknown, not the import's step 0 and 0 examples.
  prov = res["provenance"]
  assert prov["imported_from"]["layout"] == "reference"
  assert prov["step"] is prov["activations_seen"] is prov["flops"] is prov["eval_loss"] is None
  card = (tmp_path / "out" / "README.md").read_text()
  assert "| step | unknown |" in card and "| activations seen | unknown |" in card
  assert ycfg["model_name"] == res["provenance"]["lm"] == "meta-llama/Llama-3.2-1B"
  assert ycfg["learning_rate"] == 5e-5 and ycfg["batch_size"] == 8  # typed, not strings
  # The reference folder and our export give the same torch prior.
  a, b = GLP.from_pretrained(tmp_path / "ref"), GLP.from_pretrained(tmp_path / "out")
  z, t = torch.randn(6, D), torch.rand(6) * 1000
  layer = torch.arange(6) % multi if multi else None
  assert torch.equal(a(z, t, layer), b(z, t, layer))


def make_run(workdir: str, step: int = 6):
  """A run as glp-train leaves it, with EMA parameters that differ from the raw ones."""
  config = small_config(ema=0.9)
  model_cfg = model_lib.ModelConfig(D, M, F, L)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.local_devices()[:1])
  model, opt, ema = sharding.create_sharded(train_lib.creator(model_cfg, config, train_lib.total_steps(config)),
                                            mesh)
  ema_flat = {k: v * 0.5 + 0.01 for k, v in model_lib.to_reference_state_dict(model).items()}
  model_lib.load_reference_state_dict(ema, ema_flat)
  pure = train_lib.pure(nnx.split((model, opt, ema))[1])
  os.makedirs(workdir)
  config_lib.write_config(config, workdir)
  rng = np.random.default_rng(0)
  input_lib.save_normalizer(Normalizer(rng.standard_normal(D), rng.uniform(0.5, 2, D)), workdir)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  for s in (step - 2, step):
    ck.save(s, pure, {"step": s, "examples": s * 8, "flops": s * 8 * 1000, "wall_time": 1.0,
                      "data": {"seed": 0, "next_step": s}, "param_shapes": ckpt_lib.shape_signature(pure["model"]),
                      "model": {**model_cfg.__dict__}})
  ck.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
    for s, ev in ((step - 4, 1.5), (step - 2, 1.25), (step - 1, None), (step, 1.0)):
      row = {"step": s, "loss": 2.0, "examples": s * 8}
      if ev is not None:
        row.update(eval_loss=ev, eval_loss_sem=0.1)
      fh.write(json.dumps(row) + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as fh:
    json.dump({"params": 123, "steps": step, "eval_loss": 1.0, "params_checksum": "abc", "done": True}, fh)
  return ema_flat, model_lib.to_reference_state_dict(model)


def test_export_uses_ema_and_records_provenance(tmp_path):
  run = str(tmp_path / "run")
  ema_flat, raw_flat = make_run(run)
  export_lib.export(run, str(tmp_path / "out"), dtype="bfloat16")
  sd = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
  for k, v in ema_flat.items():
    assert sd[k].dtype == torch.bfloat16
    assert torch.equal(sd[k], torch.from_numpy(v).to(torch.bfloat16)), k
  assert not np.allclose(ema_flat["model.in_proj.weight"], raw_flat["model.in_proj.weight"])
  conf = json.loads((tmp_path / "out" / "config.json").read_text())
  prov = conf["provenance"]
  assert prov["source_run"] == os.path.abspath(run) and prov["step"] == 6 and prov["ema"] is True
  assert prov["activations_seen"] == 48 and prov["flops"] == 48000
  assert (prov["eval_loss"], prov["eval_step"]) == (1.0, 6)
  # The checksum is of the EMA weights written, not summary.json's (of the raw weights).
  ema_checksum = train_lib.params_checksum(nnx.to_pure_dict(nnx.state(load_prior(run)[0])))
  assert prov["params_checksum"] == ema_checksum != "abc"
  assert conf["dtype"] == "bfloat16" and conf["sampler"]["num_steps"] == 20
  # An earlier step: its own checkpoint meta and the last eval at or before it.
  prov4 = export_lib.export(run, str(tmp_path / "out4"), step=4)["provenance"]
  assert (prov4["step"], prov4["activations_seen"], prov4["eval_loss"], prov4["eval_step"]) == (4, 32, 1.25, 4)
  assert prov4["params_checksum"] == ema_checksum   # make_run saves the same weights at both steps


def test_reexport_of_an_imported_export_keeps_the_source_figures(tmp_path):
  """export -> glp-import -> export: the second export's step, examples, FLOPs and eval loss are the first's."""
  run, run2 = str(tmp_path / "run"), str(tmp_path / "run2")
  make_run(run)
  first = export_lib.export(run, str(tmp_path / "out"))["provenance"]
  import_ref.import_prior(str(tmp_path / "out"), run2, config=small_config())
  again = export_lib.export(run2, str(tmp_path / "again"))["provenance"]
  keys = ("step", "activations_seen", "flops", "eval_loss", "eval_loss_sem", "eval_step", "ema", "params_checksum")
  assert {k: again[k] for k in keys} == {k: first[k] for k in keys}
  assert (again["step"], again["activations_seen"], again["flops"], again["ema"]) == (6, 48, 48000, True)
  assert again["source_run"] == os.path.abspath(run2) and again["imported_from"]["layout"] == "glp_jax"
  card = (tmp_path / "again" / "README.md").read_text()
  assert "| activations seen | 48 |" in card and "| step | 6 |" in card
  assert "| training compute (FLOPs) | 4.8e+04 |" in card
  with pytest.raises(FileNotFoundError, match="step 5"):
    export_lib.export(run, str(tmp_path / "out5"), step=5)


def test_cli_import_then_export(tmp_path, capsys):
  write_reference(tmp_path / "ref", 0, seed=3)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # Both console scripts in one process (one jax import): their flags must not collide with each other
  # or with glp_jax.training.trainer's, which export imports.
  script = f"""
from glp_jax.interop import cli
from glp_jax.training import trainer as train
for tool, argv in ((cli.run_import, ['glp-import', '--src={tmp_path / 'ref'}', '--workdir={tmp_path / 'run'}',
                                 '--config={root}/configs/train.py:runlocal']),
                   (cli.run_export, ['glp-export', '--workdir={tmp_path / 'run'}', '--out={tmp_path / 'out'}'])):
  try:
    tool(argv)
  except SystemExit as e:
    assert not e.code, e.code
"""
  env = {**os.environ, "PYTHONPATH": root}
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  imported, exported = [json.loads(l) for l in res.stdout.strip().splitlines()[-2:]]
  assert imported["layout"] == "reference" and exported["architecture"]["d_mlp"] == F
  a = safetensors.torch.load_file(str(tmp_path / "ref" / "final.safetensors"))
  b = safetensors.torch.load_file(str(tmp_path / "out" / "final.safetensors"))
  assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
  # Bad flags stop before any work: one line on stderr naming the flag, exit status 2.
  from glp_jax.interop import cli
  for run, argv, name in ((cli.run_export, ["glp-export", "--step=x"], "step"),
                          (cli.run_import, ["glp-import", "--bogus=1"], "bogus")):
    with pytest.raises(SystemExit) as e:
      run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and name in err[0], err


def test_bad_reference_folder_names_the_key(tmp_path):
  cfg = small_config()
  tensors, stats = write_reference(tmp_path / "ref")
  ref = tmp_path / "ref"
  # Missing tensor.
  safetensors.torch.save_file({k: v for k, v in tensors.items() if k != "model.layers.1.time_proj.weight"},
                              str(ref / "final.safetensors"))
  with pytest.raises(KeyError, match=r"model\.layers\.1\.time_proj\.weight"):
    import_ref.import_prior(str(ref), str(tmp_path / "r1"), config=cfg)
  # Wrong shape.
  safetensors.torch.save_file({**tensors, "model.layers.0.down_proj.bias": torch.zeros(M + 1)},
                              str(ref / "final.safetensors"))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.down_proj\.bias"):
    import_ref.import_prior(str(ref), str(tmp_path / "r2"), config=cfg)
  # A config.yaml that disagrees with the weights (d_model).
  safetensors.torch.save_file(tensors, str(ref / "final.safetensors"))
  (ref / "config.yaml").write_text(REF_YAML.format(d=D, m=M * 2, f=F, n=L, multi="null", layers=[7]))
  with pytest.raises(ValueError, match=r"model\.in_proj\.weight"):
    import_ref.import_prior(str(ref), str(tmp_path / "r3"), config=cfg)
  (ref / "config.yaml").write_text(REF_YAML.format(d=D, m=M, f=F, n=L, multi="null", layers=[7])
                                   .replace("    d_mlp: 64\n", ""))
  with pytest.raises(ValueError, match="d_mlp"):
    import_ref.import_prior(str(ref), str(tmp_path / "r4"), config=cfg)
  # Statistics: a missing key and a wrong width.
  (ref / "config.yaml").write_text(REF_YAML.format(d=D, m=M, f=F, n=L, multi="null", layers=[7]))
  torch.save({"mean": stats["mean"]}, ref / "rep_statistics.pt")
  with pytest.raises(KeyError, match="'var'"):
    import_ref.import_prior(str(ref), str(tmp_path / "r5"), config=cfg)
  torch.save({"mean": stats["mean"][:-1], "var": stats["var"][:-1]}, ref / "rep_statistics.pt")
  with pytest.raises(ValueError, match="'mean'"):
    import_ref.import_prior(str(ref), str(tmp_path / "r6"), config=cfg)
  # Nothing was written for the failed imports; a second import into the same run is refused.
  assert not any(os.path.exists(tmp_path / f"r{i}") for i in range(1, 7))
  torch.save(stats, ref / "rep_statistics.pt")
  import_ref.import_prior(str(ref), str(tmp_path / "ok"), config=cfg)
  with pytest.raises(FileExistsError, match="checkpoints"):
    import_ref.import_prior(str(ref), str(tmp_path / "ok"), config=cfg)


def test_an_import_cut_short_during_its_save_is_imported_again_not_trained_from_scratch(tmp_path):
  """A glp-import killed while saving its checkpoint leaves an orbax temporary folder: a second import was
  refused ("already holds checkpoints"), and glp-train there trained a random model under the store's
  normaliser, done, as if it had continued the prior."""
  tensors, _ = write_reference(tmp_path / "ref")
  run = str(tmp_path / "run")
  cfg = config_lib.override(small_config(), {"data.heldout_rows": 256, "eval_rows": 256, "data.block_rows": 8,
                                              "data.window_blocks": 8})
  import_ref.import_prior(str(tmp_path / "ref"), run, config=cfg)
  ck = os.path.join(run, "checkpoints")
  os.rename(os.path.join(ck, "0"), os.path.join(ck, "0.orbax-checkpoint-tmp-1700000000000000"))
  with pytest.raises(config_lib.ConfigError, match="run the same glp-import again"):
    train.train_and_evaluate(cfg, run)
  assert not os.path.exists(os.path.join(run, "metrics.jsonl"))
  import_ref.import_prior(str(tmp_path / "ref"), run, config=cfg)
  got = model_lib.to_reference_state_dict(load_prior(run)[0])
  assert all(np.array_equal(got[k], v.numpy()) for k, v in tensors.items())


def tiny_store(path: str, rows: int = 2048, metadata: dict | None = None) -> str:
  rng = np.random.default_rng(0)
  mean, scale, mix = rng.normal(size=D) * 3, rng.uniform(0.5, 2, size=D), rng.normal(size=(2, D))
  st = StoreWriter.create(path, layers=[3], d=D, dtype="float32", shard_rows=1024, chunk_rows=256,
                          metadata=metadata or {"model": "tiny/lm"})
  for doc in range(rows // 64):
    x = rng.normal(size=(64, 2)) @ mix + 0.1 * rng.normal(size=(64, D))
    st.append({3: ((x + mean) * scale).astype(np.float32)}, doc_id=doc, positions=np.arange(64))
  st.close()
  return path


def train_config(store: str, **extra) -> ml_collections.ConfigDict:
  c = small_config()
  c.data.store, c.batch_size, c.num_activations = store, 64, 64 * 6
  c.data.block_rows, c.data.window_blocks, c.data.heldout_rows, c.eval_rows = 32, 8, 256, 256
  c.log_every, c.eval_every, c.ckpt.every_steps, c.opt.ema_decay = 2, 3, 3, 0.5
  return config_lib.override(c, extra)


@pytest.mark.slow
def test_trained_run_export_parity_and_reimport_then_train(tmp_path):
  """glp-train -> glp-export -> torch parity with load_prior -> glp-import -> glp-train continues from it."""
  store = tiny_store(str(tmp_path / "store"))
  run = str(tmp_path / "run")
  summary = train.train_and_evaluate(train_config(store), run)
  res = export_lib.export(run, str(tmp_path / "out"))
  prov = res["provenance"]
  assert (prov["step"], prov["activations_seen"], prov["ema"]) == (6, 384, True)
  assert prov["eval_loss"] == summary["eval_loss"]
  # The EMA weights are exported: their checksum, not summary.json's (of the raw weights).
  model, normalizer, _ = load_prior(run)
  assert prov["params_checksum"] == train_lib.params_checksum(nnx.to_pure_dict(nnx.state(model)))
  assert prov["params_checksum"] != summary["params_checksum"]
  assert (prov["lm"], prov["layer"]) == ("tiny/lm", 3)
  glp = GLP.from_pretrained(tmp_path / "out")
  x = np.random.default_rng(1).standard_normal((32, D)).astype(np.float32)
  t = np.linspace(1, 1000, 32).astype(np.float32)
  v_jax = np.asarray(model(jax.numpy.asarray(x), jax.numpy.asarray(t)))
  v_torch = glp(torch.from_numpy(x), torch.from_numpy(t)).detach().numpy()
  assert np.abs(v_torch - v_jax).max() <= 1e-5 * np.abs(v_jax).max()
  np.testing.assert_array_equal(glp.normalizer.mean.numpy(), normalizer.mean)
  # Our export back into a run; a tiny learning rate shows training resumes from the imported weights.
  run2 = str(tmp_path / "run2")
  cfg2 = train_config(store, **{"opt.lr": 1e-12})
  assert import_ref.import_prior(str(tmp_path / "out"), run2, config=cfg2)["layout"] == "glp_jax"
  source = json.loads(open(os.path.join(run2, "imported_from.json")).read())
  assert source["model_name"] == "tiny/lm" and source["source_provenance"]["step"] == 6
  start = model_lib.to_reference_state_dict(load_prior(run2)[0])
  exported = {k: v.numpy() for k, v in glp.denoiser.state_dict().items()}
  assert all(np.array_equal(start[k], exported[k]) for k in exported)
  assert train.train_and_evaluate(cfg2, run2)["done"]
  end = model_lib.to_reference_state_dict(load_prior(run2)[0])
  assert all(np.allclose(end[k], exported[k], atol=1e-6) for k in exported)
