"""The figures issues 14 and 16 ask for, read from bench/gpu_check.sh's results.jsonl (one line per check), so a
device call's output ends with them computed rather than left to be put together by hand. Two are not in any one
check's JSON: glp-train end to end over the fused-AdamW + torch.compile step (issue 14's 1.25x target; the end to
end run and the torch step are separate checks) and d3 / d12 MFU in points off d6's.

  python bench/benchlib/headline.py OUT_DIR/results.jsonl     # prints one JSON object (gpu_check.sh appends it)
"""
from __future__ import annotations

import json
import sys


def _row(result: dict, depth: int) -> dict:
  return next((r for r in result.get("results", []) if r.get("depth") == depth), {})


def headline(lines: list[dict]) -> dict:
  """{issue_14: {...}, issue_16: {...}} from results.jsonl's lines; a figure whose check failed or did not run
  is left out (None where it is a ratio of two)."""
  ok = {l["check"]: l.get("result", {}) for l in lines if l.get("ok") and isinstance(l.get("result"), dict)}
  out: dict = {}
  i14: dict = {}
  d6 = _row(ok.get("train_step_d6", {}), 6)
  jax_d6 = d6.get("jax", {})
  fused = d6.get("torch_fused", {})
  if jax_d6:
    i14["step_d6_mfu"] = jax_d6.get("mfu")
    i14["step_d6_examples_per_s"] = jax_d6.get("examples_per_s")
    for setup in ("torch_eager", "torch_compile", "torch_fused"):
      if f"jax_over_{setup}" in d6:
        i14[f"step_d6_over_{setup}"] = d6[f"jax_over_{setup}"]
  e2e = ok.get("train_e2e", {})
  if e2e:
    i14["e2e_mfu"] = e2e.get("median_mfu_after_compile")   # target >= 0.60
    i14["e2e_examples_per_s"] = e2e.get("median_examples_per_s_after_compile")
    i14["e2e_compute_dtype"] = e2e.get("compute_dtype")
    if "train_step_d6" in ok:   # target >= 1.25 (None: the fused torch step failed)
      i14["e2e_over_torch_fused"] = (i14["e2e_examples_per_s"] / fused["examples_per_s"]
                                     if i14["e2e_examples_per_s"] and fused.get("examples_per_s") else None)
  spread = ok.get("train_step_d3_d12", {})
  for depth in (3, 12):   # target: within 5 points of d6's MFU
    mfu = _row(spread, depth).get("jax", {}).get("mfu")
    if mfu is not None:
      i14[f"step_d{depth}_mfu"] = mfu
      i14[f"step_d{depth}_points_off_d6"] = 100 * (mfu - jax_d6["mfu"]) if jax_d6.get("mfu") is not None else None
  if i14:
    out["issue_14"] = i14
  i16: dict = {}
  for check in ("extract_smollm2", "extract_llama1b"):
    r = ok.get(check)
    if r:   # targets: overhead_steady <= 0.10; >= 1000 MB/s into the store where the disk allows it
      i16[check] = {k: r.get(k) for k in ("overhead_steady", "overhead", "bare_forward_tok_s", "extract_tok_s",
                                          "store_MB_s", "host_ceiling_MB_s", "disk_write_MB_s", "dtype")}
  if i16:
    out["issue_16"] = i16
  return out


def main(path: str) -> None:
  with open(path) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  print(json.dumps({"check": "headline", "ok": True, "result": headline(lines)}))


if __name__ == "__main__":
  main(sys.argv[1])
