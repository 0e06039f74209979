"""The eidetic store: M_e memory entries and how a chunk's selections enter it (`merge`).

A `Store` is a set of entries ordered canonically (FIFO: chronological; score: best first, ties earliest), so
the parallel pass (`bmojo_jax.memory.parallel_store`) and token-by-token decoding build bit-identical stores
through the same `merge`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmojo_jax.config import StorePolicy

NO_POS = jnp.iinfo(jnp.int32).max  # position of an empty slot: sorts after every real token


class Store(NamedTuple):
  """M entries of memory. k, v [B, M, K, P]; score [B, M] fp32 (-inf empty); pos [B, M] int32 (NO_POS empty)."""
  k: jax.Array
  v: jax.Array
  score: jax.Array
  pos: jax.Array

  @property
  def valid(self) -> jax.Array:
    """[B, M] bool: the entries that hold a token. Derived, not stored: an empty entry's position is NO_POS, so a
    decode step that fills one writes its position only (the kernels read pos and compare it)."""
    return self.pos != NO_POS


def empty_store(batch: int, size: int, kv_heads: int, head_dim: int, dtype) -> Store:
  return Store(k=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
               v=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
               score=jnp.full((batch, size), -jnp.inf, jnp.float32),
               pos=jnp.full((batch, size), NO_POS, jnp.int32))


def sort_order(keys: tuple[jax.Array, ...]) -> jax.Array:
  """[B, M] indices sorting every row lexicographically by `keys` ([B, M] each; the first is primary)."""
  return jnp.lexsort(tuple(reversed(keys)), axis=-1)


def best_first(entries) -> tuple[jax.Array, jax.Array]:
  """The score policy's order of entries with a score and a pos ([..., M] each): highest score first, ties to
  the earliest position."""
  return -entries.score, entries.pos


def _sort_entries(store: Store, keys: tuple[jax.Array, ...]) -> Store:
  """Sort the entries of every row lexicographically by `keys` ([B, M] each)."""
  order = sort_order(keys)
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
  return best_entries(jax.tree.map(lambda old, new: jnp.concatenate([old, new], axis=1), store, selected), size)


def best_entries(entries: Store, n: int) -> Store:
  """The n best entries of entries [B, M, …] (n <= M) in the score policy's order (`best_first`)."""
  return jax.tree.map(lambda x: x[:, :n], _sort_entries(entries, best_first(entries)))


def kept_by_merge(union: Store, n_new: int, policy: StorePolicy) -> jax.Array:
  """[..., M_e + k_e] bool: which entries of union = (store [M_e], then selections [k_e]) `merge` keeps."""
  n = union.score.shape[-1]
  if policy == StorePolicy.FIFO:
    return jnp.broadcast_to(jnp.arange(n) >= n_new, union.score.shape)
  rank = jnp.argsort(sort_order(best_first(union)), axis=-1)                       # merge's order
  return rank < n - n_new
