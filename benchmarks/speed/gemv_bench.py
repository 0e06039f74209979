"""Decode-time GEMVs: one token's projections in the two kernel layouts, against the copy bandwidth.

A decode step at small batch multiplies M = batch (or 2 rows: a token and its fading read-out) rows by every
weight once, so its speed is the rate at which XLA reads the weights. With the weight stored [D, N] (the
projection's contracted dim major, `in_out`) XLA:GPU turns the M = 1 product into a column reduction; stored
[N, D] (`out_in`, as PyTorch's Linear) it is a row reduction. This times both for the projection shapes of a
preset (default 1.4B: attention 2048x2048, Mamba in_proj 2048x8192, out_proj 4096x2048, x_proj 4096x160,
dt_proj 128x4096, the MLP's 2048x5632 and 5632x2048), M in --rows.

Each GEMV is timed inside one jit over --layers distinct weights (more bytes than the L2 cache holds, so every
weight comes from HBM as in a decode step) and divided by --layers, so Python dispatch does not count.

    python3 -m benchmarks.speed.gemv_bench                      # -> benchmarks/results/gemv_<device>.json
    python3 -m benchmarks.speed.gemv_bench --tiny               # CPU smoke
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, ints, median_ms, write_results
from benchmarks.speed.inference_bench import copy_bandwidth

SHAPES_1_4B = ((2048, 2048), (2048, 8192), (4096, 2048), (4096, 160), (128, 4096), (2048, 5632), (5632, 2048))
SHAPES_TINY = ((64, 32), (32, 64))
SPECS = {"in_out": "MD,DN->MN", "out_in": "MD,ND->MN"}   # weight [D, N] or [N, D]


def layered(spec: str):
  """x [M, D], ws: a list of weights -> the fp32 sum of x·w over them (one program, one GEMV per weight)."""
  return jax.jit(lambda x, ws: sum(jnp.einsum(spec, x, w, preferred_element_type=jnp.float32) for w in ws))


def time_shape(d: int, n: int, m: int, layers: int, dtype, iters: int) -> dict:
  rng = np.random.default_rng(d * 7919 + n)
  x = jnp.asarray(rng.standard_normal((m, d)), dtype)
  w = [jnp.asarray(rng.standard_normal((d, n)) * 0.02, dtype) for _ in range(layers)]
  weights = {"in_out": w, "out_in": [a.T.copy() for a in w]}
  want = np.asarray(sum(np.asarray(x, np.float32) @ np.asarray(a, np.float32) for a in w))
  row = dict(D=d, N=n, M=m, layers=layers, dtype=jnp.dtype(dtype).name, weight_bytes=w[0].nbytes)
  for layout, spec in SPECS.items():
    fn = layered(spec)
    got = np.asarray(fn(x, weights[layout]))
    row[f"{layout}_max_err"] = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
    row[f"{layout}_us"] = median_ms(fn, x, weights[layout], iters=iters, min_sample_ms=5.0) * 1e3 / layers
    row[f"{layout}_TBps"] = w[0].nbytes / (row[f"{layout}_us"] * 1e-6) / 1e12
  return row


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", type=ints, default=[1, 2, 8], help="M: rows per GEMV (comma list)")
  ap.add_argument("--layers", type=int, default=24, help="distinct weights per timed program")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny shapes, fp32")
  ap.add_argument("--out_dir", default=None, help="results folder (default $OUT or benchmarks/results)")
  args = ap.parse_args(argv)
  shapes, dtype = (SHAPES_TINY, jnp.float32) if args.tiny else (SHAPES_1_4B, jnp.bfloat16)
  layers = 2 if args.tiny else args.layers
  bandwidth = copy_bandwidth()
  records = []
  for d, n in shapes:
    for m in args.rows:
      row = time_shape(d, n, m, layers, dtype, 3 if args.tiny else args.iters)
      row.update(op="gemv", copy_TBps=bandwidth / 1e12, device=device_name())
      records.append(row)
      print(f"D {d:5d} N {n:5d} M {m:2d}  in_out {row['in_out_us']:7.1f} us ({row['in_out_TBps']:.2f} TB/s)  "
            f"out_in {row['out_in_us']:7.1f} us ({row['out_in_TBps']:.2f} TB/s)", flush=True)
  print("->", write_results(records, "gemv_tiny" if args.tiny else "gemv", args.out_dir))


if __name__ == "__main__":
  main()
