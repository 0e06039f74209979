"""Plain-jnp reference of a decode token's cache update: its key and value into the ring, its selection candidate
into the chunk's candidate store.

Shapes (legend in `bmojo_jax/typing.py`): ring_k, ring_v [B, S, K, P], slot s holding position t - ((t - s) mod S);
cand a `Store` [B, k_e, …] (k, v [B, k_e, K, P], score [B, k_e] fp32, pos [B, k_e] int32, valid [B, k_e] bool);
k (RoPE applied), v, k_raw (without RoPE) [B, K, P]; score [B] fp32; t a scalar int32, the token's position.

The semantics are those of the jnp decode step (`bmojo_jax.attention.Attention._token_step`): two dynamic_update_slices
into slot t mod S and `bmojo_jax.memory.selection.insert_candidate`; this file only names them together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bmojo_jax.memory.selection import insert_candidate
from bmojo_jax.memory.store import Store


def check_shapes(ring_k, ring_v, cand, k, v, k_raw, score, t):
  """Raise a ValueError naming the offending argument and its shape."""
  if ring_k.ndim != 4 or ring_v.shape != ring_k.shape:
    raise ValueError(f"ring_k {ring_k.shape} and ring_v {ring_v.shape} must be [B, S, K, P], the same shape")
  b, _, kh, p = ring_k.shape
  for name, x in (("k", k), ("v", v)):
    if x.shape != (b, kh, p):
      raise ValueError(f"{name} {x.shape} must be [B, K, P] = {(b, kh, p)} (ring_k {ring_k.shape})")
  if jnp.shape(t) != ():
    raise ValueError(f"t must be a scalar position, got shape {jnp.shape(t)}")
  if cand is None:
    if k_raw is not None or score is not None:
      raise ValueError("k_raw and score come with a candidate store: cand is None")
    return
  if not isinstance(cand, Store):
    raise ValueError(f"cand must be a Store (k, v, score, pos, valid), got {type(cand).__name__}")
  if cand.k.ndim != 4 or cand.k.shape[0] != b or cand.k.shape[2:] != (kh, p) or cand.v.shape != cand.k.shape:
    raise ValueError(f"cand.k {cand.k.shape} and cand.v {cand.v.shape} must be [B, k_e, K, P] = [{b}, k_e, {kh}, {p}]")
  k_e = cand.k.shape[1]
  if k_e == 0:
    raise ValueError("cand holds no slots (k_e = 0): pass cand=None for a ring-only update")
  for name in ("score", "pos", "valid"):
    if getattr(cand, name).shape != (b, k_e):
      raise ValueError(f"cand.{name} {getattr(cand, name).shape} must be [B, k_e] = {(b, k_e)}")
  if k_raw is None or k_raw.shape != (b, kh, p):
    raise ValueError(f"k_raw {None if k_raw is None else k_raw.shape} must be [B, K, P] = {(b, kh, p)}")
  if score is None or score.shape != (b,):
    raise ValueError(f"score {None if score is None else score.shape} must be [B] = {(b,)}")


def decode_token_update_reference(ring_k: jax.Array, ring_v: jax.Array, cand: Store | None, k: jax.Array,
                                  v: jax.Array, k_raw: jax.Array | None, score: jax.Array | None, t: jax.Array
                                  ) -> tuple[jax.Array, jax.Array, Store | None]:
  """(ring_k, ring_v, cand) after the token at position t: k, v in ring slot t mod S (cast to the ring's dtype);
  (score, k_raw, v, pos t) offered to the candidates by `insert_candidate` (cand None: no candidates, k_raw and
  score None too)."""
  check_shapes(ring_k, ring_v, cand, k, v, k_raw, score, t)
  slot = t % ring_k.shape[1]
  ring_k = jax.lax.dynamic_update_slice_in_dim(ring_k, k[:, None].astype(ring_k.dtype), slot, axis=1)
  ring_v = jax.lax.dynamic_update_slice_in_dim(ring_v, v[:, None].astype(ring_v.dtype), slot, axis=1)
  if cand is not None:
    cand = insert_candidate(cand, score, k_raw, v, t)
  return ring_k, ring_v, cand
