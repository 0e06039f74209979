"""Plain-jnp reference for memory attention: causal sliding-window attention plus per-chunk memory tokens.

Shapes (legend in `bmojo_jax/typing.py`): q [B, T, H, P]; k, v [B, T, K, P] with H = K·G (grouped-query);
mem_k, mem_v [B, C, M, K, P] and mem_valid [B, C, M] with C = ceil(T / L) for chunk length L; optional
segment_ids [B, T] (packed documents) and mem_span [B, C, 2, M] (needs memory).

Query t in chunk c = t // L attends to
  * keys t' with t - window < t' <= t (all t' <= t when window is None) and, with segment_ids,
    segment_ids[b, t'] == segment_ids[b, t] (the caller keeps each segment one contiguous run), and
  * the valid memory slots m of its chunk with, given mem_span, mem_span[b, c, 0, m] <= t - c·L <
    mem_span[b, c, 1, m] (without it the whole chunk). Memory ignores segment_ids: the span says which
    queries of the chunk a slot belongs to.
Work is done per query chunk against the (window // L + 1) key chunks it can see, so with a window the
memory is O(T·(window + L + M)) and no [T, T] score matrix is built.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite so that fully masked padding rows stay NaN-free; exp() of it is exactly 0.


def check_shapes(q, k, v, mem_k, mem_v, mem_valid, window, chunk, segment_ids=None, mem_span=None):
  """Raise a ValueError naming the offending shapes; returns (C, M)."""
  b, t, h, p = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != p:
    raise ValueError(f"k {k.shape} and v {v.shape} must be [B, T, K, P] matching q {q.shape}")
  if h % k.shape[2]:
    raise ValueError(f"query heads {h} must be a multiple of kv heads {k.shape[2]}")
  if chunk <= 0:
    raise ValueError(f"chunk must be positive, got {chunk}")
  if window is not None and (window <= 0 or window % chunk):
    raise ValueError(f"window ({window}) must be a positive multiple of chunk ({chunk})")
  n_chunks = -(-t // chunk)
  if segment_ids is not None and (segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f"segment_ids must be integer [B, T] = {(b, t)} (q {q.shape}); got {segment_ids.dtype} "
                     f"{segment_ids.shape}")
  if mem_k is None:
    if mem_span is not None:
      raise ValueError(f"mem_span {mem_span.shape} needs memory (mem_k, mem_v, mem_valid)")
    return n_chunks, 0
  m = mem_k.shape[2]
  want = (b, n_chunks, m, k.shape[2], p)
  if mem_k.shape != want or mem_v.shape != want or mem_valid.shape != want[:3]:
    raise ValueError(f"memory must be mem_k/mem_v {want} and mem_valid {want[:3]}; got "
                     f"{mem_k.shape}, {mem_v.shape}, {mem_valid.shape}")
  span = (b, n_chunks, 2, m)
  if mem_span is not None and (mem_span.shape != span or not jnp.issubdtype(mem_span.dtype, jnp.integer)):
    raise ValueError(f"mem_span must be integer [B, C, 2, M] = {span} (mem_k {mem_k.shape}); got "
                     f"{mem_span.dtype} {mem_span.shape}")
  return n_chunks, m


def window_blocks(x, n_chunks: int, chunk: int, r: int):
  """[B, C·L, K, P] -> [B, C, (r+1)·L, K, P]: for chunk c, keys at positions (c - r)·L … (c+1)·L - 1."""
  b, _, kh, p = x.shape
  x = jnp.pad(x, ((0, 0), (r * chunk, 0), (0, 0), (0, 0)))
  x = x.reshape(b, n_chunks + r, chunk, kh, p)
  x = jnp.stack([x[:, j:j + n_chunks] for j in range(r + 1)], axis=2)   # [B, C, r+1, L, K, P]
  return x.reshape(b, n_chunks, (r + 1) * chunk, kh, p)


def window_mask(n_chunks: int, chunk: int, r: int, window: int):
  """[C, L, (r+1)·L] bool: key (c - r)·L + j visible from query c·L + i."""
  i = jnp.arange(chunk)[:, None]
  j = jnp.arange((r + 1) * chunk)[None, :]
  rel = j - r * chunk                                 # key position minus the chunk start
  local = (rel <= i) & (rel > i - window)
  key_pos = jnp.arange(n_chunks)[:, None, None] * chunk + rel[None]
  return local[None] & (key_pos >= 0)


def memory_attention_reference(q, k, v, mem_k=None, mem_v=None, mem_valid=None, *,
                               window: int | None, chunk: int, segment_ids=None, mem_span=None,
                               scale: float | None = None):
  """Returns o [B, T, H, P] in q.dtype; logits, softmax and accumulation in fp32."""
  n_chunks, n_mem = check_shapes(q, k, v, mem_k, mem_v, mem_valid, window, chunk, segment_ids, mem_span)
  b, t, h, p = q.shape
  kh = k.shape[2]
  g = h // kh
  scale = 1.0 / math.sqrt(p) if scale is None else scale
  t_pad = n_chunks * chunk
  r = n_chunks if window is None else window // chunk
  window = t_pad if window is None else window

  pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
  qc = jnp.pad(q, pad).reshape(b, n_chunks, chunk, kh, g, p)
  kw = window_blocks(jnp.pad(k, pad), n_chunks, chunk, r)             # [B, C, S, K, P]
  vw = window_blocks(jnp.pad(v, pad), n_chunks, chunk, r)

  f32 = jnp.float32
  logits = jnp.einsum("BCLKGP,BCSKP->BCKGLS", qc, kw, preferred_element_type=f32) * scale
  mask = window_mask(n_chunks, chunk, r, window)[None, :, None, None]  # [1, C, 1, 1, L, S]
  if segment_ids is not None:
    # padding queries are sliced off; padding keys come after every real query
    seg = jnp.pad(segment_ids, ((0, 0), (0, t_pad - t)))
    seg_q = seg.reshape(b, n_chunks, chunk)
    seg_k = window_blocks(seg[:, :, None, None], n_chunks, chunk, r)[..., 0, 0]   # [B, C, S]
    same = seg_q[:, :, :, None] == seg_k[:, :, None, :]                            # [B, C, L, S]
    mask = mask & same[:, :, None, None]
  logits = jnp.where(mask, logits, NEG_INF)
  if n_mem:
    mem_logits = jnp.einsum("BCLKGP,BCMKP->BCKGLM", qc, mem_k, preferred_element_type=f32) * scale
    mem_mask = mem_valid[:, :, None, None, None, :]                     # [B, C, 1, 1, 1, M]
    if mem_span is not None:
      offset = jnp.arange(chunk)[:, None]                               # query offset in its chunk
      span = (mem_span[:, :, 0, None, :] <= offset) & (offset < mem_span[:, :, 1, None, :])   # [B, C, L, M]
      mem_mask = mem_mask & span[:, :, None, None]
    logits = jnp.concatenate([logits, jnp.where(mem_mask, mem_logits, NEG_INF)], axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BCKGLS,BCSKP->BCLKGP", probs[..., :kw.shape[2]], vw.astype(f32))
  if n_mem:
    out = out + jnp.einsum("BCKGLM,BCMKP->BCLKGP", probs[..., kw.shape[2]:], mem_v.astype(f32))
  return out.reshape(b, t_pad, h, p)[:, :t].astype(q.dtype)
