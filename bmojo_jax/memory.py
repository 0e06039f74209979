"""Memory tokens: innovation scores, per-chunk selection, the eidetic store and the fading tokens.

Innovation (docs/spec.md): on the attention input a_t [B, T, D],
    â_t = (1/4) Σ_{j=1..4} a_{t-j}       (a_{<0} = 0),      e_t = ‖a_t − â_t‖²   (fp32, no gradient).
At the end of each chunk the k_e positions with the largest e_t (ties: earliest) are selected; their keys
(without RoPE) and values enter the store, which holds M_e entries under the FIFO or score policy.

A `Store` is a set of entries ordered canonically (FIFO: chronological; score: best first, ties earliest), so
the parallel pass and token-by-token decoding build bit-identical stores through the same `merge`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmojo_jax.config import StorePolicy

PREDICTOR_TAPS = 4
NO_POS = jnp.iinfo(jnp.int32).max  # position of an empty slot: sorts after every real token


class Store(NamedTuple):
  """M entries of memory. k, v [B, M, K, P]; score [B, M] fp32 (-inf empty); pos, valid [B, M]."""
  k: jax.Array
  v: jax.Array
  score: jax.Array
  pos: jax.Array
  valid: jax.Array


def empty_store(batch: int, size: int, kv_heads: int, head_dim: int, dtype) -> Store:
  return Store(k=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
               v=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
               score=jnp.full((batch, size), -jnp.inf, jnp.float32),
               pos=jnp.full((batch, size), NO_POS, jnp.int32),
               valid=jnp.zeros((batch, size), bool))


def innovation_scores(a: jax.Array, history: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """e [B, T] fp32 (no gradient) and the new history (the last 4 inputs, [B, 4, D] fp32).

  a [B, T, D]; history [B, 4, D] holds a_{-4..-1} (zeros at the sequence start).
  """
  a = jax.lax.stop_gradient(a).astype(jnp.float32)
  b, t, d = a.shape
  if history is None:
    history = jnp.zeros((b, PREDICTOR_TAPS, d), jnp.float32)
  full = jnp.concatenate([history, a], axis=1)                                   # [B, 4+T, D]
  pred = sum(full[:, PREDICTOR_TAPS - j:PREDICTOR_TAPS - j + t] for j in range(1, PREDICTOR_TAPS + 1))
  err = a - pred / PREDICTOR_TAPS
  return jnp.sum(err * err, axis=-1), full[:, -PREDICTOR_TAPS:]


def _sort_entries(store: Store, keys: tuple[jax.Array, ...]) -> Store:
  """Sort the entries of every row lexicographically by `keys` ([B, M] each)."""
  order = jnp.lexsort(tuple(reversed(keys)), axis=-1)                             # first key is primary
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  return Store(*(take(x) for x in store))


def by_position(store: Store) -> Store:
  return _sort_entries(store, (store.pos,))


def merge(store: Store, selected: Store, policy: StorePolicy) -> Store:
  """The store after a chunk's selections arrive. store [B, M_e, …], selected [B, k_e, …]."""
  size = store.score.shape[1]
  if policy == StorePolicy.FIFO:
    return jax.tree.map(lambda old, new: jnp.concatenate([old, new], axis=1)[:, -size:],
                        store, by_position(selected))
  both = jax.tree.map(lambda old, new: jnp.concatenate([old, new], axis=1), store, selected)
  return jax.tree.map(lambda x: x[:, :size], _sort_entries(both, (-both.score, both.pos)))


def select_per_chunk(e: jax.Array, k: jax.Array, v: jax.Array, chunk: int, k_e: int) -> Store:
  """Top-k_e positions of each chunk (ties: earliest), sorted by position: a Store [B, C, k_e, …].

  e [B, T]; k, v [B, T, K, P]. A partial last chunk's missing positions are never selected.
  """
  b, t = e.shape
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  scores = jnp.pad(e, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(b, n_chunks, chunk)
  top, idx = jax.lax.top_k(scores, k_e)                                          # ties: lower index first
  order = jnp.argsort(idx, axis=-1)
  top, idx = jnp.take_along_axis(top, order, -1), jnp.take_along_axis(idx, order, -1)
  valid = top > -jnp.inf
  pos = jnp.arange(n_chunks, dtype=jnp.int32)[None, :, None] * chunk + idx       # [B, C, k_e]
  flat = jnp.minimum(pos, t - 1).reshape(b, n_chunks * k_e)
  gather = lambda x: jnp.where(valid[..., None, None],
                               jnp.take_along_axis(x, flat[:, :, None, None], axis=1).reshape(
                                   b, n_chunks, k_e, *x.shape[2:]), 0)
  return Store(k=gather(k), v=gather(v), score=top, pos=jnp.where(valid, pos, NO_POS), valid=valid)


def stores_before_chunks(selected: Store, size: int, policy: StorePolicy) -> Store:
  """The store as it stands at the start of each chunk: Store [B, C, M_e, …] (chunk 0: empty)."""
  b, n_chunks, _, kh, p = selected.k.shape

  def step(store, sel):
    return merge(store, sel, policy), store

  init = empty_store(b, size, kh, p, selected.k.dtype)
  _, before = jax.lax.scan(step, init, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), selected))
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), before)


def insert_candidate(cand: Store, score: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array) -> Store:
  """Streaming top-k_e: add token `pos` (score [B], k, v [B, K, P]) to the current chunk's candidates.

  The worst candidate (lowest score, latest among ties) is replaced when the new score is strictly larger,
  which keeps exactly the top-k_e set with ties broken towards earlier tokens.
  """
  worst_score = jnp.min(cand.score, axis=1, keepdims=True)                       # [B, 1]
  at_worst = cand.score == worst_score
  latest = jnp.argmax(jnp.where(at_worst, cand.pos, -1), axis=1)                 # [B]
  replace = (score > worst_score[:, 0])[:, None] & (jnp.arange(cand.score.shape[1]) == latest[:, None])
  put = lambda old, new: jnp.where(replace.reshape(replace.shape + (1,) * (old.ndim - 2)),
                                   new[:, None].astype(old.dtype), old)
  pos_b = jnp.broadcast_to(pos, score.shape).astype(jnp.int32)
  return Store(k=put(cand.k, k), v=put(cand.v, v), score=put(cand.score, score),
               pos=put(cand.pos, pos_b), valid=put(cand.valid, jnp.ones_like(score, bool)))


def fading_per_chunk(fk: jax.Array, fv: jax.Array, chunk: int, n_fading: int):
  """Fading tokens of every chunk: those of chunk c are the last n_fading positions of chunk c-1.

  fk, fv [B, T, K, P] (projections of the mixer output). Returns (k, v [B, C, M_f, K, P], valid [C]).
  """
  b, t = fk.shape[:2]
  n_chunks = -(-t // chunk)

  def per_chunk(x):
    x = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - t), (0, 0), (0, 0)))
    last = x.reshape(b, n_chunks, chunk, *x.shape[2:])[:, :, chunk - n_fading:]   # [B, C, M_f, K, P]
    return jnp.pad(last, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :n_chunks]  # shift by one chunk

  return per_chunk(fk), per_chunk(fv), jnp.arange(n_chunks) > 0
