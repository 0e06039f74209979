"""Scaling on paper, from measurements: collective bytes read from the compiled HLO on fake CPU devices, step
times measured on one GPU, link bandwidths from public spec sheets -> predicted step time and efficiency on
H100 x 8 / 64 and TPU v5p-64 / 256 (docs/scaling.md).

    # 1. compile the train step on N fake CPU devices (no arrays allocated) and record its collectives and its
    #    memory per device -> benchmarks/results/scaling_hlo_cpu.json
    python -m benchmarks.scaling_model measure --cases bmojo:1.4b:data=8,bmojo:1.4b:fsdp=8
    # 2. the projection (reads the records above and benchmarks/results/train_step_h200.json)
    python -m benchmarks.scaling_model predict
    # the train-step bench with ZeRO-1 on (mesh.shard_optimizer=True), same arguments as train_step_bench
    python -m benchmarks.scaling_model bench-zero1 --families bmojo --sizes 370m --seqs 2048 --meshes 1,data=2

`measure` re-runs itself in a subprocess per device count (XLA_FLAGS=--xla_force_host_platform_device_count=N).
The compiled step is the trainer's (`train.steps.make_train_step`) for the paper preset in bf16, scanned blocks,
remat dots_kernels, the Pallas kernels in interpret mode: the same program the GPU runs up to the backend.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
HLO_RECORDS = os.path.join(RESULTS, "scaling_hlo_cpu.json")

# The 7B preset exists only here: LLaMA-7B's width and depth (d_model 4096, 32 blocks = 64 sublayers, head_dim
# 64); the Transformer has 6.66B parameters, B'MOJO 5.72B (`bmojo_jax.count_params`).
EXTRA_SIZES = {"7b": dict(d_model=4096, n_layers=64)}

# ---------------------------------------------------------------------------------------------------------------
# Reading collectives out of compiled HLO text
# ---------------------------------------------------------------------------------------------------------------

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


def wire_bytes(kind: str, payload: int, n: int) -> float:
  """Bytes one device sends for one collective on a ring of n (bandwidth-optimal algorithms)."""
  if n <= 1:
    return 0.0
  return {"all-reduce": 2 * (n - 1) / n * payload, "all-gather": (n - 1) / n * payload,
          "reduce-scatter": (n - 1) * payload, "all-to-all": (n - 1) / n * payload,
          "collective-permute": payload}[kind]


# ---------------------------------------------------------------------------------------------------------------
# measure: compile on N fake CPU devices
# ---------------------------------------------------------------------------------------------------------------


def parse_case(case: str) -> tuple[str, str, dict[str, int]]:
  """"bmojo:1.4b:data=8" or "transformer:7b:data=8/fsdp=8" -> (family, size, {data, fsdp, tensor})."""
  family, size, mesh = case.split(":")
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  if mesh != "1":
    for part in mesh.split("/"):
      axis, _, n = part.partition("=")
      sizes[axis] = int(n)
  return family, size, sizes


def compile_case(family: str, size: str, mesh: dict[str, int], seq_len: int, batch_per_device: int,
                 zero: bool) -> dict:
  """Compiles the trainer's step for `family`-`size` on the mesh (this process's fake devices); returns its
  collectives and memory analysis per device."""
  import jax
  from benchmarks import train_step_bench as bench
  from bmojo_jax import count_params
  from bmojo_jax.presets import PAPER_SIZES
  from train import setup as setup_lib
  from train import sharding as shard_lib
  from train import steps as steps_lib

  n_dev = int(np.prod(list(mesh.values())))
  extra = dict(EXTRA_SIZES.get(size, {}))
  preset = "1.4b" if extra else size
  assert preset in PAPER_SIZES, size
  attn = "pallas" if family != "transformer" else "reference"
  batch = batch_per_device * mesh["data"] * mesh["fsdp"]
  config = bench.step_config(family, preset, seq_len, batch, attn, "pallas", mesh,
                             dict(remat="dots_kernels", scan_layers=True), **extra)
  config.mesh.shard_optimizer = zero
  cfg = setup_lib.model_config(config)
  setup = setup_lib.build(config, jax.devices()[:n_dev], bench.synthetic_task(seq_len, cfg.vocab_size))
  batch_sh = shard_lib.batch_sharding(setup.mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct((batch, seq_len), np.int32, sharding=batch_sh)
                    for k in ("inputs", "targets")}
  t0 = time.time()
  compiled = steps_lib.make_train_step(setup, 1).lower(setup.abstract_state, abstract_batch).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()

  def per_device(tree) -> int:
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))

  colls = collectives(compiled.as_text(), mesh)
  for c in colls:
    c.pop("group")
  return dict(family=family, size=size, mesh=mesh, devices=n_dev, shard_optimizer=zero, T=seq_len,
              batch=batch, params=count_params(cfg), n_blocks=cfg.n_blocks, compile_s=round(compile_s, 1),
              argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
              temp_bytes=int(mem.temp_size_in_bytes),
              params_bytes_per_device=per_device(setup.abstract_state["params"]),
              opt_bytes_per_device=per_device(setup.abstract_state["opt_state"]), collectives=colls)


def measure(cases: list[str], seq_len: int, batch_per_device: int, zero: bool, out: str) -> None:
  """Each case in a subprocess with as many fake CPU devices as its mesh; appends the records to `out`."""
  records = json.load(open(out)) if os.path.exists(out) else []
  for case in cases:
    family, size, mesh = parse_case(case)
    n = int(np.prod(list(mesh.values())))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}")
    code = (f"import json; from benchmarks.scaling_model import compile_case; print('RESULT' + json.dumps("
            f"compile_case({family!r}, {size!r}, {mesh!r}, {seq_len}, {batch_per_device}, {zero})))")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
      print(f"{case}: failed\n{r.stderr[-3000:]}", flush=True)
      continue
    rec = json.loads(r.stdout.split("RESULT", 1)[1])
    rec["wall_s"] = round(time.time() - t0, 1)
    key = lambda x: (x["family"], x["size"], json.dumps(x["mesh"], sort_keys=True), x["shard_optimizer"], x["T"])
    records = [x for x in records if key(x) != key(rec)] + [rec]
    with open(out, "w") as f:
      json.dump(records, f, indent=1)
    wire = sum(wire_bytes(c["kind"], c["bytes"], c["n"]) * c["runs"] for c in rec["collectives"])
    print(f"{case} zero={zero}: {len(rec['collectives'])} collectives, {wire / 2**30:.3f} GiB sent per device, "
          f"opt {rec['opt_bytes_per_device'] / 2**30:.3f} GiB, args {rec['argument_bytes'] / 2**30:.3f} GiB, "
          f"temp {rec['temp_bytes'] / 2**30:.3f} GiB, compile {rec['compile_s']} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# predict: step time = compute (measured on one GPU) + collectives (HLO bytes / link bandwidth)
# ---------------------------------------------------------------------------------------------------------------

# Every constant with its source (docs/scaling.md repeats them). "assumed": no public number found; the doc says
# how much the result depends on it.
SYSTEMS = {
    # NVIDIA H100 SXM datasheet (nvidia.com/en-us/data-center/h100): 989 TFLOP/s dense bf16, 3.35 TB/s HBM3,
    # NVLink 4 900 GB/s per GPU (both directions: 450 GB/s each way). DGX H100: 8 GPUs a node, one ConnectX-7
    # InfiniBand NDR port of 400 Gb/s (50 GB/s each way) per GPU (DGX H100 user guide).
    "h100": dict(peak_flops=989e12, hbm=3.35e12, node=8, intra_bw=450e9, inter_bw=50e9,
                 intra_alpha=3e-6, inter_alpha=8e-6),                     # alphas assumed
    # NVIDIA H200 SXM datasheet: the same 989 TFLOP/s and NVLink, 4.8 TB/s HBM3e. The 2-GPU measurement ran on
    # two H200s of one host.
    "h200": dict(peak_flops=989e12, hbm=4.8e12, node=8, intra_bw=450e9, inter_bw=50e9,
                 intra_alpha=3e-6, inter_alpha=8e-6),
    # Cloud TPU v5p (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s bf16, 2765 GB/s HBM2e, ICI 1200 GB/s per chip
    # bidirectional (4800 Gbps; 600 GB/s each way), 3-D torus, no node boundary inside a slice.
    "v5p": dict(peak_flops=459e12, hbm=2.765e12, node=None, intra_bw=600e9, inter_bw=600e9,
                intra_alpha=2e-6, inter_alpha=2e-6),                      # alpha assumed
}
ADAM_BYTES_PER_PARAM = 32   # AdamW + clipping in fp32: read p, g, mu, nu (+ g again for the norm), write p, mu, nu
BACKWARD_SHARE = 2 / 3      # of a block's compute, the backward's (3x forward FLOPs counted, 1 fwd + 2 bwd)


def load_measured(path: str = os.path.join(RESULTS, "train_step_h200.json")) -> list[dict]:
  return [r for r in json.load(open(path)) if r.get("step_ms")]


def one_device_fit(records: list[dict], family: str, size: str, attn: str, tag: str | None = None) -> dict:
  """The single-H200 step of family-size at T 2048 (scanned, remat dots_kernels) as t(b) = fixed + b x per_seq:
  fitted on batches 8 and 16 when both were measured, else per_seq from batch 8 with only the optimizer update
  (ADAM_BYTES_PER_PARAM / HBM bandwidth) fixed. tag: only records whose tag starts with it (the 1-GPU runs of
  the same session as a 2-GPU run), when there are any."""
  rows = [r for r in records if r["family"] == family and r["size"] == size and r["attn_impl"] == attn
          and r["T"] == 2048 and r.get("remat") == "dots_kernels" and r.get("scan_layers")
          and r.get("devices", 1) == 1]
  if tag and any(str(r.get("tag", "")).startswith(tag) for r in rows):
    rows = [r for r in rows if str(r.get("tag", "")).startswith(tag)]
  by_batch = {}
  for r in rows:                       # the latest record of each batch
    by_batch[r["batch"]] = r
  t8 = by_batch[8]["step_ms"] * 1e-3
  opt = ADAM_BYTES_PER_PARAM * by_batch[8]["params"] / SYSTEMS["h200"]["hbm"]
  if 16 in by_batch:
    per_seq = (by_batch[16]["step_ms"] * 1e-3 - t8) / 8
    how = f"fit on batch 8 ({t8 * 1e3:.1f} ms) and 16 ({by_batch[16]['step_ms']:.1f} ms)"
  else:
    per_seq = (t8 - opt) / 8
    how = f"batch 8 ({t8 * 1e3:.1f} ms), only the optimizer update fixed"
  fixed = t8 - 8 * per_seq
  return dict(fixed=fixed, per_seq=per_seq, opt=opt, t8=t8, params=by_batch[8]["params"], how=how,
              run=by_batch[8]["run"])


def link_of(group_axes: list[str], mesh: dict[str, int], system: dict) -> tuple[float, float]:
  """(bandwidth each way, per-hop latency) of a collective over `group_axes` of `mesh` on `system`: devices are
  numbered row-major over (data, fsdp, tensor), `system["node"]` to a node; a group within one node uses NVLink,
  one across nodes the InfiniBand port of each GPU. On a TPU torus a group over a share of the slice gets the
  same share of the three torus dimensions' links (at least one dimension) — assumed."""
  n_all = int(np.prod(list(mesh.values())))
  grid = np.arange(n_all).reshape(list(mesh.values()))
  index = tuple(slice(None) if a in group_axes else 0 for a in mesh)
  group = grid[index].ravel()
  if system["node"] is None:
    n = len(group)
    dims = 3 if n >= n_all else max(1, min(3, round(3 * np.log(n) / np.log(max(n_all, 2)))))
    return system["intra_bw"] * dims / 3, system["intra_alpha"]
  if len(set(group // system["node"])) == 1:
    return system["intra_bw"], system["intra_alpha"]
  return system["inter_bw"], system["inter_alpha"]


def collective_time(kind: str, payload: float, n: int, bw: float, alpha: float) -> float:
  hops = int(np.ceil(np.log2(max(n, 2)))) * (2 if kind == "all-reduce" else 1)   # tree-like latency, assumed
  return wire_bytes(kind, payload, n) / bw + hops * alpha


def comm_from_hlo(rec: dict, system: dict) -> dict:
  """Seconds of collectives per step from a `measure` record, split into those inside the scanned blocks'
  loops (which a pipelined schedule can hide behind the next block) and the rest."""
  out = {"loop": 0.0, "entry": 0.0, "bytes": 0.0}
  for c in rec["collectives"]:
    if c["n"] <= 1:
      continue
    bw, alpha = link_of(c["axes"], rec["mesh"], system)
    t = collective_time(c["kind"], c["bytes"], c["n"], bw, alpha) * c["runs"]
    out["loop" if c["depth"] >= 1 else "entry"] += t
    out["bytes"] += wire_bytes(c["kind"], c["bytes"], c["n"]) * c["runs"]
  return out


def analytic_collectives(cfg, params: int, block_params: int, mesh: dict[str, int], zero: bool,
                         fsdp_gathers: float) -> list[dict]:
  """The collectives of the compiled step from parameter counts, in `collectives()`' format (fp32 payloads), in
  the structure the CPU HLO shows (docs/scaling.md):
  - each block's gradient all-reduced inside the backward loop over the batch axes (data x fsdp), the partial
    gradients of a projection used twice reduced separately (B'MOJO's fading tokens reuse the key / value
    projections: + 2 D x kv_heads x head_dim a block); after the loop the rest, the tied embedding twice (its
    lookup's and the head's partial gradients);
  - under fsdp, `fsdp_gathers` all-gathers of each block's parameters in the loop (forward, and the backward's
    remat; read off the HLO at fsdp 2) and two of the embedding after it, over fsdp alone or, with data > 1, over
    data x fsdp (what the HLO at data 8 x fsdp 8 does: the groups span all 64 devices);
  - with ZeRO-1 an all-gather over "data" of the updated parameters (1/fsdp of them on each device).
  Tensor parallelism's activation collectives are not modelled."""
  d, f, n_blocks = mesh["data"], mesh["fsdp"], cfg.n_blocks
  dup = 2 * cfg.d_model * cfg.kv_heads * cfg.head_size if cfg.fading else 0
  embed = cfg.vocab_size * cfg.d_model
  per_block = 4 * (block_params / n_blocks + dup)
  rest = 4 * (params - block_params + (embed if cfg.tie_embeddings else 0))
  out = []
  if d * f > 1:
    axes = [a for a, n in (("data", d), ("fsdp", f)) if n > 1]
    out.append(dict(kind="all-reduce", bytes=per_block, n=d * f, axes=axes, runs=n_blocks, depth=1))
    out.append(dict(kind="all-reduce", bytes=rest, n=d * f, axes=axes, runs=1, depth=0))
  if f > 1:
    # with data > 1 too, the HLO gathers over data x fsdp (the parameters are first resliced over both)
    gather_axes, n_gather = (["data", "fsdp"], d * f) if d > 1 else (["fsdp"], f)
    out.append(dict(kind="all-gather", bytes=4 * block_params / n_blocks, n=n_gather, axes=gather_axes,
                    runs=int(round(fsdp_gathers * n_blocks)), depth=1))
    out.append(dict(kind="all-gather", bytes=4 * embed, n=n_gather, axes=gather_axes, runs=2, depth=0))
  if d > 1 and zero:
    out.append(dict(kind="all-gather", bytes=4 * params / f, n=d, axes=["data"], runs=1, depth=0))
  return out


def step_time(fit: dict, seqs_per_device: float, comm: dict, system_name: str, devices_sharing_opt: int,
              flops_scale: float = 1.0) -> dict:
  """Predicted seconds per step: compute (the one-H200 fit, scaled by peak FLOPs to other chips and by FLOPs per
  token to other sizes, the optimizer by HBM bandwidth and split over ZeRO-1's devices) plus the collectives,
  either all exposed ("serial", what the 2-GPU run shows XLA does now) or the in-loop ones hidden behind the
  blocks' backward ("overlapped", a pipelined per-block reduction)."""
  system = SYSTEMS[system_name]
  chip = SYSTEMS["h200"]["peak_flops"] / system["peak_flops"]
  opt = fit["opt"] * flops_scale * SYSTEMS["h200"]["hbm"] / system["hbm"] / devices_sharing_opt
  compute = ((fit["fixed"] - fit["opt"]) + seqs_per_device * fit["per_seq"]) * flops_scale * chip
  serial = compute + opt + comm["loop"] + comm["entry"]
  overlapped = compute + opt + max(0.0, comm["loop"] - BACKWARD_SHARE * compute) + comm["entry"]
  return dict(compute=compute, opt=opt, loop=comm["loop"], entry=comm["entry"], serial=serial,
              overlapped=overlapped)


def predict(out_path: str) -> None:
  from bmojo_jax import count_params, paper_config
  from bmojo_jax.param_count import train_flops_per_token
  measured = load_measured()
  hlo = json.load(open(HLO_RECORDS)) if os.path.exists(HLO_RECORDS) else []

  def hlo_record(family, size, mesh, zero):
    for r in hlo:
      if (r["family"], r["size"], r["mesh"], r["shard_optimizer"]) == (family, size, mesh, zero):
        return r
    return None

  def model(family, size):
    extra = EXTRA_SIZES.get(size, {})
    cfg = paper_config(family, "1.4b" if extra else size, **extra)
    block = count_params(cfg) - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) - cfg.d_model
    return cfg, count_params(cfg), block

  report = {"check_2gpu": [], "hlo_vs_analytic": [], "projection": []}
  print("== The 2-GPU check (H200 pair, 370M, T 2048, global batch 8 = 4 per GPU, and 16 = 8 per GPU)")
  for family, attn in (("bmojo", "pallas"), ("transformer", "cudnn")):
    fit = one_device_fit(measured, family, "370m", attn, tag="#17 2-GPU")
    for r in measured:
      if (r["family"], r["size"], r["attn_impl"], r.get("devices")) != (family, "370m", attn, 2):
        continue
      mesh = {"data": r["mesh"]["data"], "fsdp": r["mesh"]["fsdp"], "tensor": r["mesh"]["tensor"]}
      rec = hlo_record(family, "370m", mesh, False)
      if rec is None:
        continue
      comm = comm_from_hlo(rec, SYSTEMS["h200"])
      p = step_time(fit, r["batch"] / 2, comm, "h200", 1)
      row = dict(family=family, mesh=mesh, batch=r["batch"], measured_ms=r["step_ms"],
                 serial_ms=p["serial"] * 1e3, overlapped_ms=p["overlapped"] * 1e3, compute_ms=p["compute"] * 1e3,
                 opt_ms=p["opt"] * 1e3, comm_ms=(p["loop"] + p["entry"]) * 1e3, wire_GB=comm["bytes"] / 1e9,
                 error_serial=p["serial"] * 1e3 / r["step_ms"] - 1, tag=r.get("tag"), fit=fit["how"])
      report["check_2gpu"].append(row)
      print(f"{family:12s} {json.dumps(mesh):40s} batch {r['batch']:3d}: measured {r['step_ms']:6.1f} ms, "
            f"predicted {row['serial_ms']:6.1f} (serial; {row['error_serial']:+.1%}) / {row['overlapped_ms']:6.1f} "
            f"(overlapped); compute {row['compute_ms']:.1f} + opt {row['opt_ms']:.1f} + comm {row['comm_ms']:.1f} "
            f"[{row['wire_GB']:.2f} GB sent]; 1-GPU {fit['how']}")

  print("\n== HLO bytes vs the analytic count (GB sent per device per step)")
  fsdp_gathers = {}   # all-gathers over fsdp in the loops, in units of the blocks' parameters, from a pure-fsdp HLO
  for rec in sorted(hlo, key=lambda r: (r["family"], r["devices"])):
    if rec["mesh"]["fsdp"] > 1 and rec["mesh"]["data"] == rec["mesh"]["tensor"] == 1:
      block = model(rec["family"], rec["size"])[2]
      g = sum(c["bytes"] * c["runs"] for c in rec["collectives"]
              if c["kind"] == "all-gather" and c["axes"] == ["fsdp"] and c["depth"] >= 1)
      fsdp_gathers.setdefault(rec["family"], g / (4 * block))
  print("fsdp all-gathers of the blocks' parameters a step:", {k: round(v, 3) for k, v in fsdp_gathers.items()})
  for rec in sorted(hlo, key=lambda r: (r["family"], r["size"], r["devices"])):
    cfg, params, block = model(rec["family"], rec["size"])
    got = sum(wire_bytes(c["kind"], c["bytes"], c["n"]) * c["runs"] for c in rec["collectives"])
    if rec["mesh"]["tensor"] > 1:      # activation collectives: not counted from parameters
      report["hlo_vs_analytic"].append(dict(family=rec["family"], size=rec["size"], mesh=rec["mesh"],
                                            zero=rec["shard_optimizer"], hlo_GB=got / 1e9, analytic_GB=None))
      print(f"{rec['family']:12s} {rec['size']:5s} {json.dumps(rec['mesh']):40s} HLO {got / 1e9:7.3f}  (tensor)")
      continue
    calc = sum(wire_bytes(c["kind"], c["bytes"], c["n"]) * c["runs"] for c in analytic_collectives(
        cfg, params, block, rec["mesh"], rec["shard_optimizer"], fsdp_gathers.get(rec["family"], 2.0)))
    row = dict(family=rec["family"], size=rec["size"], mesh=rec["mesh"], zero=rec["shard_optimizer"],
               hlo_GB=got / 1e9, analytic_GB=calc / 1e9)
    report["hlo_vs_analytic"].append(row)
    print(f"{rec['family']:12s} {rec['size']:5s} {json.dumps(rec['mesh']):40s} zero={rec['shard_optimizer']!s:5s} "
          f"HLO {got / 1e9:7.3f}  analytic {calc / 1e9:7.3f}  ({calc / max(got, 1) - 1:+.1%})")

  print("\n== Projection: weak scaling, 8 x 2048 tokens per device, step ms (efficiency vs 1 chip)")
  fits = {"bmojo": one_device_fit(measured, "bmojo", "1.4b", "pallas"),
          "transformer": one_device_fit(measured, "transformer", "1.4b", "cudnn")}
  mesh_of = lambda d, f: dict(data=d, fsdp=f, tensor=1)
  cases = {"h100": [(8, mesh_of(8, 1), False), (8, mesh_of(1, 8), False), (64, mesh_of(64, 1), False),
                    (64, mesh_of(8, 8), False), (64, mesh_of(8, 8), True)],
           "v5p": [(64, mesh_of(64, 1), False), (64, mesh_of(8, 8), False), (256, mesh_of(256, 1), False),
                   (256, mesh_of(32, 8), False), (256, mesh_of(16, 16), False)]}
  for family in ("bmojo", "transformer"):
    fit = fits[family]
    base_cfg, _, _ = model(family, "1.4b")
    for size in ("1.4b", "7b"):
      cfg, params, block = model(family, size)
      scale = train_flops_per_token(cfg, 2048) / train_flops_per_token(base_cfg, 2048)
      for system_name, rows in cases.items():
        one = step_time(fit, 8, {"loop": 0.0, "entry": 0.0}, system_name, 1, scale)["serial"]
        for n, mesh, zero in rows:
          if size == "7b" and mesh["fsdp"] == 1:
            continue                     # 7B: fp32 params + Adam = 16 B x 6-7B > 80 GB; needs fsdp
          rec = hlo_record(family, size, mesh, zero)
          colls = rec["collectives"] if rec else analytic_collectives(
              cfg, params, block, mesh, zero, fsdp_gathers.get(family, 2.0))
          comm = comm_from_hlo(dict(collectives=colls, mesh=mesh), SYSTEMS[system_name])
          p = step_time(fit, 8, comm, system_name, mesh["data"] if zero else 1, scale)
          row = dict(family=family, size=size, system=system_name, chips=n, mesh=mesh, zero=zero,
                     source="HLO" if rec else "analytic", one_chip_ms=one * 1e3, wire_GB=comm["bytes"] / 1e9,
                     **{k: v * 1e3 for k, v in p.items()}, eff_serial=one / p["serial"],
                     eff_overlapped=one / p["overlapped"])
          report["projection"].append(row)
          print(f"{family:12s} {size:5s} {system_name:5s} x{n:<4d} {json.dumps(mesh):40s} zero={zero!s:5s} 1 chip "
                f"{one * 1e3:7.1f}  serial {p['serial'] * 1e3:7.1f} ({one / p['serial']:.0%})  overlapped "
                f"{p['overlapped'] * 1e3:7.1f} ({one / p['overlapped']:.0%})  [loop {p['loop'] * 1e3:.1f}, after "
                f"{p['entry'] * 1e3:.1f} ms; {comm['bytes'] / 1e9:.1f} GB; {row['source']}]")
  with open(out_path, "w") as f:
    json.dump(report, f, indent=1)
  print(f"\nwrote {out_path}\n")
  print_markdown(report)


def print_markdown(report: dict) -> None:
  """The report's tables as docs/scaling.md shows them."""
  mesh_text = lambda m: " × ".join(f"{a} {n}" for a, n in m.items() if n > 1) or "1"
  print("| model | mesh | global batch | run (tag) | measured ms | predicted ms (serial) | error | predicted ms "
        "(overlapped) | compute + optimizer + collectives ms | GB sent / GPU |\n|---|---|---|---|---|---|---|---|---|---|")
  for r in report["check_2gpu"]:
    print(f"| {r['family']} | {mesh_text(r['mesh'])} | {r['batch']} | {r['tag']} | {r['measured_ms']:.1f} | {r['serial_ms']:.1f} "
          f"| {r['error_serial']:+.1%} | {r['overlapped_ms']:.1f} | {r['compute_ms']:.1f} + {r['opt_ms']:.1f} + "
          f"{r['comm_ms']:.1f} | {r['wire_GB']:.2f} |")
  print("\n| model | size | mesh | ZeRO-1 | GB sent / device, HLO | analytic | difference |\n|---|---|---|---|---|---|---|")
  for r in report["hlo_vs_analytic"]:
    if r["analytic_GB"] is None:
      print(f"| {r['family']} | {r['size']} | {mesh_text(r['mesh'])} | {'on' if r['zero'] else 'off'} | "
            f"{r['hlo_GB']:.3f} | not modelled (tensor) | — |")
      continue
    diff = f"{r['analytic_GB'] / r['hlo_GB'] - 1:+.1%}" if r["hlo_GB"] else "—"
    print(f"| {r['family']} | {r['size']} | {mesh_text(r['mesh'])} | {'on' if r['zero'] else 'off'} | "
          f"{r['hlo_GB']:.3f} | {r['analytic_GB']:.3f} | {diff} |")
  print("\n| model | size | system | chips | mesh | ZeRO-1 | bytes from | GB sent / device | 1 chip ms | serial ms (eff.) "
        "| overlapped ms (eff.) | in-loop / after-loop collectives ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in report["projection"]:
    print(f"| {r['family']} | {r['size']} | {r['system']} | {r['chips']} | {mesh_text(r['mesh'])} | "
          f"{'on' if r['zero'] else 'off'} | {r['source']} | {r['wire_GB']:.1f} | "
          f"{r['one_chip_ms']:.0f} | {r['serial']:.0f} ({r['eff_serial']:.0%}) | {r['overlapped']:.0f} "
          f"({r['eff_overlapped']:.0%}) | {r['loop']:.0f} / {r['entry']:.0f} |")


def bench_with_zero1(argv: list[str]) -> None:
  """`benchmarks.train_step_bench` with mesh.shard_optimizer=True in every config it builds (the bench has no
  flag for it): `python -m benchmarks.scaling_model bench-zero1 <train_step_bench arguments>`."""
  from benchmarks import train_step_bench
  from configs import common
  base = common.base_config

  def with_zero1():
    c = base()
    c.mesh.shard_optimizer = True
    return c

  common.base_config = with_zero1
  sys.argv = ["train_step_bench (ZeRO-1)"] + argv
  train_step_bench.main()


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["bench-zero1"]:
    return bench_with_zero1(argv[1:])
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  m = sub.add_parser("measure")
  m.add_argument("--cases", required=True, help="family:size:mesh list, mesh like data=8/fsdp=8 or 1")
  m.add_argument("--seq", type=int, default=2048)
  m.add_argument("--batch-per-device", type=int, default=1)
  m.add_argument("--no-zero", action="store_true", help="mesh.shard_optimizer=False")
  m.add_argument("--out", default=HLO_RECORDS)
  p = sub.add_parser("predict")
  p.add_argument("--out", default=os.path.join(RESULTS, "scaling_model.json"))
  args = ap.parse_args(argv)
  if args.cmd == "measure":
    measure(args.cases.split(","), args.seq, args.batch_per_device, not args.no_zero, args.out)
  else:
    predict(args.out)


if __name__ == "__main__":
  main()
