"""A decode step's attention on a GPU: the Pallas kernel (pallas_kernels/decode_attention), its products as
tensor-core dots ("pallas", the default `BlockSizes`) and as multiplies and sums ("pallas_sum", `BlockSizes.dot`
False), against the jnp reference.

  python3 -m benchmarks.speed.decode_attention_bench   # -> benchmarks/results/decode_attention_<device>.json
  python3 -m benchmarks.speed.decode_attention_bench --tiny   # CPU smoke

Shapes (bf16, H = K = 32, P = 64): the 1.4B B'MOJO's sublayer (ring 512, window 512, M_f 16, M_e 64, 90% of the
store filled) at batch 1, 8 and 64, and the Transformer's ring alone (no window, the ring full) at batch 1 for
S = 1024, 4096, 8192 and 32768: where the kernel stops paying (`bmojo_jax.kernels.DECODE_KERNEL_MAX_RING_BYTES`).
Each timing is one jitted program over 24 layers' distinct caches, unrolled as a decode step runs its layers (L2
holds none between layers, and one dispatch covers 24 calls), median of 20 samples (`common.median_ms`), reported
per layer in us beside the bytes a layer reads (K and V of the ring and memory) and what that is per second.
Correctness: the largest difference of each implementation's output (layer 0) from the fp32 reference of the same
bf16 inputs.
Writes decode_attention_<device>.json (one record per shape and implementation; a failed compile or run is a record
with "error") to --out, rewritten after each shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from bmojo_jax.memory.store import NO_POS
from bmojo_jax.pallas_kernels.decode_attention import decode_step_attention, decode_step_attention_reference
from bmojo_jax.pallas_kernels.decode_attention.kernel import BlockSizes, Layout, next_pow2


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  b: int
  s: int
  window: int | None
  m_f: int = 0
  m_e: int = 0
  h: int = 32
  k: int = 32
  p: int = 64
  chunk: int = 512

  def position(self) -> int:
    """The query's position: the ring full (the Transformer's last context token), or wrapped a few times."""
    return self.s - 1 if self.window is None else 4 * self.s + 7

  def bytes_read(self, itemsize: int = 2) -> int:
    """K and V of the ring and the memory tokens, and q, per layer."""
    kv = 2 * self.b * self.k * self.p * (self.s + self.m_f + self.m_e)
    return itemsize * (kv + self.b * self.h * self.p)


SHAPES = [Shape("bmojo_1.4b_b1", 1, 512, 512, 16, 64), Shape("bmojo_1.4b_b8", 8, 512, 512, 16, 64),
          Shape("bmojo_1.4b_b64", 64, 512, 512, 16, 64), Shape("transformer_1.4b_s1024", 1, 1024, None),
          Shape("transformer_1.4b_s4096", 1, 4096, None), Shape("transformer_1.4b_s8192", 1, 8192, None),
          Shape("transformer_1.4b_s32768", 1, 32768, None)]
TINY = [Shape("tiny_bmojo", 2, 12, 8, 3, 5, h=4, k=2, p=8, chunk=4), Shape("tiny_transformer", 1, 20, None, h=2, k=2,
                                                                          p=8)]


def make_inputs(shape: Shape, layers: int, seed: int = 0):
  """Per-layer inputs on the device: q [L, B, H, P], ring k, v [L, B, S, K, P], fading (k, v) [L, B, M_f, K, P],
  store (k, v [L, B, M_e, K, P] bf16, pos [L, B, M_e] int32: NO_POS where empty) (None where absent)."""
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  rows = lambda n: jax.random.normal(next(keys), (layers, shape.b, n, shape.k, shape.p), jnp.bfloat16)
  q = jax.random.normal(next(keys), (layers, shape.b, shape.h, shape.p), jnp.bfloat16)
  fading = (rows(shape.m_f), rows(shape.m_f)) if shape.m_f else None
  store = None
  if shape.m_e:
    filled = jax.random.uniform(next(keys), (layers, shape.b, shape.m_e)) < 0.9
    store = (rows(shape.m_e), rows(shape.m_e), jnp.where(filled, jnp.arange(shape.m_e, dtype=jnp.int32), NO_POS))
  return q, rows(shape.s), rows(shape.s), fading, store


def per_layer(inputs, layers: int) -> list:
  """The stacked inputs as a list of each layer's own arrays (made once, outside the timed program)."""
  return [jax.tree.map(lambda x: x[i], inputs) for i in range(layers)]


def layer_loop(attend, shape: Shape):
  """jit(fn([(q, ring_k, ring_v, fading, store)] per layer) -> o [L, B, H, P]): attend over each layer's own
  inputs, unrolled as a decode step does. A lax.scan over stacked inputs would hand the kernel (a custom call) a
  sliced copy of every layer's cache, which XLA's own fusions read in place: the kernel would pay for a copy."""
  t = jnp.int32(shape.position())

  def run(layers):
    return jnp.stack([attend(q, rk, rv, t, window=shape.window, chunk=shape.chunk, fading=fading, store=store)
                      for q, rk, rv, fading, store in layers])
  return jax.jit(run)


def run_shape(shape: Shape, layers: int, interpret: bool, iters: int) -> list[dict]:
  layers_in = per_layer(make_inputs(shape, layers), layers)     # the stacked arrays are freed on return
  blocks = {"pallas": BlockSizes(), "pallas_sum": BlockSizes(dot=False)}
  impls = {name: functools.partial(decode_step_attention, block_sizes=b, interpret=interpret)
           for name, b in blocks.items()}
  impls["reference"] = decode_step_attention_reference
  up = lambda x: jax.tree.map(lambda y: y.astype(jnp.float32) if y.dtype == jnp.bfloat16 else y, x)
  exact = np.asarray(layer_loop(decode_step_attention_reference, shape)(up(layers_in[:1])))
  records = []
  for name, attend in impls.items():
    rec = {"op": "decode_attention", "shape": shape.name, "impl": name, "batch": shape.b, "S": shape.s,
           "window": shape.window, "M_f": shape.m_f, "M_e": shape.m_e, "H": shape.h, "K": shape.k, "P": shape.p,
           "t": shape.position(), "layers": layers, "bytes_per_layer": shape.bytes_read()}
    if name in blocks:
      rec["layout"] = dataclasses.asdict(Layout.of(blocks[name], shape.b, shape.k, shape.s,
                                                   next_pow2(shape.h // shape.k), shape.p, interpret=interpret))
    try:
      rec["max_err_vs_fp32"] = float(np.abs(np.asarray(layer_loop(attend, shape)(layers_in[:1]), np.float32)
                                            - exact).max())
      ms = common.median_ms(layer_loop(attend, shape), layers_in, warmup=2, iters=iters, inner=2,
                            min_sample_ms=0.0 if interpret else 10.0)
      us = ms * 1e3 / layers
      rec.update(us_per_layer=round(us, 3), GBps=round(shape.bytes_read() / (us * 1e3), 1))
    except Exception as e:  # noqa: BLE001 -- record and go on: one failing compile must not lose the other rows
      rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    print(rec, flush=True)
    records.append(rec)
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None, help="folder of the json (default $OUT, else benchmarks/results)")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes in interpret mode: a CPU smoke run")
  parser.add_argument("--layers", type=int, default=None, help="distinct caches per timed call (default 24; tiny 2)")
  args = parser.parse_args(argv)
  layers = args.layers or (2 if args.tiny else 24)
  records = []
  for shape in TINY if args.tiny else SHAPES:
    records += run_shape(shape, layers, interpret=args.tiny, iters=3 if args.tiny else 20)
    path = common.write_results(records, "decode_attention", args.out)     # after each shape: a cut run keeps its rows
  print("wrote", path)
  return records


if __name__ == "__main__":
  main()
