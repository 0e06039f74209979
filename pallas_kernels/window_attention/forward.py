"""Forward kernel: flash attention over the window band plus the query block's chunk memory.

Shapes (legend in `bmojo_jax/typing.py`), already padded by `ops.py` so that T is a multiple of every block
and M a power of two: q [B, T, H, P]; k, v [B, T, K, P]; mem_k, mem_v [B, C, M, K, P]; mem_valid [B, C, M]
int32. Returns o [B, T, H, P] (q.dtype) and the base-2 logsumexp lse [B, H, T] (fp32), the only residual
the backward pass needs.

One program per (query block, batch, head). The memory logits start the online softmax; then the key
blocks of the band follow in ascending order, so the diagonal block (which holds the query itself, a key
every row sees) comes last and any row whose memory was fully masked is repaired by the rescaling.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fast_math import FastMath
from pallas_kernels.window_attention.blocks import (NEG_INF, BlockSizes, band_loop, key_blocks_for_query_block,
                                                    visible)


def dot_precision(dtype):
  """fp32 inputs: exact fp32 products (Triton would use tf32 otherwise); bf16: the tensor cores."""
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def dot_nt(a, b, precision):
  """a [X, P] · b[Y, P]ᵀ -> [X, Y] fp32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
  """a [X, Y] · b [Y, P] -> [X, P] fp32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def prescale(x, qk_scale):
  """x · scale · log2(e) in x's dtype: one multiply per program instead of one per logit tile."""
  return (x.astype(jnp.float32) * qk_scale).astype(x.dtype)


def memory_logits(q_scaled, mk_ref, valid_ref, precision):
  """[bq, M] base-2 logits of the (pre-scaled) query block against its chunk's memory; invalid NEG_INF."""
  s = dot_nt(q_scaled, mk_ref[...], precision)
  return jnp.where((valid_ref[...] != 0)[None, :], s, NEG_INF)


def forward_kernel(*refs, has_mem: bool, qk_scale: float, window: int | None, block_q: int,
                   block_k: int, n_k: int, split: bool, fm: FastMath):
  """Refs: q [bq, P], k, v [T, P], (mem_k, mem_v [M, P], mem_valid [M]), o [bq, P], lse [bq]."""
  if has_mem:
    q_ref, k_ref, v_ref, mk_ref, mv_ref, valid_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  q = prescale(q_ref[...], qk_scale)
  precision = dot_precision(q.dtype)
  q_start = pl.program_id(0) * block_q
  q_pos = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
  k_iota = jnp.arange(block_k, dtype=jnp.int32)[None, :]

  if has_mem:
    s = memory_logits(q, mk_ref, valid_ref, precision)
    m = jnp.max(s, axis=1)
    p = fm.exp2(s - m[:, None])
    l = jnp.sum(p, axis=1)
    mv = mv_ref[...]
    o = dot_nn(p.astype(mv.dtype), mv, precision)
  else:
    m = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    o = jnp.zeros(q.shape, jnp.float32)

  def body(j, carry, masked):
    o, m, l = carry
    k_slice = pl.ds(j * block_k, block_k)
    s = dot_nt(q, k_ref[k_slice, :], precision)
    if masked:
      s = jnp.where(visible(q_pos, j * block_k + k_iota, window), s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = fm.exp2(m - m_new)
    p = fm.exp2(s - m_new[:, None])
    l = fm.fma(l, alpha, jnp.sum(p, axis=1))
    v = v_ref[k_slice, :]
    o = o * alpha[:, None] + dot_nn(p.astype(v.dtype), v, precision)
    return o, m_new, l

  lo, x, y, hi = key_blocks_for_query_block(q_start, block_q, block_k, window, n_k)
  o, m, l = band_loop(lo, x, y, hi, body, (o, m, l), split)

  o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def chunk_of(q_block, block_q: int, chunk: int, n_chunks: int):
  """Chunk index of a query block (block_q divides chunk); clamped for padding rows past the last chunk."""
  return jnp.minimum(lax.div(q_block * block_q, chunk), n_chunks - 1)


def forward(q, k, v, mem_k, mem_v, mem_valid, *, qk_scale: float, window: int | None, chunk: int,
            blocks: BlockSizes, interpret: bool):
  """Padded inputs (see module doc) -> (o [B, T, H, P], lse [B, H, T] fp32)."""
  b, t, h, p = q.shape
  kh = k.shape[2]
  g = h // kh
  bq, bk = blocks.block_q, blocks.block_k
  n_q = t // bq
  has_mem = mem_k is not None

  in_specs = [
      pl.BlockSpec((None, bq, None, p), lambda i, bi, hi: (bi, i, hi, 0)),
      pl.BlockSpec((None, t, None, p), lambda i, bi, hi: (bi, 0, hi // g, 0)),
      pl.BlockSpec((None, t, None, p), lambda i, bi, hi: (bi, 0, hi // g, 0)),
  ]
  args = [q, k, v]
  if has_mem:
    n_chunks, m = mem_k.shape[1], mem_k.shape[2]
    mem_map = lambda i, bi, hi: (bi, chunk_of(i, bq, chunk, n_chunks), 0, hi // g, 0)
    in_specs += [
        pl.BlockSpec((None, None, m, None, p), mem_map),
        pl.BlockSpec((None, None, m, None, p), mem_map),
        pl.BlockSpec((None, None, m), lambda i, bi, hi: (bi, chunk_of(i, bq, chunk, n_chunks), 0)),
    ]
    args += [mem_k, mem_v, mem_valid]

  kernel = functools.partial(forward_kernel, has_mem=has_mem, qk_scale=qk_scale, window=window,
                             block_q=bq, block_k=bk, n_k=t // bk, split=blocks.split_masked,
                             fm=FastMath.for_launch(blocks.fast_math, interpret))
  return pl.pallas_call(
      kernel,
      grid=(n_q, b, h),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, bq, None, p), lambda i, bi, hi: (bi, i, hi, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps_fwd,
                                           num_stages=blocks.num_stages_fwd),
      interpret=interpret,
      name="memory_attention_fwd",
  )(*args)
