"""A decode token's cache update: its key and value into the ring, its selection candidate into the chunk's store,
its fading read-out into the buffer of the next fading tokens' read-outs and its attention input into the
innovation test's history (each buffer shifted one row, the new row last).

`decode_token_update` is the public entry: it checks the inputs, runs per shard under a context mesh and launches
the Triton kernel (GPU; Pallas' interpreter on CPU); `decode_token_update_reference` in `reference.py` is the
plain-jnp form (two dynamic_update_slices, `bmojo_jax.memory.selection.insert_candidate`, a concatenate per
buffer and `bmojo_jax.memory.scoring.last_inputs`). Files:
  `kernel.py`     the kernel (a row's features split over programs, the arrays updated in place), its `BlockSizes`.
  `reference.py`  the reference and the shape checks.
There is no TPU kernel: `bmojo_jax.kernels.get_decode_update_fn` takes the reference there.
"""

from __future__ import annotations

import jax

from bmojo_jax.memory.store import Store
from bmojo_jax.pallas_kernels.backend import resolve_backend
from bmojo_jax.pallas_kernels.decode_update.kernel import BlockSizes, decode_token_update_gpu
from bmojo_jax.pallas_kernels.decode_update.reference import (Fading, as_fading, check_shapes,
                                                              decode_token_update_reference)
from bmojo_jax.pallas_kernels.sharding import per_shard

__all__ = ["BlockSizes", "Fading", "decode_token_update", "decode_token_update_reference"]


def decode_token_update(ring_k: jax.Array, ring_v: jax.Array, cand: Store | None, k: jax.Array, v: jax.Array,
                        k_raw: jax.Array | None, score: jax.Array | None, t: jax.Array,
                        fading: Fading | tuple | None = None, history: tuple | None = None, *,
                        block_sizes: BlockSizes | None = None, interpret: bool | None = None
                        ) -> tuple[jax.Array, jax.Array, Store | None, jax.Array | None, jax.Array | None]:
  """What `decode_token_update_reference` computes, in one kernel that updates the arrays in place.

  ring_k, ring_v [B, S, K, P]; cand a `Store` [B, k_e, …] or None (then k_raw and score None: a ring-only
  update); k, v, k_raw [B, K, P]; score [B] fp32; t a scalar int32 >= 0; fading (next [B, M_f, D], read_out
  [B, D]) or None; history (history [B, 4, D] fp32, a [B, D]) or None. Returns (ring_k, ring_v, cand, next or
  None, history or None). interpret None: Pallas' interpreter on a CPU backend. Under a context mesh
  (`pallas_kernels.sharding`) each device updates its own rows and kv heads (the fading buffer and the history,
  whole on every device of a row's shard, the same in each).
  """
  check_shapes(ring_k, ring_v, cand, k, v, k_raw, score, t, fading, history)
  fading = as_fading(fading)
  backend, interpret = resolve_backend(None, interpret)
  if backend != "gpu":
    raise ValueError(f"decode_token_update has a GPU (Triton) kernel only, the backend is {backend!r}; use "
                     "decode_token_update_reference")

  def update(ring_k, ring_v, ck, cv, cs, cp, k, v, k_raw, score, t, next_fading, read_out, history, a):
    cand = None if ck is None else Store(ck, cv, cs, cp)
    ring_k, ring_v, cand, next_fading, history = decode_token_update_gpu(
        ring_k, ring_v, cand, k, v, k_raw, score, t, None if next_fading is None else Fading(next_fading, read_out),
        None if history is None else (history, a), block_sizes=block_sizes, interpret=interpret)
    return ((ring_k, ring_v) + (() if cand is None else tuple(cand)) + (() if next_fading is None else (next_fading,))
            + (() if history is None else (history,)))

  rows, heads, entries = ("batch", None, "heads", None), ("batch", "heads", None), ("batch", None)
  cand_logical = (rows, rows, entries, entries)
  whole, whole_row = ("batch", None, None), ("batch", None)                       # [B, M, D], [B, D]: every shard
  in_logical = (rows, rows, *cand_logical, heads, heads, heads, ("batch",), None, whole, whole_row, whole, whole_row)
  out_logical = ((rows, rows) + (() if cand is None else cand_logical) + (() if fading is None else (whole,))
                 + (() if history is None else (whole,)))
  out = per_shard(update, {"batch": ring_k.shape[0], "heads": ring_k.shape[2]}, in_logical, out_logical)(
      ring_k, ring_v, *(cand or (None,) * 4), k, v, k_raw, score, t, *(fading or (None,) * 2),
      *(history or (None, None)))
  out = iter(out)
  take = lambda n: tuple(next(out) for _ in range(n))
  ring_k, ring_v = take(2)
  cand = None if cand is None else Store(*take(4))
  fading = None if fading is None else take(1)[0]
  history = None if history is None else take(1)[0]
  return ring_k, ring_v, cand, fading, history
