"""Selective scan on the GPU: correctness at full size, timings of the Pallas kernel, the associative scan and
the sequential reference, a T sweep (1k..64k) for linearity, and a block-size sweep.

    PYTHONUNBUFFERED=1 python3 -m benchmarks.speed.selective_scan_bench [--out DIR] [--sweep] [--tscan] [--mixer]
        [--segments] [--shape B,T,E,N] [--variants "num_warps_bwd=2;chunk=8,chunk_bwd=8"]

Writes DIR/selective_scan_<device>.json (a list of records {"op", "impl", "shape", "dtype", "fwd_ms",
"fwdbwd_ms", "segments", "device", "jax", ...}) and prints a table. Times are medians over >= 20 timed samples
after warm-up, each the mean of enough back-to-back calls to last >= 20 ms, so host dispatch and the final
synchronization are amortized (`benchmarks.common.median_ms`).

`--segments` also times the Pallas kernel on packed documents (a `reset` layout of random document lengths,
mean ~T/8, fixed seed; records with "segments": true, all others false) at the main shape and, with --tscan,
at the T sweep's, and checks it against the sequential reference at full size (--check-dtypes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks.common import device_tag, ints, median_ms, rel_err
from benchmarks.speed.selective_scan_inputs import fwd_fn, fwdbwd_fn, make_inputs, packed_reset, pallas
from bmojo_jax.pallas_kernels.selective_scan.block_sizes import BlockSizes
from bmojo_jax.pallas_kernels.selective_scan.reference import selective_scan_reference

RECORDS = []
START = time.perf_counter()
BUDGET_S = [1e9]


def log(*a):
  print(f"[{time.perf_counter() - START:6.1f}s]", *a, flush=True)


def over_budget():
  return time.perf_counter() - START > BUDGET_S[0]


# Median of 20 samples, each the mean of >= 5 back-to-back calls lasting >= 20 ms together.
timeit = functools.partial(median_ms, warmup=2, iters=20, inner=5, min_sample_ms=20.0)


def compiled(f, *args):
  """AOT-compiles a jitted f for args (timed, logged); returns (executable, temp bytes or None)."""
  t0 = time.perf_counter()
  c = f.lower(*args).compile()
  log(f"  compiled in {time.perf_counter() - t0:.1f}s")
  try:
    temp = int(c.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    temp = None
  return c, temp


def time_pair(fwd, fwdbwd, *args, **kw):
  """fwd_ms, fwdbwd_ms, temp bytes of each (None for a function given as None)."""
  out = []
  for f in (fwd, fwdbwd):
    if f is None:
      out += [None, None]
      continue
    c, temp = compiled(f, *args)
    out += [timeit(c, *args, **kw), temp]
  return out[0], out[2], dict(temp_bytes_fwd=out[1], temp_bytes_fwdbwd=out[3])


def record(impl, shape, dtype, fwd_ms, fwdbwd_ms, segments=False, **extra):
  r = dict(op="selective_scan", impl=impl, shape=shape, dtype=dtype, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms,
           segments=segments, device=jax.devices()[0].device_kind, jax=jax.__version__, **extra)
  RECORDS.append(r)
  log("RECORD", json.dumps(r))


def check_full_size(bs, B=2, T=4096, E=2048, N=16, dtypes=(jnp.float32, jnp.bfloat16), segments=False):
  """Pallas vs the sequential reference at the main shape, forward and all gradients; with `segments`, on
  packed documents (`packed_reset`)."""
  reset = packed_reset(B, T, seed=3) if segments else None
  reference = lambda *a: selective_scan_reference(*a, reset=reset)
  for dtype in dtypes:
    args = make_inputs(B, T, E, N, dtype, seed=3)
    yp, gp = fwd_fn(pallas(bs, reset))(*args), fwdbwd_fn(pallas(bs, reset))(*args)
    yr, gr = fwd_fn(reference)(*args), fwdbwd_fn(reference)(*args)
    errs = {"y": rel_err(yp[0], yr[0]), "h_last": rel_err(yp[1], yr[1])}
    for name, a, b in zip(("u", "delta", "A", "Bm", "Cm", "D", "z", "bias"), gp, gr):
      errs["d" + name] = rel_err(a, b)
    finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (*yp, *gp))
    what = f" with resets ({int(reset.sum())} documents)" if segments else ""
    log(f"CHECK full size{what} {jnp.dtype(dtype).name}: finite={finite} max rel err={max(errs.values()):.2e}",
          {k: f"{v:.1e}" for k, v in errs.items()})


def mixer_check():
  """The Mamba mixer with the Pallas scan vs the sequential scan: output and every parameter gradient."""
  from flax import nnx
  from bmojo_jax.config import ComputeConfig, ModelConfig
  from bmojo_jax.mamba import Mamba
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 300, 256), jnp.float32)
  res = {}
  for impl in ("sequential", "pallas"):
    cfg = ModelConfig(family="mamba", d_model=256, n_layers=2, compute=ComputeConfig(scan_impl=impl))
    graphdef, params = nnx.split(Mamba(cfg, rngs=nnx.Rngs(0)))

    def loss(p):
      out, _ = nnx.merge(graphdef, p)(x)
      return jnp.sum(out * jnp.sin(out)), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    res[impl] = (out, jax.tree.leaves(g))
  errs = [rel_err(res["pallas"][0], res["sequential"][0])]
  errs += [rel_err(a, b) for a, b in zip(res["pallas"][1], res["sequential"][1])]
  log(f"CHECK mamba mixer pallas vs sequential (fp32): out {errs[0]:.2e}, max grad {max(errs[1:]):.2e}"
        f" over {len(errs) - 1} params -> {'OK' if max(errs) <= 1e-4 else 'FAIL'}")


def breakdown(bs, a):
  """Times each stage of the Pallas forward and backward on their own (records with a "stage" field): the
  segment summaries, the carry over segments, the main kernel, and the same for the backward."""
  from bmojo_jax.pallas_kernels.selective_scan import ops
  from bmojo_jax.pallas_kernels.selective_scan.backward import scan_bwd
  from bmojo_jax.pallas_kernels.selective_scan.kernel import scan_fwd
  from bmojo_jax.pallas_kernels.selective_scan.segments import carry_adjoints, carry_states, segment_summaries
  u, delta, A, Bm, Cm, D, z, bias = a
  (B, T, E), N = u.shape, A.shape[1]
  p = ops._plan(u, Bm, A, bs)
  S = p.segments
  u, delta, a2, bm, cm, d, z, bias, _ = ops._prepare(u, delta, A, Bm, Cm, D, z, bias, None, p.t_pad, p.n_pad)
  u, delta, bm, cm, z = (ops._split(x, S) for x in (u, delta, bm, cm, z))
  cpu = jax.default_backend() == "cpu"    # a smoke test of this function: interpret mode
  fwd_kw = ops._fwd_kwargs(p, bs, T, True, cpu)
  stages = {}
  summaries = jax.jit(lambda *x: segment_summaries(*x, reverse=False, **fwd_kw))
  stages["fwd: segment summaries"] = (summaries, (u, delta, a2, bm, bias))
  h_loc, dtsum = summaries(u, delta, a2, bm, bias)
  h_loc, dtsum = h_loc.reshape(B, S, E, -1), dtsum.reshape(B, S, E)
  h0 = jnp.zeros((B, E, p.n_pad), jnp.float32)
  carry_kw = dict(fast_math=bs.fast_math, interpret=cpu)
  states = jax.jit(functools.partial(carry_states, **carry_kw))
  stages["fwd: carry over segments"] = (states, (h_loc, dtsum, a2, h0))
  h_in = states(h_loc, dtsum, a2, h0).reshape(B * S, E, -1)
  for save in (False, True):
    f = jax.jit(functools.partial(scan_fwd, save_every=bs.chunk_bwd, save=save, prefetch=bs.prefetch, **fwd_kw))
    stages[f"fwd: main kernel{' (saving states)' if save else ''}"] = (f, (u, delta, a2, bm, cm, d, z, bias, h_in))
  y, _, hc = f(u, delta, a2, bm, cm, d, z, bias, h_in)
  adj = jax.jit(lambda *x: segment_summaries(*x, reverse=True, **fwd_kw))
  stages["bwd: segment summaries"] = (adj, (y, delta, a2, cm, bias, z))
  g_loc, gsum = adj(y, delta, a2, cm, bias, z)
  g_loc, gsum = g_loc.reshape(B, S, E, -1), gsum.reshape(B, S, E)
  adjoints = jax.jit(functools.partial(carry_adjoints, **carry_kw))
  stages["bwd: carry over segments"] = (adjoints, (g_loc, gsum, a2, h0))
  g_end = adjoints(g_loc, gsum, a2, h0).reshape(B * S, E, -1)
  bwd = jax.jit(functools.partial(
      scan_bwd, seq_len=T, softplus_on=True, segments=S, block_e=p.block_e_bwd, chunk=bs.chunk_bwd,
      num_warps=bs.num_warps_bwd, num_stages=bs.num_stages, prefetch=bs.prefetch_bwd,
      lanes_e=bs.channels_on_lanes_bwd, fast_math=bs.fast_math, interpret=cpu))
  stages["bwd: main kernel"] = (bwd, (u, delta, a2, bm, cm, d, z, bias, hc, y, g_end))
  shape = dict(B=B, T=T, E=E, N=N, D=True, z=True, delta_bias=True)
  for name, (f, args) in stages.items():
    record("pallas-stage", shape, "bfloat16", timeit(f, *args), None, stage=name,
           block_sizes=dataclasses.asdict(bs))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--tscan", action="store_true")
  p.add_argument("--mixer", action="store_true")
  p.add_argument("--check", action="store_true")
  p.add_argument("--seq", action="store_true", help="also time the sequential reference")
  p.add_argument("--breakdown", action="store_true", help="time each stage of the Pallas forward and backward")
  p.add_argument("--budget", type=float, default=1e9, help="seconds; later phases are skipped past it")
  p.add_argument("--variants", default="", help="more block sizes to time, ';'-separated; the best is used after")
  p.add_argument("--check-dtypes", default="float32,bfloat16")
  p.add_argument("--bs", default="", help="block sizes for the main runs, e.g. block_e=8,chunk=16")
  p.add_argument("--shape", type=ints, default=[2, 4096, 2048, 16],
                 help="B,T,E,N of the main runs and --variants (the 1.4B training shape: 8,2048,4096,16)")
  p.add_argument("--segments", action="store_true",
                 help="also time and check the Pallas kernel on packed documents (reset, mean length T/8)")
  args = p.parse_args()
  BUDGET_S[0] = args.budget
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"selective_scan_{device_tag()}.json")
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  try:  # a recompile of the same kernels (the same HLO) then comes from disk
    jax.config.update("jax_compilation_cache_dir", "/tmp/jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  except Exception:  # noqa: BLE001
    traceback.print_exc()
  parse = lambda spec: BlockSizes(**{k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)})
  bs = parse(args.bs)
  print("block sizes", bs, flush=True)

  def dump():
    with open(path, "w") as f:
      json.dump(RECORDS, f, indent=1)

  if args.mixer:
    try:
      mixer_check()
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  log("main timings")

  if len(args.shape) != 4 or min(args.shape) < 1:
    p.error(f"--shape {args.shape}: give B,T,E,N, four positive integers")
  (B, T, E, N), dtype = args.shape, jnp.bfloat16
  shape = dict(B=B, T=T, E=E, N=N, D=True, z=True, delta_bias=True)
  a = make_inputs(B, T, E, N, dtype)
  fw, fbw, mem = time_pair(fwd_fn(pallas(bs)), fwdbwd_fn(pallas(bs)), *a)
  record("pallas", shape, "bfloat16", fw, fbw, block_sizes=dataclasses.asdict(bs), **mem)
  dump()
  tried = [(bs, fw, fbw)]
  if args.segments:
    reset = packed_reset(B, T)
    fw, fbw, mem = time_pair(fwd_fn(pallas(bs, reset)), fwdbwd_fn(pallas(bs, reset)), *a)
    record("pallas", shape, "bfloat16", fw, fbw, segments=True, documents=int(reset.sum()),
           block_sizes=dataclasses.asdict(bs), **mem)
    dump()
  try:
    from bmojo_jax.scan import selective_scan_associative
    fw, fbw, mem = time_pair(fwd_fn(selective_scan_associative), fwdbwd_fn(selective_scan_associative), *a)
    record("associative", shape, "bfloat16", fw, fbw, **mem)
  except Exception:  # noqa: BLE001
    traceback.print_exc()
  dump()
  if args.seq and not over_budget():
    fw, _, mem = time_pair(fwd_fn(selective_scan_reference), None, *a, inner=1)
    _, fbw, mem2 = time_pair(None, fwdbwd_fn(selective_scan_reference), *a, iters=5, inner=1)
    record("sequential", shape, "bfloat16", fw, fbw, note="fwd+bwd median of 5",
           temp_bytes_fwd=mem["temp_bytes_fwd"], temp_bytes_fwdbwd=mem2["temp_bytes_fwdbwd"])
    dump()

  for spec in (v for v in args.variants.split(";") if v):
    if over_budget():
      break
    v = parse(spec)
    log("variant", v)
    try:
      fw, fbw, mem = time_pair(fwd_fn(pallas(v)), fwdbwd_fn(pallas(v)), *a)
      record("pallas", shape, "bfloat16", fw, fbw, block_sizes=dataclasses.asdict(v), variant=True, **mem)
      tried.append((v, fw, fbw))
    except Exception as e:  # noqa: BLE001
      print("VARIANT FAIL", spec, repr(e)[:300], flush=True)
    dump()
  if len(tried) > 1:  # forward fields from the fastest forward, backward fields from the fastest fwd+bwd
    bf = min(tried, key=lambda r: r[1])[0]
    bs = dataclasses.replace(min(tried, key=lambda r: r[2])[0], block_e=bf.block_e, chunk=bf.chunk,
                             num_warps=bf.num_warps, prefetch=bf.prefetch,
                             channels_on_lanes=bf.channels_on_lanes)
    log("best", bs)
  if args.breakdown:
    breakdown(bs, a)
  if args.check:
    check_full_size(bs, dtypes=tuple(jnp.dtype(d) for d in args.check_dtypes.split(",")))
  if args.segments:
    check_full_size(bs, dtypes=tuple(jnp.dtype(d) for d in args.check_dtypes.split(",")), segments=True)

  if args.sweep:
    fwd_cfgs = [dict(block_e=4), dict(block_e=16), dict(block_e=8, chunk=32), dict(block_e=16, num_warps=2),
                dict(block_e=32, num_warps=4)]
    bwd_cfgs = [dict(block_e_bwd=4), dict(block_e_bwd=16), dict(block_e_bwd=8, chunk_bwd=8),
                dict(block_e_bwd=16, num_warps_bwd=2)]
    for cfg in fwd_cfgs + bwd_cfgs:
      if over_budget():
        break
      log("sweep", cfg)
      b2 = dataclasses.replace(bs, **cfg)
      try:
        fw, fbw, _ = time_pair(fwd_fn(pallas(b2)) if cfg in fwd_cfgs else None,
                               fwdbwd_fn(pallas(b2)) if cfg in bwd_cfgs else None, *a)
        record("pallas", shape, "bfloat16", fw, fbw, block_sizes=dataclasses.asdict(b2), sweep=True)
      except Exception as e:  # noqa: BLE001
        print("SWEEP FAIL", cfg, repr(e)[:300], flush=True)
      dump()

  if args.tscan:
    for t in (4096, 1024, 65536, 16384):
      if over_budget():
        break
      at = make_inputs(B, t, E, N, dtype, seed=t)
      (f, mf), (fb, mfb) = compiled(fwd_fn(pallas(bs)), *at), compiled(fwdbwd_fn(pallas(bs)), *at)
      finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (*f(*at), *fb(*at)))
      record("pallas", dict(shape, T=t), "bfloat16", timeit(f, *at, inner=2), timeit(fb, *at, inner=2),
             block_sizes=dataclasses.asdict(bs), finite=finite, tscan=True, temp_bytes_fwd=mf,
             temp_bytes_fwdbwd=mfb)
      dump()
      if args.segments and not over_budget():
        reset = packed_reset(B, t, seed=t)
        (f, mf), (fb, mfb) = (compiled(fwd_fn(pallas(bs, reset)), *at),
                              compiled(fwdbwd_fn(pallas(bs, reset)), *at))
        finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (*f(*at), *fb(*at)))
        record("pallas", dict(shape, T=t), "bfloat16", timeit(f, *at, inner=2), timeit(fb, *at, inner=2),
               segments=True, documents=int(reset.sum()), block_sizes=dataclasses.asdict(bs), finite=finite,
               tscan=True, temp_bytes_fwd=mf, temp_bytes_fwdbwd=mfb)
        dump()

  log("done")
  print(f"\n{'impl':12s} {'T':>6s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'temp MB f/fb':>14s}  block sizes")
  for r in RECORDS:
    tb = "/".join("-" if r.get(k) is None else f"{r[k] / 2**20:.0f}" for k in ("temp_bytes_fwd", "temp_bytes_fwdbwd"))
    fw = "-" if r["fwd_ms"] is None else f"{r['fwd_ms']:.3f}"
    fbw = "-" if r["fwdbwd_ms"] is None else f"{r['fwdbwd_ms']:.3f}"
    bsd = r.get("block_sizes")
    bss = "" if not bsd else ",".join(f"{k}={v}" for k, v in bsd.items() if v != getattr(BlockSizes(), k))
    impl = r["impl"] + ("+reset" if r.get("segments") else "")
    print(f"{impl:12s} {r['shape']['T']:6d} {fw:>9s} {fbw:>11s} {tb:>14s}  {r.get('stage', '')} {bss}")
  print("wrote", path)


if __name__ == "__main__":
  main()
