"""A chunk's selections: the k_e tokens with the largest scores (`bmojo_jax.memory.scoring`; ties: earliest),
taken all at once for every chunk (`select_per_chunk`, the parallel pass) or one token at a time
(`insert_candidate`, decoding). Both give the same entries (tests/test_memory.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bmojo_jax.memory.store import NO_POS, Store
from bmojo_jax.pallas_kernels.sharding import per_shard


def top_k_per_row(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis of x [B, …, n], run on each device's rows under a mesh (XLA's partitioner
  would gather every row onto every device first)."""
  rows = ("batch",) + (None,) * (x.ndim - 1)
  return per_shard(lambda y: tuple(jax.lax.top_k(y, k)), {"batch": x.shape[0]}, (rows,), (rows, rows))(x)


def select_per_chunk(e: jax.Array, k: jax.Array, v: jax.Array, chunk: int, k_e: int) -> Store:
  """Top-k_e positions of each chunk (ties: earliest), sorted by position: a Store [B, C, k_e, …].

  e [B, T]; k, v [B, T, K, P]. A partial last chunk's missing positions are never selected.
  """
  b, t = e.shape
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  scores = jnp.pad(e, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(b, n_chunks, chunk)
  top, idx = top_k_per_row(scores, k_e)                                          # ties: lower index first
  order = jnp.argsort(idx, axis=-1)
  top, idx = jnp.take_along_axis(top, order, -1), jnp.take_along_axis(idx, order, -1)
  valid = top > -jnp.inf
  pos = jnp.arange(n_chunks, dtype=jnp.int32)[None, :, None] * chunk + idx       # [B, C, k_e]
  flat = jnp.minimum(pos, t - 1).reshape(b, n_chunks * k_e)
  gather = lambda x: jnp.where(valid[..., None, None],
                               jnp.take_along_axis(x, flat[:, :, None, None], axis=1).reshape(
                                   b, n_chunks, k_e, *x.shape[2:]), 0)
  return Store(k=gather(k), v=gather(v), score=top, pos=jnp.where(valid, pos, NO_POS))


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
  return Store(k=put(cand.k, k), v=put(cand.v, v), score=put(cand.score, score), pos=put(cand.pos, pos_b))
