"""Times the trainer's own train step (`train.steps.make_train_step`) for every family and size.

    python -m benchmarks.speed.train_step_bench                                   # the whole grid -> results JSON
    python -m benchmarks.speed.train_step_bench --families bmojo,transformer --sizes 130m --seqs 2048
    python -m benchmarks.speed.train_step_bench --layers 4 --profile $OUT/prof   # per-op profile of 2 blocks
    python -m benchmarks.speed.train_step_bench --packed false,true               # packed documents' cost
    python -m benchmarks.speed.train_step_bench --families bmojo --sizes 370m --seqs 2048 --meshes 1,data=2,fsdp=2
    python -m benchmarks.speed.train_step_bench --families bmojo,mamba --sizes 130m --seqs 2048 --layouts all
    python -m benchmarks.speed.train_step_bench --loss-impl reference,chunked --families transformer:cudnn --sizes 1.4b
    python -m benchmarks.speed.train_step_bench --tiny --layouts all            # CPU smoke run of the whole path

Each record: step ms (median of samples of back-to-back steps), tokens/s, MFU, compile s (lower + compile of
the jitted step), peak device bytes (XLA's memory analysis of the compiled step: arguments + temporaries +
outputs not aliased to donated inputs), device, jax, and what chose the layout and the loss: scan_layers,
remat, attn_impl, conv_impl, loss_impl, loss_block, default_layout (whether scan_layers / remat are the preset's own),
and xla_flags (the process's XLA_FLAGS, null when unset).
Equal tokens per step: batch = max(1, tokens // T).
`--layouts` times each configuration in several layouts (LAYOUTS: scanned or loop blocks x a remat policy,
e.g. `scan/dots_attention`; `all` = every one; `scan2/...`, `scan4/...`, `scan8/...` run k blocks per scan
iteration, `scan_unroll`) and prints, per family and shape, the fastest that ran beside
the preset's default (also stored as records with op="best_layout"). `--tiny` is a CPU smoke size (an MQAR-sized
model, T 64, 128 tokens a step, the reference scan and attention).
`--packed true` feeds rows that pack documents (segment_ids, lengths ~ Exp(--doc-len)): records say
`segments: true`.
MFU = `bmojo_jax.param_count.train_flops_per_token` x tokens/s over 989 TFLOP/s (H100/H200 dense bf16 spec):
every matmul and attention's scores/values over the keys each query sees; the scan is not counted.
`--meshes` runs each configuration on each mesh at the same global batch ("1": one device; "data=2",
"fsdp=2", "data=2:tensor=2": the mesh over the first devices, unnamed axes 1); records carry `devices` and
`mesh`, and tokens/s is the whole mesh's. Without it the config's default mesh spreads the batch over every
device (data parallel).

The model is a paper preset in bf16 compute with fp32 parameters, AdamW, the Pallas scan and Pallas memory
attention (the Transformer and Hybrid also with cuDNN attention). `--profile DIR` adds a jax.profiler trace of
3 steps per configuration and the compiled HLO, and writes DIR/<name>_ops.json: GPU time per XLA op per step,
each op labelled with the source line of its HLO metadata and the name of its longest kernel (a Pallas kernel's
own name: a custom VJP's forward and backward kernels share one source line), so the step's time can be read by
model part.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import time

import jax
import numpy as np

from benchmarks.common import device_name, parse_mesh, write_results
from benchmarks.profiling import profile
from benchmarks.step_configs import TINY, model_config, step_config, synthetic_task
from bmojo_jax.kernels import resolve_conv_impl
from bmojo_jax.param_count import count_params, train_flops_per_token
from bmojo_jax.train import sharding as shard_lib
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import steps

PEAK_FLOPS = 989e12  # dense bf16, H100 / H200 SXM spec sheet
DEFAULT_FAMILIES = ("transformer:cudnn", "transformer:pallas", "hybrid:cudnn", "hybrid:pallas", "bmojo_f",
                    "bmojo", "mamba")


LAYOUTS = {f"{'scan' if scan else 'loop'}/{remat}": (scan, remat, 1)
           for scan in (True, False) for remat in ("none", "dots_kernels", "dots_attention", "full")}
# Scanned blocks, k per scan iteration (`scan_unroll`): named, not in "all".
UNROLLED = {f"scan{k}/{remat}": (True, remat, k) for k in (2, 4, 8)
            for remat in ("none", "dots_kernels", "dots_attention", "full")}


def packed_segments(rng, batch: int, seq_len: int, mean_len: int) -> dict[str, np.ndarray]:
  """segment_ids and positions of rows packing documents of exponentially distributed lengths (>= 1)."""
  ids = np.zeros((batch, seq_len), np.int32)
  positions = np.zeros((batch, seq_len), np.int32)
  for row in range(batch):
    start, doc = 0, 1
    while start < seq_len:
      n = min(seq_len - start, max(1, int(rng.exponential(mean_len))))
      ids[row, start:start + n] = doc
      positions[row, start:start + n] = np.arange(n)
      start, doc = start + n, doc + 1
  return {"segment_ids": ids, "positions": positions}


def time_steps(compiled, state, batch, *, min_sample_s: float = 0.2, samples: int = 5):
  """Median ms of one step over `samples` samples of back-to-back steps (each sample >= min_sample_s)."""
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  n = max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-6)))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) * 1e3 / n)
  return float(np.median(times)), state, metrics


def run_one(family: str, attn_impl: str, size: str, seq_len: int, tokens: int, layers: int | None = None,
            remat: str | None = None, profile_dir: str | None = None, scan_impl: str = "pallas",
            scan_layers: bool | None = None, doc_len: int | None = None,
            mesh: dict[str, int] | None = None, loss_impl: str | None = None,
            loss_block: int | None = None, scan_unroll: int | None = None, conv_impl: str | None = None) -> dict:
  batch = max(1, tokens // seq_len)
  overrides = {} if layers is None else {"n_layers": layers}
  compute = {name: value for name, value in (("remat", remat), ("scan_layers", scan_layers),
                                             ("loss_impl", loss_impl), ("loss_block", loss_block),
                                             ("scan_unroll", scan_unroll), ("conv_impl", conv_impl))
             if value is not None}
  config = step_config(family, size, seq_len, batch, attn_impl, scan_impl, mesh, compute, **overrides)
  devices = None if mesh is None else jax.devices()[:int(np.prod(list(mesh.values()) or [1]))]
  setup = setup_lib.build(config, devices, task=synthetic_task(seq_len, config.model.vocab_size))
  cfg = setup.cfg
  step = steps.make_train_step(setup, 1)
  state = setup.init_state()
  rng = np.random.default_rng(0)
  data = rng.integers(0, cfg.vocab_size, size=(batch, seq_len + 1), dtype=np.int32)
  arrays = {"inputs": data[:, :-1], "targets": data[:, 1:]}
  if doc_len:
    arrays.update(packed_segments(rng, batch, seq_len, doc_len))
  batch_arrays = shard_lib.shard_batch(arrays, setup.mesh)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)
  step_ms, state, metrics = time_steps(compiled, state, batch_arrays)
  tokens_per_s = batch * seq_len / (step_ms / 1e3)
  compute = cfg.compute
  rec = dict(op="train_step", family=family, attn_impl=compute.attn_impl.value, scan_impl=compute.scan_impl.value,
             conv_impl=resolve_conv_impl(compute.conv_impl).value,
             size=size, n_layers=cfg.n_layers, params=count_params(cfg), T=seq_len, batch=batch,
             dtype=compute.dtype, remat=compute.remat.value, scan_layers=compute.scan_layers,
             scan_unroll=compute.scan_unroll, default_layout=is_default_layout(family, size, cfg),
             loss_impl=compute.loss_impl.value, loss_block=compute.loss_block, step_ms=step_ms,
             tokens_per_s=tokens_per_s,
             mfu=train_flops_per_token(cfg, seq_len) * tokens_per_s / (PEAK_FLOPS * setup.mesh.size),
             compile_s=compile_s,
             peak_bytes=peak, loss=float(metrics["loss"]), devices=setup.mesh.size,
             mesh=dict(setup.mesh.shape), segments=bool(doc_len), mean_doc_len=doc_len,
             xla_flags=os.environ.get("XLA_FLAGS", "").strip() or None)
  if profile_dir:
    layout = dict(scan_layers=compute.scan_layers, scan_unroll=compute.scan_unroll, remat=compute.remat.value)
    name = (f"{family}_{compute.attn_impl.value}_{size}_L{cfg.n_layers}_T{seq_len}_{layout_name(layout)}"
            .replace("/", "_"))
    rec["profile"] = profile(compiled, state, batch_arrays, profile_dir, name)
  return rec


def is_default_layout(family: str, size: str, cfg) -> bool:
  """Whether cfg's scan_layers and remat are the preset's own."""
  preset = model_config(family, size)
  return (cfg.compute.scan_layers == preset.compute.scan_layers and cfg.compute.remat == preset.compute.remat
          and (cfg.compute.scan_unroll == preset.compute.scan_unroll or not cfg.compute.scan_layers))


def layout_name(rec: dict) -> str:
  unroll = rec.get("scan_unroll") or 1
  return f"{'loop' if not rec['scan_layers'] else 'scan' if unroll == 1 else f'scan{unroll}'}/{rec['remat']}"


SHAPE_KEYS = ("family", "attn_impl", "conv_impl", "size", "T", "batch", "loss_impl", "segments", "devices", "tag",
              "xla_flags")


def best_layouts(records: list[dict]) -> list[dict]:
  """Per family and shape (SHAPE_KEYS) timed in two or more layouts: a record op="best_layout" naming the
  fastest layout that ran and the preset's default layout (None where the default was not timed)."""
  groups = collections.defaultdict(list)
  for r in records:
    if r.get("op") == "train_step" and "error" not in r:
      groups[tuple(r.get(k) for k in SHAPE_KEYS)].append(r)
  out = []
  for key, rs in groups.items():
    if len({layout_name(r) for r in rs}) < 2:
      continue
    best = min(rs, key=lambda r: r["step_ms"])
    default = next((r for r in rs if r.get("default_layout")), None)
    out.append(dict(op="best_layout", **dict(zip(SHAPE_KEYS, key)), best=layout_name(best),
                    best_ms=best["step_ms"], best_compile_s=best["compile_s"], best_peak_bytes=best["peak_bytes"],
                    default=None if default is None else layout_name(default),
                    default_ms=None if default is None else default["step_ms"],
                    speedup=None if default is None else default["step_ms"] / best["step_ms"],
                    layouts={layout_name(r): round(r["step_ms"], 3) for r in rs}))
  return out


def add_scaling(records: list[dict]) -> None:
  """Sets `speedup` (tokens/s over the one-device record of the same configuration) and `scaling_efficiency`
  (speedup / devices) on each multi-device record that has one."""
  key = lambda r: tuple(r.get(k) for k in ("family", "attn_impl", "size", "T", "batch", "remat", "scan_layers",
                                            "scan_unroll", "segments", "tag"))
  single = {key(r): r for r in records if "error" not in r and r["devices"] == 1}
  for r in records:
    one = single.get(key(r))
    if "error" not in r and r["devices"] > 1 and one is not None:
      r["speedup"] = r["tokens_per_s"] / one["tokens_per_s"]
      r["scaling_efficiency"] = r["speedup"] / r["devices"]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                  help="family[:attn_impl] list; attn_impl defaults to pallas")
  ap.add_argument("--sizes", default="130m,370m,1.4b")
  ap.add_argument("--seqs", default="2048,8192,32768")
  ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens // T, >= 1)")
  ap.add_argument("--layers", type=int, default=None, help="override n_layers (profiling a few blocks)")
  ap.add_argument("--remat", default=None, help="remat policies to run, e.g. none,dots (default: the config's)")
  ap.add_argument("--scan-layers", default=None, help="true, false or true,false (default: the config's)")
  ap.add_argument("--scan-impl", default="pallas", help="scan_impl of every model (CPU smoke: associative)")
  ap.add_argument("--conv-impl", default=None,
                  help="the Mamba conv + SiLU: reference, pallas or reference,pallas (default: the config's, auto)")
  ap.add_argument("--profile", default=None, help="directory for traces and per-op tables")
  ap.add_argument("--name", default="train_step", help="result file stem (<name>_<device>.json)")
  ap.add_argument("--tag", default="", help="free text stored in every record (which code version)")
  ap.add_argument("--packed", default="false",
                  help="false, true or false,true: rows packing documents (segment_ids) of mean length --doc-len")
  ap.add_argument("--doc-len", type=int, default=None, help="mean packed document length (default T // 4)")
  ap.add_argument("--meshes", default=None,
                  help="meshes to run each configuration on: 1,data=2,fsdp=2,data=2:tensor=2 (default: data "
                       "parallel over every device)")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="start no new configuration after this many seconds (fits a run into a time limit)")
  ap.add_argument("--layouts", default=None,
                  help=f"layouts to time each configuration in (replaces --remat / --scan-layers): 'all' or a "
                       f"list of {list(LAYOUTS)}; prints the best beside the preset's default")
  ap.add_argument("--loss-impl", default=None, help="chunked, reference or both (default: the config's)")
  ap.add_argument("--loss-block", type=int, default=None, help="tokens per block of the chunked loss")
  ap.add_argument("--tiny", action="store_true",
                  help="CPU smoke run: size tiny, T 64, 128 tokens, reference scan and attention (unless given)")
  args = ap.parse_args()
  if args.tiny:
    args.sizes, args.seqs, args.tokens = TINY, "64", 128
    args.scan_impl = "associative"
    if args.families == ",".join(DEFAULT_FAMILIES):
      args.families = "transformer:reference,hybrid:reference,bmojo_f:reference,bmojo:reference,mamba"
  if args.layouts:
    names = list(LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
    unknown = [n for n in names if n not in {**LAYOUTS, **UNROLLED}]
    if unknown:
      ap.error(f"--layouts {unknown}: choose from {list(LAYOUTS) + list(UNROLLED)} or all")
    layouts = [{**LAYOUTS, **UNROLLED}[n] for n in names]
  else:
    layouts = list(itertools.product(
        [None] if args.scan_layers is None else [v == "true" for v in args.scan_layers.split(",")],
        [None] if args.remat is None else args.remat.split(","), [None]))
  loss_impls = [None] if args.loss_impl is None else args.loss_impl.split(",")
  conv_impls = [None] if args.conv_impl is None else args.conv_impl.split(",")
  packs = [v == "true" for v in args.packed.split(",")]
  meshes = [None] if args.meshes is None else [parse_mesh(m) for m in args.meshes.split(",")]
  if args.profile:
    os.makedirs(args.profile, exist_ok=True)
    # XLA runs a GPU step as CUDA graphs ("command buffers"), which the trace shows as one opaque op: turn
    # them off (before the backend starts) so every kernel is seen. Steps then run ~1-3% slower.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  records, start = [], time.perf_counter()
  for size in args.sizes.split(","):
    for seq_len in map(int, args.seqs.split(",")):
      for spec, (scan_layers, remat, unroll), loss_impl, conv_impl, packed, mesh in itertools.product(
          args.families.split(","), layouts, loss_impls, conv_impls, packs, meshes):
        family, _, attn = spec.partition(":")
        if args.budget_s and time.perf_counter() - start > args.budget_s:
          print(f"budget of {args.budget_s} s spent: skipping {spec} {size} T={seq_len} mesh {mesh}", flush=True)
          continue
        try:
          doc_len = (args.doc_len or seq_len // 4) if packed else None
          rec = run_one(family, attn or "pallas", size, seq_len, args.tokens, args.layers, remat, args.profile,
                        args.scan_impl, scan_layers, doc_len, mesh, loss_impl, args.loss_block, unroll,
                        conv_impl)
        except Exception as e:  # keep the grid going; the record says what failed
          rec = dict(op="train_step", family=family, attn_impl=attn or "pallas", size=size, T=seq_len, mesh=mesh,
                     scan_layers=scan_layers, scan_unroll=unroll, remat=remat, loss_impl=loss_impl,
                     conv_impl=conv_impl, error=f"{type(e).__name__}: {str(e)[:400]}")
        rec["tag"] = args.tag
        records.append(rec)
        add_scaling(records)
        print(json.dumps({k: v for k, v in rec.items() if k != "profile"}), flush=True)
        write_results(records + best_layouts(records), args.name)
  print(f"\n{'family':12s} {'attn':8s} {'size':5s} {'T':>6s} {'layout':20s} {'mesh':8s} {'ms':>8s} "
        f"{'tok/s':>10s} {'MFU':>5s} {'compile':>7s} {'GiB':>6s}   ({device_name()}, jax {jax.__version__})")
  for r in records:
    if "error" in r:
      print(f"{r['family']:12s} {r['attn_impl']:8s} {r['size']:5s} {r['T']:6d} {r['error'][:60]}")
      continue
    layout = (layout_name(r) + ("*" if r["default_layout"] else "") + ("/packed" if r.get("segments") else "")
              + ("/ref-loss" if r["loss_impl"] == "reference" else "")
              + (f"/conv-{r['conv_impl']}" if r["conv_impl"] != resolve_conv_impl("auto").value else ""))
    mesh = ":".join(f"{a[0]}{n}" for a, n in r["mesh"].items() if n > 1) or "1"
    print(f"{r['family']:12s} {r['attn_impl']:8s} {r['size']:5s} {r['T']:6d} {layout:20s} {mesh:8s} "
          f"{r['step_ms']:8.2f} {r['tokens_per_s']:10.0f} {r['mfu']:5.1%} {r['compile_s']:7.1f} "
          f"{(r['peak_bytes'] or 0) / 2**30:6.1f}"
          + (f"   {r['speedup']:.2f}x one device ({r['scaling_efficiency']:.0%})" if "speedup" in r else ""))

  best = best_layouts(records)
  if best:
    print("\nbest layout per family and shape (* above: the preset's default layout)")
  for b in best:
    vs = (f"default {b['default']} {b['default_ms']:.2f} ms: {b['speedup']:.2f}x" if b["default"]
          else "default not timed")
    print(f"{b['family']:12s} {b['attn_impl']:8s} {b['size']:5s} {b['T']:6d} best {b['best']:20s} "
          f"{b['best_ms']:8.2f} ms ({vs})")


if __name__ == "__main__":
  main()
