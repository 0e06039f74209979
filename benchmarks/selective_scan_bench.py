"""Selective scan on the GPU: correctness at full size, timings of the Pallas kernel, the associative scan and
the sequential reference, a T sweep (1k..64k) for linearity, and a block-size sweep.

    PYTHONUNBUFFERED=1 python3 benchmarks/selective_scan_bench.py [--out DIR] [--sweep] [--tscan] [--mixer]

Writes DIR/selective_scan_<device>.json (a list of records {"op", "impl", "shape", "dtype", "fwd_ms",
"fwdbwd_ms", "device", "jax", ...}) and prints a table. Times are medians over >= 20 timed repetitions (each the
mean of `inner` back-to-back calls, so host dispatch overlaps device work) after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.selective_scan import BlockSizes, selective_scan, selective_scan_reference  # noqa: E402

RECORDS = []


def device_name():
  kind = jax.devices()[0].device_kind
  for short in ("H100", "H200", "A100"):
    if short in kind:
      return short.lower()
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def make_inputs(B, T, E, N, dtype, seed=0, with_dz=True):
  ks = jax.random.split(jax.random.PRNGKey(seed), 10)
  u = jax.random.normal(ks[0], (B, T, E), jnp.float32).astype(dtype)
  delta = (0.5 * jax.random.normal(ks[1], (B, T, E), jnp.float32) - 2.0).astype(dtype)
  A = -jnp.exp(0.5 * jax.random.normal(ks[2], (E, N), jnp.float32))
  Bm = jax.random.normal(ks[3], (B, T, N), jnp.float32).astype(dtype)
  Cm = jax.random.normal(ks[4], (B, T, N), jnp.float32).astype(dtype)
  D = jax.random.normal(ks[5], (E,), jnp.float32) if with_dz else None
  z = jax.random.normal(ks[6], (B, T, E), jnp.float32).astype(dtype) if with_dz else None
  bias = 0.5 * jax.random.normal(ks[7], (E,), jnp.float32)
  return (u, delta, A, Bm, Cm, D, z, bias)


def timeit(f, *args, reps=20, inner=5, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) * 1e3 / inner)
  return statistics.median(times)


def fwd_fn(scan):
  return jax.jit(lambda *a: scan(*a))


def fwdbwd_fn(scan):
  def f(*a):
    (y, h), vjp = jax.vjp(scan, *a)
    return vjp((y, h))          # cotangents = outputs: real data, no extra inputs
  return jax.jit(f)


def temp_bytes(f, *args):
  try:
    m = f.lower(*args).compile().memory_analysis()
    return int(m.temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    return None


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def record(impl, shape, dtype, fwd_ms, fwdbwd_ms, **extra):
  r = dict(op="selective_scan", impl=impl, shape=shape, dtype=dtype, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms,
           device=jax.devices()[0].device_kind, jax=jax.__version__, **extra)
  RECORDS.append(r)
  print("RECORD", json.dumps(r), flush=True)


def pallas(bs):
  return lambda *a: selective_scan(*a, block_sizes=bs)


def check_full_size(bs, B=2, T=4096, E=2048, N=16):
  """Pallas vs the sequential reference at the main shape, fp32 and bf16, forward and all gradients."""
  for dtype in (jnp.float32, jnp.bfloat16):
    args = make_inputs(B, T, E, N, dtype, seed=3)
    yp, gp = fwd_fn(pallas(bs))(*args), fwdbwd_fn(pallas(bs))(*args)
    yr, gr = fwd_fn(selective_scan_reference)(*args), fwdbwd_fn(selective_scan_reference)(*args)
    errs = {"y": rel(yp[0], yr[0]), "h_last": rel(yp[1], yr[1])}
    for name, a, b in zip(("u", "delta", "A", "Bm", "Cm", "D", "z", "bias"), gp, gr):
      errs["d" + name] = rel(a, b)
    finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (*yp, *gp))
    print(f"CHECK full size {jnp.dtype(dtype).name}: finite={finite} max rel err={max(errs.values()):.2e}",
          {k: f"{v:.1e}" for k, v in errs.items()}, flush=True)


def mixer_check():
  """The Mamba mixer with the Pallas scan vs the sequential scan: output and every parameter gradient."""
  from flax import nnx
  from bmojo_jax.config import ModelConfig
  from bmojo_jax.mamba import Mamba
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 300, 256), jnp.float32)
  res = {}
  for impl in ("sequential", "pallas"):
    cfg = ModelConfig(family="mamba", d_model=256, n_layers=2, scan_impl=impl)
    graphdef, params = nnx.split(Mamba(cfg, rngs=nnx.Rngs(0)))

    def loss(p):
      out, _ = nnx.merge(graphdef, p)(x)
      return jnp.sum(out * jnp.sin(out)), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    res[impl] = (out, jax.tree.leaves(g))
  errs = [rel(res["pallas"][0], res["sequential"][0])]
  errs += [rel(a, b) for a, b in zip(res["pallas"][1], res["sequential"][1])]
  print(f"CHECK mamba mixer pallas vs sequential (fp32): out {errs[0]:.2e}, max grad {max(errs[1:]):.2e}"
        f" over {len(errs) - 1} params -> {'OK' if max(errs) <= 1e-4 else 'FAIL'}", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--tscan", action="store_true")
  p.add_argument("--mixer", action="store_true")
  p.add_argument("--check", action="store_true")
  p.add_argument("--seq", action="store_true", help="also time the sequential reference")
  p.add_argument("--bs", default="", help="block sizes for the main runs, e.g. block_e=8,chunk=16")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  dev = device_name()
  path = os.path.join(args.out, f"selective_scan_{dev}.json")
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  bs = BlockSizes(**{k: int(v) for k, v in (kv.split("=") for kv in args.bs.split(",") if kv)})
  print("block sizes", bs, flush=True)

  def dump():
    with open(path, "w") as f:
      json.dump(RECORDS, f, indent=1)

  if args.mixer:
    try:
      mixer_check()
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  if args.check:
    check_full_size(bs)

  B, T, E, N, dtype = 2, 4096, 2048, 16, jnp.bfloat16
  shape = dict(B=B, T=T, E=E, N=N, D=True, z=True, delta_bias=True)
  a = make_inputs(B, T, E, N, dtype)
  f, fb = fwd_fn(pallas(bs)), fwdbwd_fn(pallas(bs))
  record("pallas", shape, "bfloat16", timeit(f, *a), timeit(fb, *a), block_sizes=dataclasses.asdict(bs),
         temp_bytes_fwd=temp_bytes(f, *a), temp_bytes_fwdbwd=temp_bytes(fb, *a))
  dump()
  try:
    from bmojo_jax.scan import selective_scan_associative
    f, fb = fwd_fn(selective_scan_associative), fwdbwd_fn(selective_scan_associative)
    record("associative", shape, "bfloat16", timeit(f, *a), timeit(fb, *a),
           temp_bytes_fwd=temp_bytes(f, *a), temp_bytes_fwdbwd=temp_bytes(fb, *a))
  except Exception:  # noqa: BLE001
    traceback.print_exc()
  dump()
  if args.seq:
    f, fb = fwd_fn(selective_scan_reference), fwdbwd_fn(selective_scan_reference)
    record("sequential", shape, "bfloat16", timeit(f, *a, inner=1), timeit(fb, *a, inner=1))
    dump()

  if args.tscan:
    for t in (1024, 4096, 16384, 65536):
      at = make_inputs(B, t, E, N, dtype, seed=t)
      f, fb = fwd_fn(pallas(bs)), fwdbwd_fn(pallas(bs))
      g = fb(*at)
      finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (*f(*at), *g))
      record("pallas", dict(shape, T=t), "bfloat16", timeit(f, *at, reps=20, inner=2),
             timeit(fb, *at, reps=20, inner=2), block_sizes=dataclasses.asdict(bs), finite=finite,
             temp_bytes_fwd=temp_bytes(f, *at), temp_bytes_fwdbwd=temp_bytes(fb, *at), tscan=True)
      dump()

  if args.sweep:
    fwd_cfgs = [dict(block_e=4), dict(block_e=16), dict(block_e=8, chunk=32), dict(block_e=16, num_warps=2),
                dict(block_e=32, num_warps=4)]
    bwd_cfgs = [dict(block_e_bwd=4), dict(block_e_bwd=16), dict(block_e_bwd=8, chunk_bwd=8),
                dict(block_e_bwd=16, num_warps_bwd=2)]
    for cfg in fwd_cfgs + bwd_cfgs:
      b2 = dataclasses.replace(bs, **cfg)
      try:
        fw = timeit(fwd_fn(pallas(b2)), *a) if cfg in fwd_cfgs else None
        fbw = timeit(fwdbwd_fn(pallas(b2)), *a) if cfg in bwd_cfgs else None
        record("pallas", shape, "bfloat16", fw, fbw, block_sizes=dataclasses.asdict(b2), sweep=True)
      except Exception as e:  # noqa: BLE001
        print("SWEEP FAIL", cfg, repr(e)[:300], flush=True)
      dump()

  print(f"\n{'impl':12s} {'T':>6s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'temp MB f/fb':>14s}  block sizes")
  for r in RECORDS:
    tb = "/".join("-" if r.get(k) is None else f"{r[k] / 2**20:.0f}" for k in ("temp_bytes_fwd", "temp_bytes_fwdbwd"))
    fw = "-" if r["fwd_ms"] is None else f"{r['fwd_ms']:.3f}"
    fbw = "-" if r["fwdbwd_ms"] is None else f"{r['fwdbwd_ms']:.3f}"
    bsd = r.get("block_sizes")
    bss = "" if not bsd else ",".join(f"{k}={v}" for k, v in bsd.items() if v != getattr(BlockSizes(), k))
    print(f"{r['impl']:12s} {r['shape']['T']:6d} {fw:>9s} {fbw:>11s} {tb:>14s}  {bss}")
  print("wrote", path)


if __name__ == "__main__":
  main()
