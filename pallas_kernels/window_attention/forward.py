"""Forward kernel: flash attention over the window band plus the query block's chunk memory.

Shapes (legend in `bmojo_jax/typing.py`), already padded by `ops.py` so that T is a multiple of every block
and M a power of two: q [B, T, H, P]; k, v [B, T, K, P]; mem_k, mem_v [B, C, M, K, P]; mem_valid [B, C, M]
int32, or in its place mem_span [B, C, 2, M] int32 (validity folded in); seg_lo [B, T] int32 or None.
Returns o [B, T, H, P] (q.dtype) and the base-2 logsumexp lse [B, H, T] (fp32), the only residual the
backward pass needs.

One program per (query block, batch, head). The memory logits start the online softmax; then the key
blocks of the band follow in ascending order, so the diagonal block (which holds the query itself, a key
every row sees) comes last and any row whose memory was fully masked is repaired by the rescaling.
Packed rows: the band starts at the first row's segment and only blocks inside every row's segment skip the
mask (`blocks.key_blocks_for_query_block`); the masked body adds key >= seg_lo[row].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bmojo_jax.pallas_kernels.fast_math import FastMath
from bmojo_jax.pallas_kernels.window_attention.blocks import (BlockSizes, band_loop, in_span,
                                                    key_blocks_for_query_block, visible)
from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF


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


def memory_logits(q_scaled, mk_ref, mask_ref, precision, q_offset=None):
  """[bq, M] base-2 logits of the (pre-scaled) query block against its chunk's memory; hidden slots NEG_INF.
  mask_ref: mem_valid [M], or with q_offset (the rows' offsets in their chunk, [bq, 1]) mem_span [2, M]."""
  s = dot_nt(q_scaled, mk_ref[...], precision)
  if q_offset is None:
    return jnp.where((mask_ref[...] != 0)[None, :], s, NEG_INF)
  return jnp.where(in_span(mask_ref[0, :][None, :], mask_ref[1, :][None, :], q_offset), s, NEG_INF)


def split_refs(refs, has_mem: bool, has_seg: bool):
  """(q, k, v, mem_k, mem_v, mem mask, seg_lo, rest…) refs of the forward and dq kernels; absent ones None."""
  q_ref, k_ref, v_ref, *refs = refs
  mem = (None, None, None)
  if has_mem:
    mem, refs = refs[:3], refs[3:]
  seg_ref = refs.pop(0) if has_seg else None
  return (q_ref, k_ref, v_ref, *mem, seg_ref, *refs)


def load_segments(seg_ref):
  """seg_lo of the query block's rows as [bq, 1], and (first row's, last row's) for the block ranges."""
  seg_lo = seg_ref[...]
  return seg_lo[:, None], (jnp.min(seg_lo), jnp.max(seg_lo))


def forward_kernel(*refs, has_mem: bool, has_span: bool, has_seg: bool, qk_scale: float, window: int | None,
                   block_q: int, block_k: int, n_k: int, chunk: int, n_chunks: int, split: bool, fm: FastMath):
  """Refs: q [bq, P], k, v [T, P], (mem_k, mem_v [M, P], mem_valid [M] or mem_span [2, M]), (seg_lo [bq]),
  o [bq, P], lse [bq]."""
  q_ref, k_ref, v_ref, mk_ref, mv_ref, mask_ref, seg_ref, o_ref, lse_ref = split_refs(refs, has_mem, has_seg)
  q = prescale(q_ref[...], qk_scale)
  precision = dot_precision(q.dtype)
  q_start = pl.program_id(0) * block_q
  q_pos = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
  k_iota = jnp.arange(block_k, dtype=jnp.int32)[None, :]
  q_seg_lo, seg_bounds = load_segments(seg_ref) if has_seg else (None, None)

  if has_mem:
    q_offset = q_pos - chunk_of(pl.program_id(0), block_q, chunk, n_chunks) * chunk if has_span else None
    s = memory_logits(q, mk_ref, mask_ref, precision, q_offset)
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
      s = jnp.where(visible(q_pos, j * block_k + k_iota, window, q_seg_lo=q_seg_lo), s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = fm.exp2(m - m_new)
    p = fm.exp2(s - m_new[:, None])
    l = fm.fma(l, alpha, jnp.sum(p, axis=1))
    v = v_ref[k_slice, :]
    o = o * alpha[:, None] + dot_nn(p.astype(v.dtype), v, precision)
    return o, m_new, l

  lo, x, y, hi = key_blocks_for_query_block(q_start, block_q, block_k, window, n_k, seg_bounds)
  o, m, l = band_loop(lo, x, y, hi, body, (o, m, l), split)

  o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def chunk_of(q_block, block_q: int, chunk: int, n_chunks: int):
  """Chunk index of a query block (block_q divides chunk); clamped for padding rows past the last chunk."""
  return jnp.minimum(lax.div(q_block * block_q, chunk), n_chunks - 1)


def memory_specs(mem_k, mem_valid, mem_span, block_q: int, chunk: int, g: int):
  """BlockSpecs of mem_k, mem_v and the memory mask (mem_valid or mem_span) for a (query block, batch, head)
  grid: the query block's chunk."""
  n_chunks, m, p = mem_k.shape[1], mem_k.shape[2], mem_k.shape[4]
  c = lambda i: chunk_of(i, block_q, chunk, n_chunks)
  mem_spec = pl.BlockSpec((None, None, m, None, p), lambda i, bi, hi: (bi, c(i), 0, hi // g, 0))
  if mem_span is None:
    return [mem_spec, mem_spec, pl.BlockSpec((None, None, m), lambda i, bi, hi: (bi, c(i), 0))], mem_valid
  return [mem_spec, mem_spec, pl.BlockSpec((None, None, 2, m), lambda i, bi, hi: (bi, c(i), 0, 0))], mem_span


def query_block_inputs(q, k, v, mem_k, mem_v, mem_valid, mem_span, seg_lo, bq: int, chunk: int):
  """(in_specs, args) of a kernel with one program per (query block of bq rows, batch, head): q's block, the
  whole k and v of the head's kv head, the block's chunk memory and its rows' segment starts (when given)."""
  t, p = q.shape[1], q.shape[3]
  g = q.shape[2] // k.shape[2]
  kv_spec = pl.BlockSpec((None, t, None, p), lambda i, bi, hi: (bi, 0, hi // g, 0))
  in_specs = [pl.BlockSpec((None, bq, None, p), lambda i, bi, hi: (bi, i, hi, 0)), kv_spec, kv_spec]
  args = [q, k, v]
  if mem_k is not None:
    specs, mem_mask = memory_specs(mem_k, mem_valid, mem_span, bq, chunk, g)
    in_specs += specs
    args += [mem_k, mem_v, mem_mask]
  if seg_lo is not None:
    in_specs.append(pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)))
    args.append(seg_lo)
  return in_specs, args


def forward(q, k, v, mem_k, mem_v, mem_valid, seg_lo, mem_span, *, qk_scale: float, window: int | None,
            chunk: int, blocks: BlockSizes, interpret: bool):
  """Padded inputs (see module doc) -> (o [B, T, H, P], lse [B, H, T] fp32)."""
  b, t, h, p = q.shape
  bq, bk = blocks.block_q, blocks.block_k
  n_q = t // bq
  has_mem = mem_k is not None
  in_specs, args = query_block_inputs(q, k, v, mem_k, mem_v, mem_valid, mem_span, seg_lo, bq, chunk)

  kernel = functools.partial(forward_kernel, has_mem=has_mem, has_span=mem_span is not None,
                             has_seg=seg_lo is not None, qk_scale=qk_scale, window=window, block_q=bq,
                             block_k=bk, n_k=t // bk, chunk=chunk, n_chunks=mem_k.shape[1] if has_mem else 1,
                             split=blocks.split_masked, fm=FastMath.for_launch(blocks.fast_math, interpret))
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
