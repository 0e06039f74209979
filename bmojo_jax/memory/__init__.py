"""Memory tokens: what the queries of chunk c see besides their window (docs/spec.md, "Memory attention").

  fading   the projected mixer read-outs at the last M_f positions of chunk c-1 (`fading_per_chunk`);
  eidetic  the store of M_e tokens as it stands at the end of chunk c-1, filled by the k_e tokens of each chunk
           that `cfg.selection`'s score ranks highest.

`chunk_memory` gives both for every chunk of a row, packed or not; the attention asks it for its memory and
attends. `continued_memory` gives them for a piece of tokens that continues a sequence from its decode state.
The parts, one concept a module:

  scoring.py         the selection scores (`ScoreInputs`, `selection_scores`)
  selection.py       a chunk's top-k_e: all chunks at once (`select_per_chunk`) or token by token (decoding)
  store.py           the `Store` and its `merge`
  parallel_store.py  the store before every chunk at once (`stores_before_chunks`) and its sequential reference
  packed.py          the memory of a packed row, chunked per document (`packed_memory`)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmojo_jax.config import ModelConfig
from bmojo_jax.memory.packed import packed_memory
from bmojo_jax.memory.parallel_store import stores_before_chunks
from bmojo_jax.memory.scoring import ScoreInputs, selection_scores
from bmojo_jax.memory.selection import select_per_chunk
from bmojo_jax.memory.store import NO_POS, Store, best_entries, by_position
from bmojo_jax.segments import Packing


class LastChunk(NamedTuple):
  """The memory of a row's last chunk as the decode state holds it (None where the model has none): fading_k,
  fading_v [B, M_f, K, P] its fading tokens; store [B, M_e, …] the store before it; cand [B, k_e, …] its
  selections so far."""
  fading_k: jax.Array | None = None
  fading_v: jax.Array | None = None
  store: Store | None = None
  cand: Store | None = None


class Memory(NamedTuple):
  """The memory tokens of every chunk, as the attention reads them (all None without memory tokens).

  k, v [B, C, M, K, P] (keys without RoPE); valid [B, C, M]; span [B, C, 2, M] int32: the offsets [lo, hi)
  within the chunk of the queries that see each slot (a packed row), or None (every query sees every valid
  slot); last: `LastChunk` of an unpacked row, None for a packed one (which has no single decode state).
  """
  k: jax.Array | None
  v: jax.Array | None
  valid: jax.Array | None
  span: jax.Array | None
  last: LastChunk | None


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


def chunk_memory(cfg: ModelConfig, fading: jax.Array | None, project, x: ScoreInputs,
                 packing: Packing | None = None) -> Memory:
  """The fading and eidetic memory tokens of every chunk of T tokens (cfg.fading = M_f, cfg.eidetic = M_e).

  fading [B, T, ...] what the fading tokens are cut from (`Attention.fading_parts`) or None without them;
  project(cut [B, C, M_f, ...]) -> their keys and values [B, C, M_f, K, P]; x what the selection scores read
  (x.k [B, T, K, P] the keys without RoPE, x.v the values: the store's entries); packing: several documents
  per row (`packed_memory`: M = 2 M_f + M_e + k_e slots, each with its span) or None (M = M_f + M_e).
  """
  if packing is not None:
    return _packed(cfg, fading, project, x, packing)
  b, t = x.a.shape[:2]
  n_chunks = -(-t // cfg.chunk)
  parts, last = [], LastChunk()                                                  # parts: (k, v, valid)
  if cfg.fading:
    fading_k, fading_v = project(fading_per_chunk(fading, cfg.chunk, cfg.fading))  # [B, C, M_f, K, P]
    parts.append((fading_k, fading_v,
                  jnp.broadcast_to((jnp.arange(n_chunks) > 0)[None, :, None], (b, n_chunks, cfg.fading))))
    last = last._replace(fading_k=fading_k[:, -1], fading_v=fading_v[:, -1])
  if cfg.eidetic:
    scores, v = selection_scores(cfg.selection, x)
    selected = select_per_chunk(scores, x.k, v, cfg.chunk, cfg.eidetic_per_chunk)
    stores = stores_before_chunks(selected, cfg.eidetic, cfg.store_policy)       # [B, C, M_e, …]
    parts.append((stores.k, stores.v, stores.valid))
    last = last._replace(store=jax.tree.map(lambda y: y[:, -1], stores),
                         cand=jax.tree.map(lambda y: y[:, -1], selected))
  if not parts:
    return Memory(None, None, None, None, last)
  k, v, valid = (jnp.concatenate(xs, axis=2) for xs in zip(*parts))
  return Memory(k, v, valid, None, last)


def fading_rows(source: jax.Array, before: jax.Array, idx: jax.Array) -> jax.Array:
  """The read-outs [B, *idx.shape, D] at indices idx (int array) of a piece of T tokens: rows of source [B, T, D]
  where idx >= 0 (clipped to T - 1), else the rows -M_f..-1 of before [B, M_f, D], the M_f read-outs before the
  piece (the decode state's next_fading), in before's dtype."""
  b, t, m_f = source.shape[0], source.shape[1], before.shape[1]
  rows = lambda x, i: jnp.take(x, i.reshape(-1), axis=1).reshape(b, *idx.shape, x.shape[-1])
  inside = (idx >= 0).reshape(1, *idx.shape, 1)
  return jnp.where(inside, rows(source, jnp.clip(idx, 0, t - 1)).astype(before.dtype),
                   rows(before, jnp.clip(idx + m_f, 0, m_f - 1)))


def continued_memory(cfg: ModelConfig, fading: jax.Array | None, project, x: ScoreInputs, start: jax.Array,
                     first: LastChunk, before: jax.Array | None) -> Memory:
  """`chunk_memory` of T tokens at positions start + [0, T) (start an int32 scalar, traced) that continue a
  sequence from its decode state, built as the one-pass prefill builds them.

  Chunks count from c0 = start // L, the chunk holding the first token, and are n = ceil((T + L - 1) / L) (static:
  the piece begins at offset start % L of chunk c0; chunks after the one of its last token are padding).
  first: the memory of chunk c0 as it stands before the piece (`LastChunk`: its fading tokens, the store before
  it, its selections so far); before [B, M_f, D]: the read-outs of the M_f tokens before the piece (None without
  fading tokens); fading [B, T, D] the piece's read-outs and project(rows [..., D]) -> their keys and values
  (`Attention.fading_project`); x as `chunk_memory` (with the history and previous fading projections of the
  state). Chunk c0 + j (j >= 1) takes the fading tokens of its M_f read-outs (`fading_rows`, projected) and the
  store after c0 + j - 1; chunk c0's selections are the k_e best of first.cand and the
  piece's tokens in it (`best_entries`), so every chunk's selections, stores and fading tokens are those of the
  whole sequence. Returns Memory with k, v [B, n, M, K, P], valid [B, n, M] and last, the memory of the chunk
  holding the last token.
  """
  b, t = x.a.shape[:2]
  chunk = cfg.chunk
  n = -(-(t + chunk - 1) // chunk)
  phase = start % chunk
  last_chunk = (phase + t - 1) // chunk
  at_last = lambda y: jax.lax.dynamic_index_in_dim(y, last_chunk, axis=1, keepdims=False)
  parts, last = [], LastChunk()
  if cfg.fading:
    idx = (jnp.arange(1, n) * chunk - phase - cfg.fading)[:, None] + jnp.arange(cfg.fading)   # [n-1, M_f]
    fk, fv = (jnp.concatenate([f[:, None], r], 1)
              for f, r in zip((first.fading_k, first.fading_v), project(fading_rows(fading, before, idx))))
    valid = jnp.broadcast_to((start // chunk + jnp.arange(n) > 0)[None, :, None], (b, n, cfg.fading))
    parts.append((fk, fv, valid))
    last = last._replace(fading_k=at_last(fk), fading_v=at_last(fv))
  if cfg.eidetic:
    scores, v = selection_scores(cfg.selection, x)
    place = lambda y, fill: jax.lax.dynamic_update_slice_in_dim(
        jnp.full((b, n * chunk, *y.shape[2:]), fill, y.dtype), y, phase, axis=1)   # the piece in chunks c0..
    selected = select_per_chunk(place(scores, -jnp.inf), place(x.k, 0), place(v, 0), chunk, cfg.eidetic_per_chunk)
    selected = selected._replace(pos=jnp.where(selected.valid, selected.pos + (start - phase), NO_POS))
    both = jax.tree.map(lambda c, s: jnp.concatenate([c.astype(s.dtype), s[:, 0]], 1), first.cand, selected)
    head = by_position(best_entries(both, cfg.eidetic_per_chunk))              # chunk c0's selections
    selected = jax.tree.map(lambda s, h: s.at[:, 0].set(h), selected, head)
    stores = stores_before_chunks(selected, cfg.eidetic, cfg.store_policy, initial=first.store)   # [B, n, M_e, …]
    parts.append((stores.k, stores.v, stores.valid))
    last = last._replace(store=jax.tree.map(at_last, stores), cand=jax.tree.map(at_last, selected))
  k, v, valid = (jnp.concatenate(xs, axis=2) for xs in zip(*parts))
  return Memory(k, v, valid, None, last)


def _packed(cfg: ModelConfig, fading, project, x: ScoreInputs, packing: Packing) -> Memory:
  """`chunk_memory` of a packed row: the scores restart at each document's first token."""
  if not cfg.fading:                        # (M_e > 0 only with M_f > 0: ModelConfig.validate)
    return Memory(None, None, None, None, None)
  scores, v = None, x.v
  if cfg.eidetic:
    scores, v = selection_scores(cfg.selection, x._replace(reach=packing.offset))
  k_e = cfg.eidetic_per_chunk if cfg.eidetic else 0
  return Memory(*packed_memory(fading, project, scores, x.k, v, packing, chunk=cfg.chunk, n_fading=cfg.fading,
                               k_e=k_e, size=cfg.eidetic, policy=cfg.store_policy), None)
