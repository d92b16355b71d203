"""A kernel-by-kernel roofline of a compiled XLA program, read from its optimised HLO text.

Each top-level instruction of the entry computation that does work (a fusion, a library call such as a cuBLAS
GEMM, a copy, a collective) is one kernel on a GPU. For each: the bytes it reads and writes (its operands' and
results' sizes) and the FLOPs of the matmuls it contains (2 x output elements x contracted size). Its least
possible time is max(FLOPs / peak FLOP/s, bytes / memory bandwidth); the sum over kernels is the step's floor at
that peak and bandwidth, and the kernels grouped by the source function that made them (the HLO's stack-frame
table: `LayerNorm.__call__`, `scale_by_adam`, ...) show where the traffic around the GEMMs goes.

Why from the HLO and not from XLA's `cost_analysis()`: a program compiled for a GPU the host does not have
(bench/roofline.py --target) has no cost analysis, and the HLO is what runs on the card: which ops XLA fused,
which stayed separate kernels, in which dtype each GEMM reads its operands. It is a model, not a measurement:
bytes counted once per kernel (an operand a kernel re-reads from L2 costs nothing more here), no launch gaps.
A collective (all-reduce, all-gather, ... of a multi-device program) is costed by its memory traffic like any
kernel; its time on the interconnect is not modelled (XLA overlaps it with compute), but `sent_bytes` says how
much data each device puts into collectives per call of the program.
On the card, bench/profile_step.py puts the measured time of each kernel beside this floor.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+|f4e\w+)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
# Vendor HBM bandwidth (bytes/s) by device kind, most specific names first (as training/metrics.py's peaks).
HBM_BYTES_PER_S = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
    ("L40", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("B200", 8.0e12),
    ("TPU v6", 1.64e12), ("TPU v5 lite", 0.819e12), ("TPU v5e", 0.819e12), ("TPU v5p", 2.765e12),
    ("TPU v4", 1.2e12),
)
# Instructions that move no data of their own (views, bookkeeping; an async op's `-done` only waits for its
# `-start`) or only schedule others.
FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier", "add-dependency", "domain"}
CONTROL = {"while", "conditional", "call", "async-start"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast")


@dataclasses.dataclass
class Instr:
  name: str
  op: str
  shapes: list          # [(dtype, (dims...)), ...] of the result (several for a tuple)
  operands: list[str]
  calls: list[str]      # computations it calls (fusion body, loop body, ...)
  attrs: str            # the rest of the line: kind=, custom_call_target=, backend_config=, metadata=


def _bytes(shapes) -> float:
  return sum(math.prod(dims) * DTYPE_BYTES.get(dtype, 1 if dtype.startswith(("f8", "f4")) else 4)
             for dtype, dims in shapes)


def _shapes(type_text: str) -> list:
  return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in _ARRAY.finditer(type_text)]


def _matching(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def parse_instruction(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):              # a tuple result type
    end = _matching(rest, 0)
  else:
    end = rest.find(" ")
  type_text, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren < 0:
    return None
  op = rest[:paren]
  close = _matching(rest, paren)
  operands = re.findall(r"%([\w.\-]+)", rest[paren:close])
  attrs = rest[close:]
  calls = re.findall(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                     r"\{?((?:%[\w.\-]+(?:,\s*)?)+)\}?", attrs)
  called = [c for group in calls for c in re.findall(r"%([\w.\-]+)", group)]
  return Instr(m.group(1), op, _shapes(type_text), operands, called, attrs)


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instr]]
  entry: str
  frames: dict[int, str]   # stack frame id -> "function (file:line)"


def _tables(text: str) -> dict[int, str]:
  """The HLO's stack-frame tables (FileNames, FunctionNames, FileLocations, StackFrames) -> frame id -> where."""
  def table(name):
    m = re.search(rf"^{name}\n(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    return dict(re.findall(r"^(\d+) (.*)$", m.group(1), re.M)) if m else {}
  files, functions = table("FileNames"), table("FunctionNames")
  locations, frames = table("FileLocations"), table("StackFrames")
  out = {}
  for fid, body in frames.items():
    loc = re.search(r"file_location_id=(\d+)", body)
    where = locations.get(loc.group(1), "") if loc else ""
    f = re.search(r"file_name_id=(\d+)", where)
    fn = re.search(r"function_name_id=(\d+)", where)
    line = re.search(r"\bline=(\d+)", where)
    path = files.get(f.group(1), '""').strip('"') if f else ""
    short = "/".join(path.split("/")[-2:])
    name = functions.get(fn.group(1), '""').strip('"') if fn else "?"
    out[int(fid)] = f"{name} ({short}:{line.group(1) if line else '?'})"
  return out


def parse(text: str) -> Module:
  computations, entry, current = {}, "", None
  for line in text.splitlines():
    h = _HEADER.match(line)
    if h:
      current = computations.setdefault(h.group(2), [])
      if h.group(1):
        entry = h.group(2)
      continue
    if current is not None:
      if line.startswith("}"):
        current = None
      else:
        ins = parse_instruction(line)
        if ins is not None:
          current.append(ins)
  return Module(computations, entry, _tables(text))


def _dot_flops(ins: Instr, shapes: dict) -> float:
  """2 x output elements x contracted size of a `dot`, a cuBLAS GEMM custom call, or a `convolution` (how TPU
  programs write their matmuls: the contracted size is the kernel's input features x its window)."""
  if not ins.shapes or not ins.operands:
    return 0.0
  if ins.op == "convolution":
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs)
    rhs = shapes.get(ins.operands[1]) if len(ins.operands) > 1 else None
    if not labels or not rhs:
      return 0.0
    k = math.prod(size for label, size in zip(labels.group(1), rhs[0][1]) if label == "i" or label.isdigit())
  else:
    if ins.op == "dot":
      dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    else:
      dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
    lhs = shapes.get(ins.operands[0])
    if not lhs:
      return 0.0
    k = math.prod(lhs[0][1][int(d)] for d in re.findall(r"\d+", dims.group(1))) if dims else 1
  return 2.0 * math.prod(ins.shapes[0][1]) * k


def _is_gemm_call(ins: Instr) -> bool:
  target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
  return bool(target) and any(k in target.group(1).lower() for k in ("gemm", "matmul"))


def _flops(module: Module, name: str, seen: set) -> float:
  """Matmul FLOPs of computation `name` and everything it calls."""
  if name in seen or name not in module.computations:
    return 0.0
  seen.add(name)
  body = module.computations[name]
  shapes = {i.name: i.shapes for i in body}
  total = 0.0
  for ins in body:
    if ins.op in ("dot", "convolution") or (ins.op == "custom-call" and _is_gemm_call(ins)):
      total += _dot_flops(ins, shapes)
    for c in ins.calls:
      total += _flops(module, c, seen)
  return total


def kind(ins: Instr) -> str:
  """What an instruction is: 'fusion/kLoop', 'fusion/__triton_gemm', 'custom-call/__cublas$gemm', or its opcode."""
  if ins.op == "fusion":
    custom = re.search(r'"kind":"(__\w+)"', ins.attrs)
    loop = re.search(r"kind=(k\w+)", ins.attrs)
    return "fusion/" + (custom.group(1) if custom else loop.group(1) if loop else "?")
  if ins.op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    return "custom-call/" + (target.group(1) if target else "?")
  return ins.op


def kernels(module: Module, computation: str | None = None) -> list[dict]:
  """The entry computation's kernels (loop and branch bodies expanded once each), each a dict: name, kind,
  bytes, flops, where (the source function), op_name."""
  name = computation or module.entry
  body = module.computations.get(name, [])
  shapes = {i.name: i.shapes for i in body}
  out = []
  for ins in body:
    if ins.op in FREE or ins.op.endswith("-done"):
      continue
    if ins.op in CONTROL:
      for c in ins.calls:
        out += kernels(module, c)
      continue
    operands = [shapes.get(o, []) for o in dict.fromkeys(ins.operands)]
    read = sum(_bytes(o) for o in operands)
    gemm = ins.op == "custom-call" and _is_gemm_call(ins)
    collective = ins.op.removesuffix("-start") in COLLECTIVES
    results = ins.shapes
    if gemm:             # a GEMM call's 2nd result is its workspace
      results = results[:1]
    elif collective and len(results) == 2 * sum(len(o) for o in operands):
      results = results[len(results) // 2:]   # an async start's result repeats its operands before its outputs
    written = _bytes(results)
    flops = (_dot_flops(ins, shapes) if gemm or ins.op in ("dot", "convolution")
             else sum(_flops(module, c, set()) for c in ins.calls))
    frame = re.search(r"stack_frame_id=(\d+)", ins.attrs)
    op_name = re.search(r'op_name="([^"]*)"', ins.attrs)
    out.append({"name": ins.name, "kind": kind(ins), "bytes": read + written, "flops": flops,
                "sent": read if collective else 0.0,
                "where": module.frames.get(int(frame.group(1)), "?") if frame else "?",
                "op_name": op_name.group(1) if op_name else ""})
  return out


def hbm_bandwidth(device_kind: str) -> float | None:
  """The vendor's memory bandwidth of a device kind, or None when unknown (a guess would mislead)."""
  return next((b for name, b in HBM_BYTES_PER_S if name.lower() in device_kind.lower()), None)


def group_of(kernel: dict) -> str:
  """A kernel's group: 'matmul' when it multiplies matrices, 'collective: <op>' for a cross-device exchange, else
  the function whose code made it."""
  if kernel["flops"]:
    return "matmul"
  if kernel["sent"]:
    return "collective: " + kernel["kind"].removesuffix("-start")
  return kernel["where"].split(" (")[0]


def floors(hlo_text: str, flops_per_s: float, bytes_per_s: float) -> list[dict]:
  """`kernels` of the program, each with its `floor_s` and whether compute or memory bounds it."""
  ks = kernels(parse(hlo_text))
  for k in ks:
    k["floor_s"] = max(k["flops"] / flops_per_s, k["bytes"] / bytes_per_s)
    k["bound"] = "compute" if k["flops"] / flops_per_s >= k["bytes"] / bytes_per_s else "memory"
    k["group"] = group_of(k)
  return ks


def roofline(hlo_text: str, flops_per_s: float, bytes_per_s: float, top: int = 15) -> dict:
  """The floor of each kernel and of the program at a peak FLOP/s and a memory bandwidth (module docstring):
  totals, the groups by source function (largest first) and the `top` kernels by floor."""
  ks = floors(hlo_text, flops_per_s, bytes_per_s)
  groups = collections.defaultdict(lambda: {"kernels": 0, "floor_s": 0.0, "bytes": 0.0, "flops": 0.0})
  for k in ks:
    g = groups[k["group"]]
    g["kernels"] += 1
    for key in ("floor_s", "bytes", "flops"):
      g[key] += k[key]
  total = sum(k["floor_s"] for k in ks)
  flops = sum(k["flops"] for k in ks)
  return {"kernels": len(ks), "floor_s": total, "flops": flops, "bytes": sum(k["bytes"] for k in ks),
          "sent_bytes": sum(k["sent"] for k in ks),
          "matmul_floor_s": groups["matmul"]["floor_s"] if "matmul" in groups else 0.0,
          "flops_per_s": flops_per_s, "bytes_per_s": bytes_per_s,
          "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["floor_s"])),
          "top": sorted(ks, key=lambda k: -k["floor_s"])[:top]}


def format_table(result: dict, rows: int = 12) -> str:
  """The groups as text lines: floor ms, share, kernels, GB moved, group."""
  lines = []
  total = result["floor_s"] or 1.0
  for name, g in list(result["groups"].items())[:rows]:
    lines.append(f"{1e3 * g['floor_s']:9.3f} ms {100 * g['floor_s'] / total:5.1f}%  {g['kernels']:4d} kernels "
                 f"{g['bytes'] / 1e9:8.3f} GB  {name}")
  return "\n".join(lines)

