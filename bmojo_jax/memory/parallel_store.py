"""The store as it stands at the start of every chunk, for the parallel pass: `stores_before_chunks`, and the
chunk-by-chunk `merge` it reproduces entry for entry (`stores_before_chunks_reference`, as decoding builds it)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmojo_jax.config import StorePolicy
from bmojo_jax.memory.store import NO_POS, Store, best_first, empty_store, merge, sort_order


def stores_before_chunks_reference(selected: Store, size: int, policy: StorePolicy,
                                   starts: jax.Array | None = None, initial: Store | None = None) -> Store:
  """The store as it stands at the start of each chunk, Store [B, C, M_e, …], by `merge`-ing one chunk's
  selections [B, C, k_e, …] after another (a `lax.scan` over the C chunks, as decoding builds it). starts
  [B, C] bool: the store is emptied before chunk c (a packed row's document starts; None: none but chunk 0's
  own start). initial [B, M_e, …]: the store before chunk 0 (a sequence continued mid-way; None: empty)."""
  b, n_chunks, _, kh, p = selected.k.shape
  empty = empty_store(b, size, kh, p, selected.k.dtype)
  starts = jnp.zeros((b, n_chunks), bool) if starts is None else starts

  def step(store, xs):
    sel, start = xs
    old = jax.tree.map(lambda e, x: jnp.where(start.reshape((b,) + (1,) * (x.ndim - 1)), e, x), empty, store)
    return merge(old, sel, policy), old

  by_chunk = lambda x: jnp.moveaxis(x, 1, 0)
  _, before = jax.lax.scan(step, empty if initial is None else initial,
                           (jax.tree.map(by_chunk, selected), by_chunk(starts)))
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), before)


class _Slots(NamedTuple):
  """A store's entries without their keys and values: src [..., n] indexes the selections [B, C·k_e]."""
  score: jax.Array
  pos: jax.Array
  src: jax.Array

  valid = Store.valid                   # pos != NO_POS


def _empty_slots(shape: tuple[int, ...]) -> _Slots:
  return _Slots(jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, NO_POS, jnp.int32),
                jnp.zeros(shape, jnp.int32))


def _take_slots(slots: _Slots, order: jax.Array) -> _Slots:
  return _Slots(*(jnp.take_along_axis(x, order, -1) for x in slots))


def _best_slots(slots: _Slots, size: int) -> _Slots:
  """The `size` best entries of slot lists [..., n] in the score policy's order (`best_first`)."""
  return _take_slots(slots, sort_order(best_first(slots))[..., :size])


def stores_before_chunks(selected: Store, size: int, policy: StorePolicy, starts: jax.Array | None = None,
                         initial: Store | None = None) -> Store:
  """`stores_before_chunks_reference`, entry for entry, without a sequential loop over the chunks.

  The store before chunk c depends only on the selections of the chunks before it (back to the last start):
  FIFO keeps those of the last M_e / k_e chunks, a gather; the score policy keeps the M_e best of all of
  them, and "the M_e best of a union" is associative, so an `associative_scan` over the chunks (a segmented
  one: a start discards what came before) takes log2(C) steps. Both run on slots (score, position and the
  index of the selection), and the keys and values [B, C, M_e, K, P] are gathered once at the end.
  selected [B, C, k_e, …] (`select_per_chunk`); starts [B, C] bool or None (chunk 0 only); initial [B, M_e, …]
  the store before chunk 0 or None (empty): it enters as chunks of its own before chunk 0 (FIFO: M_e / k_e of
  k_e entries in its order, as `merge` appended them; score: one of M_e), left out of the result.
  """
  b, n_chunks, k_e = selected.score.shape
  src = jnp.broadcast_to(jnp.arange(n_chunks * k_e, dtype=jnp.int32).reshape(1, n_chunks, k_e), selected.pos.shape)
  slots = _Slots(selected.score, selected.pos, src)
  keys, values = (x.reshape(b, n_chunks * k_e, *x.shape[3:]) for x in (selected.k, selected.v))
  fifo = policy == StorePolicy.FIFO
  if fifo:
    slots = _take_slots(slots, sort_order((slots.pos,)))                        # as `by_position` sorts
  else:                                                                         # each chunk's list of M_e
    slots = _best_slots(_Slots(*(jnp.concatenate([x, e], -1) for x, e in
                                 zip(slots, _empty_slots((b, n_chunks, size - k_e))))), size)
  starts = jnp.zeros((b, n_chunks), bool) if starts is None else starts
  n_pre = 0
  if initial is not None:                   # the initial store as chunks before chunk 0
    group = k_e if fifo else size
    n_pre = size // group
    pre_src = jnp.broadcast_to(n_chunks * k_e + jnp.arange(size, dtype=jnp.int32), initial.pos.shape)
    pre = _Slots(initial.score, initial.pos, pre_src)
    slots = _Slots(*(jnp.concatenate([x.reshape(b, n_pre, group), y], 1) for x, y in zip(pre, slots)))
    keys, values = (jnp.concatenate([x, y.astype(x.dtype)], 1) for x, y in ((keys, initial.k), (values, initial.v)))
    starts = jnp.concatenate([jnp.zeros((b, n_pre), bool), starts], 1)
  starts = starts.at[:, 0].set(True)
  n_all = n_pre + n_chunks
  if fifo:
    n = size // k_e                                                             # chunks a FIFO store spans
    chunk_ids = jnp.arange(n_all)[:, None] + jnp.arange(n)[None, :] - n         # [C, n]: chunks c-n .. c-1
    last_start = jax.lax.cummax(jnp.where(starts, jnp.arange(n_all), 0), axis=1)            # [B, C]
    keep = chunk_ids[None] >= last_start[:, :, None]                            # [B, C, n]; chunk ids < 0 too
    empty = _empty_slots((b, n_all, n, k_e))
    before = _Slots(*(jnp.where(keep[..., None], x[:, jnp.maximum(chunk_ids, 0)], e).reshape(b, n_all, size)
                      for x, e in zip(slots, empty)))
  else:
    def combine(x, y):                       # (start, slots [..., M_e]): y after x
      merged = _best_slots(_Slots(*(jnp.concatenate([u, w], -1) for u, w in zip(x[1], y[1]))), size)
      return x[0] | y[0], _Slots(*(jnp.where(y[0][..., None], w, m) for w, m in zip(y[1], merged)))

    _, after = jax.lax.associative_scan(combine, (starts, slots), axis=1)      # the store after chunk c
    empty = _empty_slots((b, n_all, size))
    before = _Slots(*(jnp.where(starts[..., None], e, jnp.concatenate([e[:, :1], x[:, :-1]], 1))
                      for x, e in zip(after, empty)))
  before = _Slots(*(x[:, n_pre:] for x in before))
  idx = before.src.reshape(b, n_chunks * size, 1, 1)
  take = lambda x: jnp.where(before.valid[..., None, None], jnp.take_along_axis(x, idx, axis=1).reshape(
      b, n_chunks, size, *x.shape[2:]), 0)
  return Store(k=take(keys), v=take(values), score=before.score, pos=before.pos)
