"""Plain-jnp reference of a decode step's attention: one query per row over the ring cache, the fading tokens and
the eidetic store, one softmax.

Shapes (legend in `bmojo_jax/typing.py`): q [B, H, P] (RoPE applied); ring_k, ring_v [B, S, K, P], slot s holding
position t - ((t - s) mod S) once position t is written; fading (k, v) [B, M_f, K, P], visible iff t >= chunk;
store (k, v [B, M_e, K, P], pos [B, M_e] int32: an entry's position, NO_POS where it is empty, as `Store` keeps
them). H = K·G: G query heads share a kv head.

The semantics live in `bmojo_jax.decode_cache` (`ring_valid`, `decode_attention`, which the parallel
continuations use too); this file only names the step's three parts for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bmojo_jax.decode_cache import decode_attention, ring_valid
from bmojo_jax.memory.store import NO_POS


def check_shapes(q, ring_k, ring_v, t, window, chunk, fading, store):
  """Raise a ValueError naming the offending shapes or values."""
  if q.ndim != 3:
    raise ValueError(f"q must be [B, H, P], got {q.shape}")
  b, h, p = q.shape
  if ring_k.ndim != 4 or ring_k.shape != ring_v.shape or ring_k.shape[0] != b or ring_k.shape[3] != p:
    raise ValueError(f"ring_k {ring_k.shape} and ring_v {ring_v.shape} must be [B, S, K, P] matching q {q.shape}")
  kh = ring_k.shape[2]
  if h % kh:
    raise ValueError(f"query heads {h} must be a multiple of kv heads {kh}")
  if jnp.shape(t) != ():
    raise ValueError(f"t must be a scalar position, got shape {jnp.shape(t)}")
  if window is not None and window <= 0:
    raise ValueError(f"window must be positive or None, got {window}")
  mem = {"fading": fading, "store": store}
  for name, part in mem.items():
    if part is None:
      continue
    if len(part) != (2 if name == "fading" else 3):
      raise ValueError(f"{name} must be {'(k, v)' if name == 'fading' else '(k, v, pos)'}, got {len(part)} arrays")
    k, v = part[:2]
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (kh, p):
      raise ValueError(f"{name} k {k.shape} and v {v.shape} must be [B, M, K, P] = [{b}, M, {kh}, {p}]")
  if fading is not None and (chunk is None or chunk <= 0):
    raise ValueError(f"fading tokens need a positive chunk (they are visible from position chunk on), got {chunk}")
  if store is not None and (store[2].shape != store[0].shape[:2] or store[2].dtype != jnp.int32):
    raise ValueError(f"store pos {store[2].shape} {store[2].dtype} must be [B, M_e] = {store[0].shape[:2]} int32")


def decode_step_attention_reference(q: jax.Array, ring_k: jax.Array, ring_v: jax.Array, t: jax.Array, *,
                                    window: int | None, chunk: int | None = None, fading=None, store=None
                                    ) -> jax.Array:
  """o [B, H, P] in q.dtype: q over the ring slots `ring_valid(t, S, window)` names, the fading tokens (fading
  (k, v); visible iff t >= chunk) and the store entries that hold a token (store (k, v, pos), pos != NO_POS);
  fading / store None: absent."""
  check_shapes(q, ring_k, ring_v, t, window, chunk, fading, store)
  parts = [(ring_k, ring_v, ring_valid(t, ring_k.shape[1], window)[None])]
  if fading is not None:
    parts.append((*fading, jnp.broadcast_to(t >= chunk, (1, fading[0].shape[1]))))
  if store is not None:
    parts.append((store[0], store[1], store[2] != NO_POS))
  return decode_attention(q, parts)
