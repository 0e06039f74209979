"""The collectives of a compiled (SPMD-partitioned) program, read from its HLO text: kind, payload bytes, the mesh
axes each group spans and how many times a step runs it (trip counts of the while loops around it). Read by
the scaling study (benchmarks/studies/scaling_model.py) and the sharding tests (tests/test_scaling.py)."""

from __future__ import annotations

import re

import numpy as np

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
               "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_COLL_RE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def shape_bytes(type_text: str) -> int:
  """Bytes of an HLO type: one array `f32[64,4]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]", type_text):
    total += DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  comps, cur, entry = {}, None, None
  for line in text.splitlines():
    m = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
    elif cur is not None and line.strip() == "}":
      cur = None
    elif cur is not None:
      comps[cur].append(line)
  return comps, entry


def _trips(comps: dict[str, list[str]], entry: str) -> dict[str, tuple[int, int]]:
  """{computation: (how many times one step runs it, depth of while loops around it)} from the entry down;
  a while body counts its `known_trip_count` times its caller's."""
  out, todo = {entry: (1, 0)}, [entry]
  while todo:
    c = todo.pop()
    n, depth = out[c]
    for line in comps.get(c, ()):
      m = re.search(r" while\(.*?body=%([\w.\-]+)", line)
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      callees = re.findall(r"(?:condition|to_apply|calls|body|true_computation|false_computation)=%([\w.\-]+)",
                           line)
      callees += re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", line) or ["", ""])[1])
      for callee in callees:
        if callee not in comps or callee in out:
          continue
        if m and callee == m.group(1):
          out[callee] = (n * (int(trip.group(1)) if trip else 1), depth + 1)
        else:
          out[callee] = (n, depth)
        todo.append(callee)
  return out


def _group_of_device0(line: str, num_devices: int) -> list[int]:
  """The replica group holding device 0, from any of XLA's three spellings of replica_groups."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = [(k.strip("' "), int(v)) for k, v in (a.split("=") for a in m.group(1).split(","))]
    named = {a.strip("' ") for a in m.group(2).split(",") if a.strip()}
    grid = np.arange(int(np.prod([s for _, s in sizes]))).reshape([s for _, s in sizes])
    index = tuple(slice(None) if k in named else 0 for k, _ in sizes)
    return sorted(grid[index].ravel().tolist())
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    tile = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    grid = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(3):
      grid = grid.transpose([int(x) for x in m.group(3).split(",")])
    groups = grid.reshape(-1, tile[-1])
    return sorted(groups[np.argwhere(groups == 0)[0][0]].tolist())
  m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
  if m:
    return sorted(int(x) for x in m.group(1).split(","))
  m = re.search(r"source_target_pairs=\{([^}]*(?:\}[^}]*)*)\}", line)
  if m and "collective-permute" in line:
    return [0, 1]
  return list(range(num_devices))


def collectives(text: str, mesh_shape: dict[str, int]) -> list[dict]:
  """Every collective of a compiled (SPMD-partitioned) module: kind, payload bytes (the output's; a
  reduce-scatter's input is n times it), the mesh axes its group spans, group size n, how many times a step runs
  it (`runs`: the product of the trip counts of the while loops around it) and the loop depth (0: the entry)."""
  comps, entry = _computations(text)
  trips = _trips(comps, entry)
  n_dev = int(np.prod(list(mesh_shape.values())))
  grid = np.arange(n_dev).reshape(list(mesh_shape.values()))
  out = []
  for comp, lines in comps.items():
    if comp not in trips:
      continue
    runs, depth = trips[comp]
    for line in lines:
      m = _COLL_RE.match(line)
      if not m:
        continue
      group = _group_of_device0(line, n_dev)
      coords = np.array([np.argwhere(grid == d)[0] for d in group])
      axes = [a for i, a in enumerate(mesh_shape) if len(set(coords[:, i])) > 1]
      out.append(dict(kind=m.group(2), bytes=shape_bytes(m.group(1)), n=len(group), axes=axes, group=group,
                      runs=runs, depth=depth, computation=comp))
  return out
