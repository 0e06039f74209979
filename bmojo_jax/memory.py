"""Memory tokens: selection scores, per-chunk selection, the eidetic store and the fading tokens.

Innovation (docs/spec.md): on the attention input a_t [B, T, D],
    â_t = (1/4) Σ_{j=1..4} a_{t-j}       (a_{<0} = 0),      e_t = ‖a_t − â_t‖²   (fp32, no gradient).
At the end of each chunk the k_e positions with the largest e_t (ties: earliest) are selected; their keys
(without RoPE) and values enter the store, which holds M_e entries under the FIFO or score policy.
`cfg.selection` swaps the innovation for another score (`SELECTION_SCORES`, docs/mqar.md "Selection
variants"); the selection and the store are the same for every score.

A `Store` is a set of entries ordered canonically (FIFO: chronological; score: best first, ties earliest), so
the parallel pass and token-by-token decoding build bit-identical stores through the same `merge`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmojo_jax.config import Selection, StorePolicy
from pallas_kernels.sharding import per_shard

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


def innovation_scores(a: jax.Array, history: jax.Array | None = None, reach: jax.Array | None = None
                      ) -> jax.Array:
  """e [B, T] fp32, no gradient.

  a [B, T, D]; history [B, 4, D] holds a_{-4..-1} (zeros at the sequence start; the history after a is
  `last_inputs`); reach [B, T] int or None: how many inputs before t the predictor may read (a packed row: the
  position within the document, so the history restarts at a document's first token); None: all of them.
  """
  a = jax.lax.stop_gradient(a).astype(jnp.float32)
  t = a.shape[1]
  full = _with_history(a, history)                                               # [B, 4+T, D]

  def tap(j):                                                                    # a_{t-j}
    x = full[:, PREDICTOR_TAPS - j:PREDICTOR_TAPS - j + t]
    return x if reach is None else jnp.where((reach >= j)[..., None], x, 0)

  pred = sum(tap(j) for j in range(1, PREDICTOR_TAPS + 1))
  err = a - pred / PREDICTOR_TAPS
  return jnp.sum(err * err, axis=-1)


class ScoreInputs(NamedTuple):
  """What a selection score may read for T consecutive tokens of one attention sublayer.

  a [B, T, D] attention input; k, v [B, T, K, P] its keys (without RoPE) and values; fk, fv [B, T, K, P] the
  key/value projections of the fading source (the normed Mamba output at t, a read-out of the SSM state);
  history [B, 4, D] fp32, a_{-4..-1}; prev_fk, prev_fv [B, 1, K, P] the fading projections at t = -1, or None
  (zeros: the sequence starts here); reach [B, T] int or None, how many tokens before t a score may read (a
  packed row: the position within the document); w_s [D] the learned scorer's weights, or None.
  """
  a: jax.Array
  k: jax.Array
  v: jax.Array
  fk: jax.Array | None = None
  fv: jax.Array | None = None
  history: jax.Array | None = None
  prev_fk: jax.Array | None = None
  prev_fv: jax.Array | None = None
  reach: jax.Array | None = None
  w_s: jax.Array | None = None


def input_norm_scores(a: jax.Array) -> jax.Array:
  """e_t = ‖a_t‖² [B, T] fp32, no gradient. a [B, T, D]."""
  a = jax.lax.stop_gradient(a).astype(jnp.float32)
  return jnp.sum(a * a, axis=-1)


def ssm_error_scores(k: jax.Array, v: jax.Array, fk: jax.Array, fv: jax.Array, prev_fk: jax.Array | None = None,
                     prev_fv: jax.Array | None = None, reach: jax.Array | None = None) -> jax.Array:
  """The SSM's prediction error in the memory's own space, [B, T] fp32 without gradient:
      e_t = ‖k_t − k^f_{t-1}‖² + ‖v_t − v^f_{t-1}‖².

  (k^f, v^f)_{t-1} = (W_k, W_v) s̄_{t-1} is the fading token the SSM state would give at t-1 (s̄ the normed
  Mamba output of the same block, which reads out the state after tokens ≤ t-1): the memory entry that stands
  for the whole past before t. e_t is large when token t's key/value is far from it, i.e. when the fading
  memory would not carry the token, which is what the eidetic store is for. k, v, fk, fv [B, T, K, P];
  prev_fk, prev_fv [B, 1, K, P] the fading projections at t = -1 (None: zeros); reach [B, T] (a packed row: 0
  at a document's first token, whose previous read-out belongs to another document and counts as zero) or None.
  """
  def err(x, f, prev):
    x, f = (jax.lax.stop_gradient(y).astype(jnp.float32) for y in (x, f))
    prev = jnp.zeros_like(f[:, :1]) if prev is None else jax.lax.stop_gradient(prev).astype(jnp.float32)
    before = jnp.concatenate([prev, f[:, :-1]], axis=1)                          # f_{t-1} [B, T, K, P]
    if reach is not None:
      before = jnp.where((reach >= 1)[..., None, None], before, 0)
    return jnp.sum(jnp.square(x - before), axis=(-2, -1))
  return err(k, fk, prev_fk) + err(v, fv, prev_fv)


def learned_scores(a: jax.Array, w_s: jax.Array) -> jax.Array:
  """s_t = a_t · w_s [B, T] fp32, with gradient (to a and w_s). a [B, T, D]; w_s [D]."""
  return jnp.einsum("BTD,D->BT", a.astype(jnp.float32), w_s.astype(jnp.float32))


def straight_through_values(v: jax.Array, score: jax.Array) -> jax.Array:
  """v + v · (σ(s) − sg(σ(s))): v [B, T, K, P] unchanged in the forward pass (the added term is exactly 0), while
  the gradient reaching a selected value v_t also reaches its score s_t [B, T] as ∂L/∂s_t = σ'(s_t) ⟨∂L/∂v_t,
  v_t⟩: "would this memory token's contribution, scaled up, have lowered the loss". Unselected tokens are
  never read, so their scores get no gradient from the loss; the linear scorer generalizes across tokens."""
  gate = jax.nn.sigmoid(score)
  zero = (gate - jax.lax.stop_gradient(gate)).astype(v.dtype)                   # exactly 0, gradient σ'(s)
  return v + v * zero[..., None, None]


# Selection -> fn(ScoreInputs) -> scores [B, T] fp32 (largest first; only `learned`'s carry a gradient).
SELECTION_SCORES = {
    Selection.INNOVATION: lambda x: innovation_scores(x.a, x.history, x.reach),
    Selection.LEARNED: lambda x: learned_scores(x.a, x.w_s),
    Selection.SSM_ERROR: lambda x: ssm_error_scores(x.k, x.v, x.fk, x.fv, x.prev_fk, x.prev_fv, x.reach),
    Selection.INPUT_NORM: lambda x: input_norm_scores(x.a),
}


def selection_scores(selection: Selection, x: ScoreInputs) -> tuple[jax.Array, jax.Array]:
  """(scores [B, T] fp32 without gradient, values [B, T, K, P] to store) of the tokens in x: the values are
  x.v, passed through `straight_through_values` for the learned score so that its scorer trains."""
  scores = SELECTION_SCORES[Selection(selection)](x)
  v = straight_through_values(x.v, scores) if selection == Selection.LEARNED else x.v
  return jax.lax.stop_gradient(scores), v


def _with_history(a: jax.Array, history: jax.Array | None) -> jax.Array:
  """[B, 4+T, D] fp32 without gradient: a_{-4..-1} (history [B, 4, D]; None: zeros), then a [B, T, D]."""
  a = jax.lax.stop_gradient(a).astype(jnp.float32)
  if history is None:
    history = jnp.zeros((a.shape[0], PREDICTOR_TAPS, a.shape[2]), jnp.float32)
  return jnp.concatenate([history, a], axis=1)


def last_inputs(a: jax.Array, history: jax.Array | None = None) -> jax.Array:
  """The innovation predictor's history after a [B, T, D]: a_{T-4..T-1} [B, 4, D] fp32 (earlier from
  `history`, zeros at the sequence start)."""
  return _with_history(a, history)[:, -PREDICTOR_TAPS:]


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis of x [B, …, n], run on each device's rows under a mesh (XLA's partitioner
  would gather every row onto every device first)."""
  rows = ("batch",) + (None,) * (x.ndim - 1)
  return per_shard(lambda y: tuple(jax.lax.top_k(y, k)), {"batch": x.shape[0]}, (rows,), (rows, rows))(x)


def _order(keys: tuple[jax.Array, ...]) -> jax.Array:
  """[B, M] indices sorting every row lexicographically by `keys` ([B, M] each; the first is primary)."""
  return jnp.lexsort(tuple(reversed(keys)), axis=-1)


def _best_first(store: Store) -> tuple[jax.Array, jax.Array]:
  """The score policy's order: highest score first, ties to the earliest position."""
  return -store.score, store.pos


def _sort_entries(store: Store, keys: tuple[jax.Array, ...]) -> Store:
  """Sort the entries of every row lexicographically by `keys` ([B, M] each)."""
  order = _order(keys)
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
  return jax.tree.map(lambda x: x[:, :size], _sort_entries(both, _best_first(both)))


def select_per_chunk(e: jax.Array, k: jax.Array, v: jax.Array, chunk: int, k_e: int) -> Store:
  """Top-k_e positions of each chunk (ties: earliest), sorted by position: a Store [B, C, k_e, …].

  e [B, T]; k, v [B, T, K, P]. A partial last chunk's missing positions are never selected.
  """
  b, t = e.shape
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  scores = jnp.pad(e, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(b, n_chunks, chunk)
  top, idx = _top_k(scores, k_e)                                                 # ties: lower index first
  order = jnp.argsort(idx, axis=-1)
  top, idx = jnp.take_along_axis(top, order, -1), jnp.take_along_axis(idx, order, -1)
  valid = top > -jnp.inf
  pos = jnp.arange(n_chunks, dtype=jnp.int32)[None, :, None] * chunk + idx       # [B, C, k_e]
  flat = jnp.minimum(pos, t - 1).reshape(b, n_chunks * k_e)
  gather = lambda x: jnp.where(valid[..., None, None],
                               jnp.take_along_axis(x, flat[:, :, None, None], axis=1).reshape(
                                   b, n_chunks, k_e, *x.shape[2:]), 0)
  return Store(k=gather(k), v=gather(v), score=top, pos=jnp.where(valid, pos, NO_POS), valid=valid)


def stores_before_chunks_reference(selected: Store, size: int, policy: StorePolicy,
                                   starts: jax.Array | None = None) -> Store:
  """The store as it stands at the start of each chunk, Store [B, C, M_e, …], by `merge`-ing one chunk's
  selections [B, C, k_e, …] after another (a `lax.scan` over the C chunks, as decoding builds it). starts
  [B, C] bool: the store is emptied before chunk c (a packed row's document starts; None: chunk 0 only)."""
  b, n_chunks, _, kh, p = selected.k.shape
  empty = empty_store(b, size, kh, p, selected.k.dtype)
  starts = jnp.zeros((b, n_chunks), bool) if starts is None else starts

  def step(store, xs):
    sel, start = xs
    old = jax.tree.map(lambda e, x: jnp.where(start.reshape((b,) + (1,) * (x.ndim - 1)), e, x), empty, store)
    return merge(old, sel, policy), old

  by_chunk = lambda x: jnp.moveaxis(x, 1, 0)
  _, before = jax.lax.scan(step, empty, (jax.tree.map(by_chunk, selected), by_chunk(starts)))
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), before)


class _Slots(NamedTuple):
  """A store's entries without their keys and values: src [..., n] indexes the selections [B, C·k_e]."""
  score: jax.Array
  pos: jax.Array
  valid: jax.Array
  src: jax.Array


def _empty_slots(shape: tuple[int, ...]) -> _Slots:
  return _Slots(jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, NO_POS, jnp.int32),
                jnp.zeros(shape, bool), jnp.zeros(shape, jnp.int32))


def _take_slots(slots: _Slots, order: jax.Array) -> _Slots:
  return _Slots(*(jnp.take_along_axis(x, order, -1) for x in slots))


def _best_slots(slots: _Slots, size: int) -> _Slots:
  """The `size` best entries of slot lists [..., n] in the score policy's order (`_best_first`)."""
  return _take_slots(slots, _order(_best_first(slots))[..., :size])


def stores_before_chunks(selected: Store, size: int, policy: StorePolicy, starts: jax.Array | None = None
                         ) -> Store:
  """`stores_before_chunks_reference`, entry for entry, without a sequential loop over the chunks.

  The store before chunk c depends only on the selections of the chunks before it (back to the last start):
  FIFO keeps those of the last M_e / k_e chunks, a gather; the score policy keeps the M_e best of all of
  them, and "the M_e best of a union" is associative, so an `associative_scan` over the chunks (a segmented
  one: a start discards what came before) takes log2(C) steps. Both run on slots (score, position, validity
  and the index of the selection), and the keys and values [B, C, M_e, K, P] are gathered once at the end.
  selected [B, C, k_e, …] (`select_per_chunk`); starts [B, C] bool or None (chunk 0 only).
  """
  b, n_chunks, k_e = selected.score.shape
  src = jnp.broadcast_to(jnp.arange(n_chunks * k_e, dtype=jnp.int32).reshape(1, n_chunks, k_e), selected.pos.shape)
  slots = _Slots(selected.score, selected.pos, selected.valid, src)
  starts = (jnp.zeros((b, n_chunks), bool) if starts is None else starts).at[:, 0].set(True)
  if policy == StorePolicy.FIFO:
    n = size // k_e                                                             # chunks a FIFO store spans
    slots = _take_slots(slots, _order((slots.pos,)))                            # as `by_position` sorts
    chunk_ids = jnp.arange(n_chunks)[:, None] + jnp.arange(n)[None, :] - n      # [C, n]: chunks c-n .. c-1
    last_start = jax.lax.cummax(jnp.where(starts, jnp.arange(n_chunks), 0), axis=1)        # [B, C]
    keep = chunk_ids[None] >= last_start[:, :, None]                            # [B, C, n]; chunk ids < 0 too
    empty = _empty_slots((b, n_chunks, n, k_e))
    before = _Slots(*(jnp.where(keep[..., None], x[:, jnp.maximum(chunk_ids, 0)], e).reshape(b, n_chunks, size)
                      for x, e in zip(slots, empty)))
  else:
    lists = _best_slots(_Slots(*(jnp.concatenate([x, e], -1) for x, e in
                                 zip(slots, _empty_slots((b, n_chunks, size - k_e))))), size)

    def combine(x, y):                       # (start, slots [..., M_e]): y after x
      merged = _best_slots(_Slots(*(jnp.concatenate([u, w], -1) for u, w in zip(x[1], y[1]))), size)
      return x[0] | y[0], _Slots(*(jnp.where(y[0][..., None], w, m) for w, m in zip(y[1], merged)))

    _, after = jax.lax.associative_scan(combine, (starts, lists), axis=1)      # the store after chunk c
    empty = _empty_slots((b, n_chunks, size))
    before = _Slots(*(jnp.where(starts[..., None], e, jnp.concatenate([e[:, :1], x[:, :-1]], 1))
                      for x, e in zip(after, empty)))
  idx = before.src.reshape(b, n_chunks * size, 1, 1)
  take = lambda x: jnp.where(before.valid[..., None, None], jnp.take_along_axis(
      x.reshape(b, n_chunks * k_e, *x.shape[3:]), idx, axis=1).reshape(b, n_chunks, size, *x.shape[3:]), 0)
  return Store(k=take(selected.k), v=take(selected.v), score=before.score, pos=before.pos, valid=before.valid)


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


def fading_per_chunk(x: jax.Array, chunk: int, n_fading: int) -> jax.Array:
  """Fading tokens of every chunk: those of chunk c are the last n_fading positions of chunk c-1 (chunk 0's
  are zeros and invalid).

  x [B, T, ...] (the mixer's read-outs, or their projections) -> [B, C, M_f, ...].
  """
  b, t = x.shape[:2]
  n_chunks = -(-t // chunk)
  rest = [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, [(0, 0), (0, n_chunks * chunk - t), *rest])
  last = x.reshape(b, n_chunks, chunk, *x.shape[2:])[:, :, chunk - n_fading:]     # [B, C, M_f, ...]
  return jnp.pad(last, [(0, 0), (1, 0), (0, 0), *rest])[:, :n_chunks]              # shift by one chunk


def _kept_by_merge(union: Store, n_new: int, policy: StorePolicy) -> jax.Array:
  """[..., M_e + k_e] bool: which entries of union = (store [M_e], then selections [k_e]) `merge` keeps."""
  n = union.score.shape[-1]
  if policy == StorePolicy.FIFO:
    return jnp.broadcast_to(jnp.arange(n) >= n_new, union.score.shape)
  rank = jnp.argsort(_order(_best_first(union)), axis=-1)                         # merge's order
  return rank < n - n_new


def packed_memory(fading, project, scores, k, v, packing, *, chunk: int, n_fading: int, k_e: int, size: int,
                  policy: StorePolicy):
  """Memory tokens of a packed row (`bmojo_jax.segments`), chunked the way each document alone is chunked.

  A document's chunks count from its first token, so they need not line up with the row's chunks
  c = [cL, (c+1)L). Row chunk c meets at most two chunks that have memory, both of the document D that holds
  its first token: D's chunk j starting at b0 <= cL, and from row position b1 = b0 + L on, chunk j+1. Documents
  starting inside row chunk c are in their chunk 0 there, which has no memory. So each row chunk gets
      fading:   the M_f tokens before b0 (chunk j's) and the M_f before b1 (chunk j+1's);
      eidetic:  D's store at chunk j, and chunk j's k_e selections (positions [b0, b1)); an entry is seen
                before b1 if it is in the store at chunk j, from b1 on if `merge` keeps it for chunk j+1;
  each slot with the span of the chunk's queries that see it (row offsets within the chunk, D's tokens only).
  Unpacked rows (b0 = cL, b1 = (c+1)L) take the plain path (`fading_per_chunk`, `stores_before_chunks`),
  whose results a packed row must reproduce (tests/test_packing.py).

  fading [B, T, ...] what fading tokens are cut from (`Attention.fading_parts`) or None, project(x [B, C, M_f,
  ...]) -> their keys and values [B, C, M_f, K, P]; scores [B, T] innovation scores (restarted per document)
  and k, v [B, T, K, P] (k without RoPE) or scores None. Returns mem_k, mem_v [B, C, M, K, P], mem_valid
  [B, C, M], mem_span [B, C, 2, M] int32 with M = 2 M_f + M_e + k_e (the parts in use).
  """
  b, t = packing.offset.shape
  n_chunks = -(-t // chunk)
  row_start = jnp.arange(n_chunks, dtype=jnp.int32) * chunk                    # [C]
  offset = packing.offset[:, row_start]                                         # [B, C] D's offset at cL
  b0 = row_start - offset % chunk                                               # [B, C]
  b1_rel = b0 + chunk - row_start                                               # (0, L]
  end_rel = jnp.minimum(packing.end[:, row_start] - row_start, chunk)           # (0, L]: D's last token + 1
  has_prev = offset >= chunk                                                    # D's chunk j > 0
  split = b1_rel < end_rel                                                      # chunk j+1 starts in row chunk c
  before = (jnp.zeros_like(b1_rel), jnp.minimum(b1_rel, end_rel))               # spans [lo, hi)
  after = (b1_rel, end_rel)

  def gather(x, idx):                                                           # x [B, T, …], idx [B, C, n]
    flat = jnp.clip(idx, 0, t - 1).reshape(b, -1)
    out = jnp.take_along_axis(x, flat.reshape(flat.shape + (1,) * (x.ndim - 2)), axis=1)
    return out.reshape(idx.shape + x.shape[2:])

  parts = []                                                                    # (k, v, valid, (lo, hi))

  def add(pk, pv, valid, span):
    n = valid.shape[-1]
    parts.append((pk, pv, valid, tuple(jnp.broadcast_to(x[..., None], (b, n_chunks, n)) for x in span)))

  if n_fading:
    for start, valid, span in ((b0, has_prev, before), (b0 + chunk, split, after)):
      idx = start[..., None] - n_fading + jnp.arange(n_fading)                  # [B, C, M_f]
      add(*project(gather(fading, idx)), jnp.broadcast_to(valid[..., None], idx.shape), span)
  if size:
    idx = b0[..., None] + jnp.arange(chunk)                                     # [B, C, L]: D's chunk j
    in_d = (idx < t) & (gather(packing.ids, idx) == packing.ids[:, row_start][..., None])
    window = jnp.where(in_d, gather(scores, idx), -jnp.inf)
    top, at = _top_k(window, k_e)                                               # ties: earlier first
    order = jnp.argsort(at, axis=-1)
    top, at = jnp.take_along_axis(top, order, -1), jnp.take_along_axis(at, order, -1)
    pos = jnp.take_along_axis(idx, at, -1)                                      # [B, C, k_e] row positions
    valid = top > -jnp.inf
    zero_invalid = lambda x: jnp.where(valid[..., None, None], x, 0)
    selected = Store(k=zero_invalid(gather(k, pos)), v=zero_invalid(gather(v, pos)), score=top,
                     pos=jnp.where(valid, pos, NO_POS), valid=valid)

    old = stores_before_chunks(selected, size, policy, starts=~has_prev)       # D's store at chunk j
    union = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=2), old, selected)  # [B, C, M_e + k_e, …]
    kept = _kept_by_merge(union, k_e, policy)
    old_hi = jnp.where(kept[..., :size], end_rel[..., None], before[1][..., None])
    parts.append((union.k[:, :, :size], union.v[:, :, :size], union.valid[:, :, :size],
                  (jnp.zeros_like(old_hi), old_hi)))
    add(union.k[:, :, size:], union.v[:, :, size:], union.valid[:, :, size:] & kept[..., size:] & split[..., None],
        after)
  cat = lambda i: jnp.concatenate([part[i] for part in parts], axis=2)
  span = jnp.stack([jnp.concatenate([part[3][j] for part in parts], axis=2) for j in (0, 1)], axis=2)
  return cat(0), cat(1), cat(2), span.astype(jnp.int32)
