"""Where a compiled step's GPU time goes: a jax.profiler trace read back per XLA op (`op_times`), each op
labelled with the source line of its HLO metadata (`hlo_sources`); `profile` does both for a compiled step.
Used by speed/train_step_bench.py --profile and studies/mqar_sweep --throughput --profile."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

import jax


def profile(compiled, state, batch, out_dir: str, name: str, steps: int = 3) -> dict:
  """Traces `steps` steps; writes <name>.hlo.txt.gz and <name>_ops.json (GPU ms per op per step)."""
  trace_dir = os.path.join(out_dir, "trace_" + name)
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  hlo = compiled.as_text()
  with gzip.open(os.path.join(out_dir, name + ".hlo.txt.gz"), "wt") as f:
    f.write(hlo)
  traces = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not traces:
    return {"error": f"no perfetto trace under {trace_dir}"}
  kernels = {}
  ops = op_times(traces[0], steps, kernels)
  labels = hlo_sources(hlo)
  rows = [dict(op=op, ms=ms, calls=calls, source=labels.get(op, ""), kernel=kernels.get(op, ""))
          for op, (ms, calls) in ops.items()]
  rows.sort(key=lambda r: -r["ms"])
  by_source = collections.defaultdict(float)
  for r in rows:
    by_source[r["source"].split(" [")[0] or r["op"].split(".")[0]] += r["ms"]
  summary = {"gpu_ms_per_step": sum(r["ms"] for r in rows),
             "by_source": dict(sorted(by_source.items(), key=lambda kv: -kv[1])), "ops": rows}
  with open(os.path.join(out_dir, name + "_ops.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return {"gpu_ms_per_step": summary["gpu_ms_per_step"],
          "top_sources": dict(list(summary["by_source"].items())[:25])}


def op_times(trace_path: str, steps: int, kernels: dict[str, str] | None = None) -> dict[str, tuple[float, int]]:
  """{HLO op: (ms per step, kernel launches per step)} from a perfetto trace.

  On a GPU the kernels of the device's "Stream" lines are summed per `hlo_op`; on the CPU (to test this
  script) the host threads' events that name an `hlo_op`. `kernels`, if given, is filled with {HLO op: the name
  of its longest kernel}: a Pallas kernel's own name (its pallas_call's), which says which of a custom VJP's
  kernels ran where the op's source line cannot (a VJP's forward and backward kernels share the call's line)."""
  with gzip.open(trace_path, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  gpu_pids = {pid for pid, n in procs.items() if "GPU" in n}

  def counted(e):
    if e.get("ph") != "X" or not e.get("args", {}).get("hlo_op"):
      return False
    if gpu_pids:
      return e["pid"] in gpu_pids and threads.get((e["pid"], e.get("tid")), "").startswith("Stream")
    return True

  out = collections.defaultdict(lambda: [0.0, 0])
  longest = {}
  for e in filter(counted, events):
    op, dur = e["args"]["hlo_op"], float(e.get("dur", 0))
    out[op][0] += dur / 1e3 / steps
    out[op][1] += 1
    if dur >= longest.get(op, ("", -1.0))[1]:
      longest[op] = (e.get("name", ""), dur)
  if kernels is not None:
    kernels.update({op: name for op, (name, _) in longest.items()})
  return {k: (v[0], v[1] // steps) for k, v in out.items()}


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(\d+)")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*metadata=\{([^}]*)\}")
OUR_CODE = ("bmojo_jax/", "pallas_kernels/", "train/")


def hlo_sources(hlo: str) -> dict[str, str]:
  """{instruction: "file.py:line function"} for the innermost frame of our code in the instruction's stack
  (HLO metadata `stack_frame_id` resolved through the module's FileNames / FunctionNames / FileLocations /
  StackFrames tables), else its op_name. A fusion carries its root's metadata."""
  tables, current = collections.defaultdict(dict), None
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = line
      continue
    m = _TABLE_ROW.match(line) if current else None
    if not m:
      current = None
      continue
    body = m.group(2)
    tables[current][int(m.group(1))] = (body.strip('"') if current in ("FileNames", "FunctionNames")
                                        else {k: int(v) for k, v in _FIELD.findall(body)})

  def frame_label(frame_id):
    seen = set()
    while frame_id and frame_id not in seen:
      seen.add(frame_id)
      frame = tables["StackFrames"].get(frame_id)
      if frame is None:
        return ""
      loc = tables["FileLocations"].get(frame["file_location_id"], {})
      path = tables["FileNames"].get(loc.get("file_name_id"), "")
      hit = next((p for p in OUR_CODE if p in path), None)
      if hit and "train/steps.py" not in path:   # the step's own code: look further out
        func = tables["FunctionNames"].get(loc.get("function_name_id"), "")
        return f"{path[path.index(hit):]}:{loc.get('line')} {func.split('.')[-1]}"
      frame_id = frame.get("parent_frame_id")
    return ""

  out = {}
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    meta = m.group(2)
    frame = re.search(r"stack_frame_id=(\d+)", meta)
    src = re.search(r'source_file="([^"]*)".*?source_line=(\d+)', meta)
    op_name = re.search(r'op_name="([^"]*)"', meta)
    label = frame_label(int(frame.group(1))) if frame else ""
    if not label and src:
      label = f"{os.path.basename(src.group(1))}:{src.group(2)}"
    tail = op_name.group(1).split("/")[-1] if op_name else ""
    out[m.group(1)] = f"{label} [{tail}]".strip()
  return out
