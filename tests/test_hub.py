"""Prior folders on the Hugging Face Hub, offline: model cards, push (a stand-in HfApi), and loading repo ids
through a Hub cache (in process, and in a subprocess with HF_HUB_OFFLINE=1, a fresh HF_HUB_CACHE and no JAX)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
import huggingface_hub  # noqa: E402

from glp_jax.torch import GLP, DenoiserConfig, card, hub  # noqa: E402
from hub_fakes import install_fake_hub, put_in_hub_cache  # noqa: E402

pytestmark = pytest.mark.torch
D = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVENANCE = {"lm": "meta-llama/Llama-3.2-1B", "layer": 7, "base_model": "meta-llama/Llama-3.2-1B",
              "license": "apache-2.0", "corpus": {"source": "hf:HuggingFaceFW/fineweb:sample-10BT",
                                                  "heldout": {"fraction": 0.05, "seed": 0}},
              "store": "/data/l1b", "store_rows": 1_000_000, "store_docs": 2000, "params": 123,
              "flops": 1.5e15, "activations_seen": 640_000, "eval_loss": 0.8123456, "eval_loss_sem": 0.0012,
              "eval_step": 600, "step": 600, "evals": {"fd": {"fd": 12.5, "fd_floor": 3.25, "fd_num_samples": 5e4,
                                                               "fd_rank_deficient": 0.0}},
              "export_command": "glp-export --workdir=runs/d6 --out=exports/d6"}


def prior(seed: int = 0) -> GLP:
  torch.manual_seed(seed)
  glp = GLP(DenoiserConfig(D, 32, 64, 2), torch.randn(D), torch.rand(D) + 0.5)
  with torch.no_grad():
    for p in glp.denoiser.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return glp


def same(a: GLP, b: GLP) -> bool:
  z, t = torch.randn(4, D), torch.rand(4) * 1000
  return torch.equal(a(z, t), b(z, t)) and torch.equal(a.normalizer.mean, b.normalizer.mean)


def test_model_card_has_hub_metadata_and_provenance(tmp_path):
  prior().save_pretrained(tmp_path, provenance=PROVENANCE)
  text = (tmp_path / "README.md").read_text()
  meta = hub.read_card_metadata(str(tmp_path))
  assert meta["library_name"] == "glp_jax" and "generative-latent-prior" in meta["tags"]
  assert meta["license"] == "apache-2.0" and meta["base_model"] == "meta-llama/Llama-3.2-1B"
  for want in ("`meta-llama/Llama-3.2-1B`", "| LM layer (residual stream after it) | 7 |", "0.812346 ± 0.0012",
               "fineweb", "1,000,000 rows", "1.5e+15", "640,000", "| fd | `fd` | 12.5 |",
               "glp-export --workdir=runs/d6 --out=exports/d6", 'GLP.from_pretrained("path/to/this/folder")'):
    assert want in text, want
  # A prior with no provenance still gets a card (architecture, parameter count, how to load).
  prior().save_pretrained(tmp_path / "bare")
  bare = (tmp_path / "bare" / "README.md").read_text()
  assert "an unknown LM" in bare and "d_input=16" in bare and hub.read_card_metadata(str(tmp_path / "bare"))
  assert f"| denoiser parameters | {sum(p.numel() for p in prior().denoiser.parameters()):,} |" in bare


def test_edited_card_is_kept(tmp_path):
  prior().save_pretrained(tmp_path, provenance=PROVENANCE)
  (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# my own words\n")
  prior().save_pretrained(tmp_path, provenance=PROVENANCE)
  assert not hub.refresh_card(str(tmp_path), "org/x")
  assert (tmp_path / "README.md").read_text().endswith("# my own words\n")
  os.remove(tmp_path / "README.md")
  assert hub.refresh_card(str(tmp_path), "org/x")
  assert 'GLP.from_pretrained("org/x")' in (tmp_path / "README.md").read_text()


def test_push_to_hub_then_from_pretrained_offline(tmp_path, monkeypatch):
  fake = install_fake_hub(monkeypatch, str(tmp_path / "hub"))
  glp = prior()
  glp.meta["provenance"] = PROVENANCE
  info = glp.push_to_hub("org/glp-tiny", private=True, token="t0k")
  kinds = [c[0] for c in fake.calls]
  assert kinds == ["init", "create_repo", "upload_folder"] and fake.calls[0][1]["token"] == "t0k"
  assert fake.calls[1][1] == {"repo_id": "org/glp-tiny", "private": True, "exist_ok": True}
  assert fake.calls[2][1]["commit_message"] == "Upload GLP prior (step 600)"
  assert info.commit_url.endswith(info.oid)
  snap = tmp_path / "hub" / "models--org--glp-tiny" / "snapshots" / info.oid
  assert {"README.md", "config.json", "model.safetensors", "config.yaml", "rep_statistics.pt",
          "final.safetensors"} <= set(os.listdir(snap))
  assert 'GLP.from_pretrained("org/glp-tiny")' in (snap / "README.md").read_text()
  back = GLP.from_pretrained("org/glp-tiny")   # HF_HUB_OFFLINE=1 (conftest): from the cache only
  assert same(back, glp) and back.meta["provenance"]["lm"] == "meta-llama/Llama-3.2-1B"
  # A branch: created, uploaded to, and loadable by revision; main is unchanged.
  other = prior(seed=1)
  other.push_to_hub("org/glp-tiny", revision="v2")
  assert ("create_branch", {"repo_id": "org/glp-tiny", "branch": "v2", "exist_ok": True}) in fake.calls
  assert same(GLP.from_pretrained("org/glp-tiny", revision="v2"), other)
  assert same(GLP.from_pretrained("org/glp-tiny"), glp)


def test_push_leaves_out_the_temporaries_of_a_killed_write(tmp_path, monkeypatch):
  """A killed export leaves `files.atomic_path`'s temporaries (`<name>.tmp.<pid>`, up to a whole weights file)
  in --out: `glp-export --push_to_hub` into that folder must not upload them."""
  install_fake_hub(monkeypatch, str(tmp_path / "hub"))
  glp = prior()
  glp.save_pretrained(tmp_path / "out")
  for name in ("model.safetensors.tmp.4242", "config.json.tmp.4242", "README.md.tmp.4242"):
    (tmp_path / "out" / name).write_bytes(b"cut short")
  info = hub.push_folder(str(tmp_path / "out"), "org/glp-tiny")
  snap = tmp_path / "hub" / "models--org--glp-tiny" / "snapshots" / info.oid
  assert not [n for n in os.listdir(snap) if ".tmp" in n]
  assert "model.safetensors" in os.listdir(snap) and same(GLP.from_pretrained("org/glp-tiny"), glp)
  # Cut before its config files were written again (they go last): nothing to push, and nothing is pushed.
  os.remove(tmp_path / "out" / "config.json")
  os.remove(tmp_path / "out" / "config.yaml")
  with pytest.raises(FileNotFoundError, match="holds no complete prior"):
    hub.push_folder(str(tmp_path / "out"), "org/glp-cut")
  assert not (tmp_path / "hub" / "models--org--glp-cut").exists()


def test_missing_repo_and_bad_ids_are_clear(tmp_path, monkeypatch):
  install_fake_hub(monkeypatch, str(tmp_path / "hub"))
  with pytest.raises(FileNotFoundError, match=r"'org/absent' is not a local folder.*Hub cache"):
    GLP.from_pretrained("org/absent")
  with pytest.raises(FileNotFoundError, match="does not exist"):   # a path that cannot be a repo id
    GLP.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
  with pytest.raises(ValueError, match="local path"):
    GLP.from_pretrained(str(tmp_path), revision="main")
  with pytest.raises(ValueError, match="not a Hugging Face Hub repo id"):
    prior().push_to_hub("not/a/repo")
  (tmp_path / "org").mkdir()
  assert hub.is_repo_id("org/name") and not hub.is_repo_id("./org/name") and not hub.is_repo_id("a/b/c")
  monkeypatch.chdir(tmp_path)
  os.makedirs("org/name")
  assert not hub.is_repo_id("org/name")   # an existing local folder wins


def test_only_the_needed_files_are_fetched(tmp_path, monkeypatch):
  """Config files first, then the one weights file of the layout, pinned to the commit of the first call."""
  calls = []
  ours, ref = tmp_path / "snap_ours" / ("a" * 40), tmp_path / "snap_ref" / ("b" * 40)
  prior().save_pretrained(ours)
  ref.mkdir(parents=True)
  (ref / "config.yaml").write_text("x: 1\n")

  def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
    calls.append((repo_id, revision, allow_patterns))
    return str(ours if repo_id == "org/ours" else ref)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
  assert hub.resolve("org/ours", revision="v1") == str(ours)
  hub.resolve("org/ref")
  hub.resolve("org/ref", checkpoint="checkpoints/epoch_0032")
  assert calls == [("org/ours", "v1", hub.META_PATTERNS), ("org/ours", "a" * 40, ["model.safetensors"]),
                   ("org/ref", None, hub.META_PATTERNS), ("org/ref", "b" * 40, ["final.safetensors"]),
                   ("org/ref", None, hub.META_PATTERNS),
                   ("org/ref", "b" * 40, ["checkpoints/epoch_0032.safetensors"])]


def test_offline_hub_cache_load_in_a_fresh_process_without_jax(tmp_path):
  """The brief's recipe: HF_HUB_OFFLINE=1, a Hub cache laid out by hand in a fresh HF_HOME, `org/name`."""
  glp = prior()
  glp.save_pretrained(tmp_path / "export", provenance=PROVENANCE)
  put_in_hub_cache(str(tmp_path / "export"), str(tmp_path / "hf_home" / "hub"), "org/name")
  torch.save(glp(torch.ones(2, D), torch.full((2,), 500.0)), tmp_path / "want.pt")
  script = textwrap.dedent(f"""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "tensorstore"):
          raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
    import torch
    from glp_jax.torch import GLP
    glp = GLP.from_pretrained("org/name")
    got = glp(torch.ones(2, {D}), torch.full((2,), 500.0))
    assert torch.equal(got, torch.load({str(tmp_path / 'want.pt')!r})), "different prior"
    assert glp.meta["provenance"]["layer"] == 7
    print("OK")
  """)
  env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
  env.update(PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
  assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]


def test_card_reads_eval_files_of_the_folder(tmp_path):
  prior().save_pretrained(tmp_path, provenance={**PROVENANCE, "evals": {}})
  (tmp_path / "eval_probe.json").write_text(json.dumps({"probe_auc_raw": 0.75, "probe_auc_t0.1": 0.8}))
  (tmp_path / "eval_broken.json").write_text("{not json")
  assert card.read_evals(str(tmp_path)) == {"probe": {"probe_auc_raw": 0.75, "probe_auc_t0.1": 0.8}}
  hub.refresh_card(str(tmp_path))
  assert "| probe | `probe_auc_t0.1` | 0.8 |" in (tmp_path / "README.md").read_text()


def test_card_of_a_resaved_reference_prior_names_its_layer(tmp_path):
  """A reference folder names its layer only in config.yaml's tracedict_config: the re-saved card says it."""
  glp = prior()
  glp.meta["tracedict_config"] = {"layer_prefix": "model.layers", "layers": [7], "retain": "output"}
  glp.save_pretrained(tmp_path / "ours")
  os.makedirs(tmp_path / "ref")
  for name in ("config.yaml", "rep_statistics.pt", "final.safetensors"):   # the reference layout only
    os.link(tmp_path / "ours" / name, tmp_path / "ref" / name)
  GLP.from_pretrained(tmp_path / "ref").save_pretrained(tmp_path / "again")
  text = (tmp_path / "again" / "README.md").read_text()
  assert "| LM layer (residual stream after it) | 7 |" in text and "with steer(model, 7, w" in text


def test_refreshed_card_leaves_out_evals_of_earlier_weights(tmp_path):
  """Re-saving other weights into a folder that glp-eval wrote eval_*.json into: on push the card must not show
  the old weights' numbers as the new ones'."""
  prior(0).save_pretrained(tmp_path)
  (tmp_path / "eval_fd.json").write_text(json.dumps({"fd": 12.5}))       # glp-eval --prior=<folder>
  (tmp_path / "eval_probe.json").write_text(json.dumps({"probe_auc_raw": 0.75}))
  prior(1).save_pretrained(tmp_path)                                      # a re-export into the same folder
  weights = os.path.getmtime(tmp_path / "model.safetensors")
  os.utime(tmp_path / "eval_fd.json", (weights - 60, weights - 60))
  os.utime(tmp_path / "eval_probe.json", (weights + 60, weights + 60))     # measured the new weights
  assert hub.refresh_card(str(tmp_path), "org/x")
  text = (tmp_path / "README.md").read_text()
  assert "| fd |" not in text and "| probe | `probe_auc_raw` | 0.75 |" in text
