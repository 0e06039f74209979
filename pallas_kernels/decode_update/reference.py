"""Plain-jnp reference of a decode token's cache update: its key and value into the ring, its selection candidate
into the chunk's candidate store, its fading read-out into the buffer of the next fading tokens, its attention input
into the innovation test's history.

Shapes (legend in `bmojo_jax/typing.py`): ring_k, ring_v [B, S, K, P], slot s holding position t - ((t - s) mod S);
cand a `Store` [B, k_e, …] (k, v [B, k_e, K, P], score [B, k_e] fp32, pos [B, k_e] int32, NO_POS where empty);
k (RoPE applied), v, k_raw (without RoPE) [B, K, P]; score [B] fp32; t a scalar int32, the token's position;
fading a `Fading` (next [B, M_f, D], the last M_f read-outs of the mixer, oldest first, projected into fading
tokens only at a chunk boundary; read_out [B, D], the token's); history a pair (history [B, 4, D] fp32, the last
4 attention inputs, oldest first; a [B, D], the token's).

The semantics are those of the jnp decode step (`bmojo_jax.attention.Attention._token_step`): two dynamic_update_slices
into slot t mod S, `bmojo_jax.memory.selection.insert_candidate`, the fading buffer shifted by one row, the
read-out appended (`shift_in`), and `bmojo_jax.memory.scoring.last_inputs`, the same shift of the history; this
file only names them together.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmojo_jax.memory.scoring import PREDICTOR_TAPS, last_inputs
from bmojo_jax.memory.selection import insert_candidate
from bmojo_jax.memory.store import Store


class Fading(NamedTuple):
  """The fading part of a decode token's update: the buffer of the next fading tokens' read-outs and the new one."""
  next: jax.Array               # [B, M_f, D] the last M_f read-outs (before their norm and projection), oldest first
  read_out: jax.Array           # [B, D] the token's


def shift_in(buf: jax.Array, new: jax.Array) -> jax.Array:
  """buf [B, M, ...] without its first row, new [B, ...] (cast to buf's dtype) as its last."""
  return jnp.concatenate([buf[:, 1:], new[:, None].astype(buf.dtype)], axis=1)


def as_fading(fading) -> Fading | None:
  """fading as a `Fading` (any pair next, read_out), or None."""
  if fading is None or isinstance(fading, Fading):
    return fading
  n = len(fading) if isinstance(fading, (tuple, list)) else None
  if n != 2:
    raise ValueError(f"fading must be (next, read_out) or None, got a {type(fading).__name__}"
                     + ("" if n is None else f" of {n}"))
  return Fading(*fading)


def check_fading(fading: Fading, b: int):
  buf, new = fading
  if buf.ndim != 3 or buf.shape[0] != b or buf.shape[1] < 1:
    raise ValueError(f"fading.next {buf.shape} must be [B, M_f, D] = [{b}, M_f >= 1, D]")
  if new.shape != (b, buf.shape[2]):
    raise ValueError(f"fading.read_out {new.shape} must be [B, D] = {(b, buf.shape[2])}")


def check_history(history, b: int):
  n = len(history) if isinstance(history, (tuple, list)) else None
  if n != 2:
    raise ValueError(f"history must be (history, a) or None, got a {type(history).__name__}"
                     + ("" if n is None else f" of {n}"))
  buf, a = history
  if buf.ndim != 3 or buf.shape[:2] != (b, PREDICTOR_TAPS) or buf.dtype != jnp.float32:
    raise ValueError(f"history {buf.shape} {buf.dtype} must be [B, {PREDICTOR_TAPS}, D] = [{b}, {PREDICTOR_TAPS}, D] "
                     "float32")
  if a.shape != (b, buf.shape[2]):
    raise ValueError(f"history's a {a.shape} must be [B, D] = {(b, buf.shape[2])}")


def check_shapes(ring_k, ring_v, cand, k, v, k_raw, score, t, fading=None, history=None):
  """Raise a ValueError naming the offending argument and its shape."""
  if ring_k.ndim != 4 or ring_v.shape != ring_k.shape:
    raise ValueError(f"ring_k {ring_k.shape} and ring_v {ring_v.shape} must be [B, S, K, P], the same shape")
  b, _, kh, p = ring_k.shape
  for name, x in (("k", k), ("v", v)):
    if x.shape != (b, kh, p):
      raise ValueError(f"{name} {x.shape} must be [B, K, P] = {(b, kh, p)} (ring_k {ring_k.shape})")
  if jnp.shape(t) != ():
    raise ValueError(f"t must be a scalar position, got shape {jnp.shape(t)}")
  if fading is not None:
    check_fading(as_fading(fading), b)
  if history is not None:
    check_history(history, b)
  if cand is None:
    if k_raw is not None or score is not None:
      raise ValueError("k_raw and score come with a candidate store: cand is None")
    return
  if not isinstance(cand, Store):
    raise ValueError(f"cand must be a Store (k, v, score, pos), got {type(cand).__name__}")
  if cand.k.ndim != 4 or cand.k.shape[0] != b or cand.k.shape[2:] != (kh, p) or cand.v.shape != cand.k.shape:
    raise ValueError(f"cand.k {cand.k.shape} and cand.v {cand.v.shape} must be [B, k_e, K, P] = [{b}, k_e, {kh}, {p}]")
  k_e = cand.k.shape[1]
  if k_e == 0:
    raise ValueError("cand holds no slots (k_e = 0): pass cand=None for a ring-only update")
  for name in ("score", "pos"):
    if getattr(cand, name).shape != (b, k_e):
      raise ValueError(f"cand.{name} {getattr(cand, name).shape} must be [B, k_e] = {(b, k_e)}")
  if k_raw is None or k_raw.shape != (b, kh, p):
    raise ValueError(f"k_raw {None if k_raw is None else k_raw.shape} must be [B, K, P] = {(b, kh, p)}")
  if score is None or score.shape != (b,):
    raise ValueError(f"score {None if score is None else score.shape} must be [B] = {(b,)}")


def decode_token_update_reference(ring_k: jax.Array, ring_v: jax.Array, cand: Store | None, k: jax.Array,
                                  v: jax.Array, k_raw: jax.Array | None, score: jax.Array | None, t: jax.Array,
                                  fading: Fading | tuple | None = None, history: tuple | None = None
                                  ) -> tuple[jax.Array, jax.Array, Store | None, jax.Array | None, jax.Array | None]:
  """(ring_k, ring_v, cand, next_fading, history) after the token at position t: k, v in ring slot t mod S
  (cast to the ring's dtype); (score, k_raw, v, pos t) offered to the candidates by `insert_candidate` (cand
  None: no candidates, k_raw and score None too); the fading buffer shifted by one row with the read-out last
  (`shift_in`; fading None: no fading tokens, None returned in their place); the history shifted by one row with
  a (fp32) last (`last_inputs`; history None: None returned)."""
  check_shapes(ring_k, ring_v, cand, k, v, k_raw, score, t, fading, history)
  slot = t % ring_k.shape[1]
  ring_k = jax.lax.dynamic_update_slice_in_dim(ring_k, k[:, None].astype(ring_k.dtype), slot, axis=1)
  ring_v = jax.lax.dynamic_update_slice_in_dim(ring_v, v[:, None].astype(ring_v.dtype), slot, axis=1)
  if cand is not None:
    cand = insert_candidate(cand, score, k_raw, v, t)
  fading = as_fading(fading)
  if fading is not None:
    fading = shift_in(fading.next, fading.read_out)
  if history is not None:
    history = last_inputs(history[1][:, None], history[0])
  return ring_k, ring_v, cand, fading, history
