"""The memory tokens of a packed row (`bmojo_jax.segments`), chunked the way each document alone is chunked."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bmojo_jax.config import StorePolicy
from bmojo_jax.memory.parallel_store import stores_before_chunks
from bmojo_jax.memory.selection import top_k_per_row
from bmojo_jax.memory.store import NO_POS, Store, kept_by_merge
from bmojo_jax.segments import Packing


def packed_memory(fading, project, scores, k, v, packing: Packing, *, chunk: int, n_fading: int, k_e: int,
                  size: int, policy: StorePolicy):
  """Memory tokens of a packed row (`bmojo_jax.segments`), chunked the way each document alone is chunked.

  A document's chunks count from its first token, so they need not line up with the row's chunks
  c = [cL, (c+1)L). Row chunk c meets at most two chunks that have memory, both of the document D that holds
  its first token: D's chunk j starting at b0 <= cL, and from row position b1 = b0 + L on, chunk j+1. Documents
  starting inside row chunk c are in their chunk 0 there, which has no memory. So each row chunk gets
      fading:   the M_f tokens before b0 (chunk j's) and the M_f before b1 (chunk j+1's);
      eidetic:  D's store at chunk j, and chunk j's k_e selections (positions [b0, b1)); an entry is seen
                before b1 if it is in the store at chunk j, from b1 on if `merge` keeps it for chunk j+1;
  each slot with the span of the chunk's queries that see it (row offsets within the chunk, D's tokens only).
  Unpacked rows (b0 = cL, b1 = (c+1)L) take `chunk_memory`'s plain path (`fading_per_chunk`,
  `stores_before_chunks`), whose results a packed row must reproduce (tests/test_packing.py).

  fading [B, T, ...] what fading tokens are cut from (`Attention.fading_parts`) or None, project(x [B, C, M_f,
  ...]) -> their keys and values [B, C, M_f, K, P]; scores [B, T] selection scores (restarted per document)
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
    top, at = top_k_per_row(window, k_e)                                           # ties: earlier first
    order = jnp.argsort(at, axis=-1)
    top, at = jnp.take_along_axis(top, order, -1), jnp.take_along_axis(at, order, -1)
    pos = jnp.take_along_axis(idx, at, -1)                                      # [B, C, k_e] row positions
    valid = top > -jnp.inf
    zero_invalid = lambda x: jnp.where(valid[..., None, None], x, 0)
    selected = Store(k=zero_invalid(gather(k, pos)), v=zero_invalid(gather(v, pos)), score=top,
                     pos=jnp.where(valid, pos, NO_POS))

    old = stores_before_chunks(selected, size, policy, starts=~has_prev)       # D's store at chunk j
    union = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=2), old, selected)  # [B, C, M_e + k_e, …]
    kept = kept_by_merge(union, k_e, policy)
    old_hi = jnp.where(kept[..., :size], end_rel[..., None], before[1][..., None])
    parts.append((union.k[:, :, :size], union.v[:, :, :size], union.valid[:, :, :size],
                  (jnp.zeros_like(old_hi), old_hi)))
    add(union.k[:, :, size:], union.v[:, :, size:], union.valid[:, :, size:] & kept[..., size:] & split[..., None],
        after)
  cat = lambda i: jnp.concatenate([part[i] for part in parts], axis=2)
  span = jnp.stack([jnp.concatenate([part[3][j] for part in parts], axis=2) for j in (0, 1)], axis=2)
  return cat(0), cat(1), cat(2), span.astype(jnp.int32)
