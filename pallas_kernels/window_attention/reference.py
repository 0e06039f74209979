"""Plain-jnp reference for memory attention: causal sliding-window attention plus per-chunk memory tokens.

Shapes (legend in `bmojo_jax/typing.py`): q [B, T, H, P]; k, v [B, T, K, P] with H = K·G (grouped-query);
mem_k, mem_v [B, C, M, K, P] and mem_valid [B, C, M] with C = ceil(T / L) for chunk length L.

Query t in chunk t // L attends to
  * keys t' with t - window < t' <= t (all t' <= t when window is None), and
  * the valid memory slots of its chunk.
Work is done per query chunk against the (window // L + 1) key chunks it can see, so with a window the
memory is O(T·(window + L + M)) and no [T, T] score matrix is built.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite so that fully masked padding rows stay NaN-free; exp() of it is exactly 0.


def check_shapes(q, k, v, mem_k, mem_v, mem_valid, window, chunk):
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
  if mem_k is None:
    return n_chunks, 0
  m = mem_k.shape[2]
  want = (b, n_chunks, m, k.shape[2], p)
  if mem_k.shape != want or mem_v.shape != want or mem_valid.shape != want[:3]:
    raise ValueError(f"memory must be mem_k/mem_v {want} and mem_valid {want[:3]}; got "
                     f"{mem_k.shape}, {mem_v.shape}, {mem_valid.shape}")
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
                               window: int | None, chunk: int, scale: float | None = None):
  """Returns o [B, T, H, P] in q.dtype; logits, softmax and accumulation in fp32."""
  n_chunks, n_mem = check_shapes(q, k, v, mem_k, mem_v, mem_valid, window, chunk)
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
  logits = jnp.where(mask, logits, NEG_INF)
  if n_mem:
    mem_logits = jnp.einsum("BCLKGP,BCMKP->BCKGLM", qc, mem_k, preferred_element_type=f32) * scale
    mem_mask = mem_valid[:, :, None, None, None, :]                     # [B, C, 1, 1, 1, M]
    logits = jnp.concatenate([logits, jnp.where(mem_mask, mem_logits, NEG_INF)], axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BCKGLS,BCSKP->BCLKGP", probs[..., :kw.shape[2]], vw.astype(f32))
  if n_mem:
    out = out + jnp.einsum("BCKGLM,BCMKP->BCLKGP", probs[..., kw.shape[2]:], mem_v.astype(f32))
  return out.reshape(b, t_pad, h, p)[:, :t].astype(q.dtype)
