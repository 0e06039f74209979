"""A decode step's attention: one query per row over the ring cache, the fading tokens and the eidetic store.

`decode_step_attention` is the public entry: it checks the inputs, runs per shard under a context mesh and launches
the Triton kernel (GPU; Pallas' interpreter on CPU); `decode_step_attention_reference` in `reference.py` is the
plain-jnp form (`bmojo_jax.decode_cache.decode_attention` over the step's parts). Files:
  `kernel.py`     the flash-decoding kernel (grid over rows, kv heads and splits of the ring), its `BlockSizes`,
                  and the jnp combine of the splits.
  `reference.py`  the reference and the shape checks.
There is no TPU kernel: `bmojo_jax.kernels.get_decode_attention_fn` takes the reference there.
"""

from __future__ import annotations

import jax

from bmojo_jax.pallas_kernels.backend import resolve_backend
from bmojo_jax.pallas_kernels.decode_attention.kernel import BlockSizes, decode_step_attention_gpu
from bmojo_jax.pallas_kernels.decode_attention.reference import check_shapes, decode_step_attention_reference
from bmojo_jax.pallas_kernels.sharding import per_shard

__all__ = ["BlockSizes", "decode_step_attention", "decode_step_attention_reference"]


def decode_step_attention(q: jax.Array, ring_k: jax.Array, ring_v: jax.Array, t: jax.Array, *, window: int | None,
                          chunk: int | None = None, fading=None, store=None, scale: float | None = None,
                          block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
  """What `decode_step_attention_reference` computes, in one kernel: o [B, H, P] in q.dtype.

  q [B, H, P]; ring_k, ring_v [B, S, K, P] after position t (a scalar) is written, validity derived from t and the
  window inside; fading (k, v [B, M_f, K, P]) visible iff t >= chunk; store (k, v [B, M_e, K, P], pos [B, M_e]
  int32, NO_POS where empty); either may be None. interpret None: Pallas' interpreter on a CPU backend. Under a
  context mesh (`pallas_kernels.sharding`) each device attends for its own rows and kv heads. Forward only
  (decoding).
  """
  check_shapes(q, ring_k, ring_v, t, window, chunk, fading, store)
  backend, interpret = resolve_backend(None, interpret)
  if backend != "gpu":
    raise ValueError(f"decode_step_attention has a GPU (Triton) kernel only, the backend is {backend!r}; use "
                     "decode_step_attention_reference")
  def attend(q, ring_k, ring_v, t, fk, fv, sk, sv, s_pos):
    return decode_step_attention_gpu(q, ring_k, ring_v, t, None if fk is None else (fk, fv),
                                     None if sk is None else (sk, sv, s_pos), window=window, chunk=chunk,
                                     scale=scale, block_sizes=block_sizes, interpret=interpret)

  rows = ("batch", None, "heads", None)
  in_logical = (("batch", "heads", None), rows, rows, None, rows, rows, rows, rows, ("batch", None))
  return per_shard(attend, {"batch": q.shape[0], "heads": ring_k.shape[2]}, in_logical, ("batch", "heads", None))(
      q, ring_k, ring_v, t, *(fading or (None, None)), *(store or (None, None, None)))
