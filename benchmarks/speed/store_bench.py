"""The eidetic store before every chunk: the sequential merge against the parallel form (issue #13).

`bmojo_jax.memory.parallel_store.stores_before_chunks_reference` merges one chunk's selections after another
(a `lax.scan` over the chunks); `stores_before_chunks` computes the same entries with a gather (FIFO) or an
associative scan (score policy). Timed here as in training: selection, store, and the backward pass to the keys
and values.

    python3 -m benchmarks.speed.store_bench                       # T 32768, B 1 (the 32k train-step row)
    python3 -m benchmarks.speed.store_bench --T 2048 --B 8       # -> $OUT (else benchmarks/results)/store_<device>.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_ms, write_results
from bmojo_jax.config import StorePolicy
from bmojo_jax.memory.parallel_store import stores_before_chunks, stores_before_chunks_reference
from bmojo_jax.memory.selection import select_per_chunk

IMPLS = {"sequential": stores_before_chunks_reference, "parallel": stores_before_chunks}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--T", type=int, default=32768)
  ap.add_argument("--B", type=int, default=1)
  ap.add_argument("--chunk", type=int, default=128)
  ap.add_argument("--k-e", type=int, default=16)
  ap.add_argument("--M-e", type=int, default=64)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--iters", type=int, default=10)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  e = jnp.asarray(rng.normal(size=(args.B, args.T)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(args.B, args.T, args.kv_heads, args.head_dim)), jnp.bfloat16)
  v = 2 * k
  records = []
  for policy in StorePolicy:
    for name, stores in IMPLS.items():
      def loss(k, v, stores=stores, policy=policy):
        st = stores(select_per_chunk(e, k, v, args.chunk, args.k_e), args.M_e, policy)
        return jnp.sum(st.k.astype(jnp.float32) * st.v.astype(jnp.float32))
      step = jax.jit(jax.grad(loss, argnums=(0, 1)))
      ms = median_ms(step, k, v, warmup=2, iters=args.iters)
      records.append({"op": "eidetic_store_fwd_bwd", "impl": name, "policy": policy.value, "B": args.B, "T": args.T,
                      "chunk": args.chunk, "k_e": args.k_e, "M_e": args.M_e, "K": args.kv_heads,
                      "P": args.head_dim, "dtype": "bfloat16", "ms": ms})
      print(f"{policy.value:6s} {name:10s} {ms:8.2f} ms", flush=True)
  print("->", write_results(records, "store"))


if __name__ == "__main__":
  main()
