"""Backward kernels (FlashAttention-2 style): probabilities are rebuilt from the saved logsumexp.

Shapes as in `forward.py` (padded): q, do [B, T, H, P]; k, v [B, T, K, P]; mem_k, mem_v [B, C, M, K, P];
mem_valid [B, C, M] int32 or mem_span [B, C, 2, M] int32; seg_lo, seg_hi [B, T] int32 or None (packed rows:
the dq kernel masks with the query rows' seg_lo, the dk/dv kernel with the key rows' seg_hi, see
`blocks.py`); lse, delta [B, H, T] fp32 with delta_t = Σ_P o·do.

Three kernels, none with atomics:
  * dq (`dq_triton`): one program per (query block, batch, head); loops over the window's key blocks,
             adds the memory term; dq [B, T, H, P].
  * dk, dv (`dkdv_triton`): one program per (key block, batch, kv head); loops over the G query heads of
             its group and the query blocks whose window holds the key block; dk, dv [B, T, K, P].
  * memory (`dmem_triton`): one program per (chunk, batch, kv head); loops over the G heads and the chunk's
             query blocks; dmem_k, dmem_v [B, C, M, K, P].
Triton only: `ops.py` picks these or the Mosaic dq / dk/dv kernels (`dq_mosaic.py`, `dkdv_mosaic.py`,
`BlockSizes.dq_impl` / `dkdv_impl`); the memory's dk/dv is always `dmem_triton`.
With p = exp2(s - lse), dp = do·vᵀ, ds = p ⊙ (dp - delta): dv = pᵀ·do, dk = scale · dsᵀ·q, dq = scale · ds·k.
A masked logit is NEG_INF, so its p, and hence every gradient through it, is exactly zero.
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
                                                    key_blocks_for_query_block, query_blocks_for_key_block,
                                                    visible)
from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF
from bmojo_jax.pallas_kernels.window_attention.forward import (chunk_of, dot_nn, dot_nt, dot_precision, load_segments,
                                                     memory_logits, prescale, query_block_inputs,
                                                     split_refs)


def dq_kernel(*refs, has_mem: bool, has_span: bool, has_seg: bool, qk_scale: float, scale: float,
              window: int | None, block_q: int, block_k: int, n_k: int, chunk: int, n_chunks: int, split: bool,
              fm: FastMath):
  """Refs: q [bq, P], k, v [T, P], (mem_k, mem_v [M, P], mem_valid [M] or mem_span [2, M]), (seg_lo [bq]),
  do [bq, P], lse, delta [bq]; out dq [bq, P]."""
  (q_ref, k_ref, v_ref, mk_ref, mv_ref, mask_ref, seg_ref, do_ref, lse_ref, delta_ref,
   dq_ref) = split_refs(refs, has_mem, has_seg)
  q, do = prescale(q_ref[...], qk_scale), do_ref[...]   # q only enters the logits here
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  precision = dot_precision(q.dtype)
  q_start = pl.program_id(0) * block_q
  q_pos = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
  k_iota = jnp.arange(block_k, dtype=jnp.int32)[None, :]
  q_seg_lo, seg_bounds = load_segments(seg_ref) if has_seg else (None, None)

  dq = jnp.zeros(q.shape, jnp.float32)
  if has_mem:
    mk, mv = mk_ref[...], mv_ref[...]
    q_offset = q_pos - chunk_of(pl.program_id(0), block_q, chunk, n_chunks) * chunk if has_span else None
    p = fm.exp2(memory_logits(q, mk_ref, mask_ref, precision, q_offset) - lse)
    ds = p * (dot_nt(do, mv, precision) - delta)
    dq = dot_nn(ds.astype(mk.dtype), mk, precision)

  def body(j, dq, masked):
    k_slice = pl.ds(j * block_k, block_k)
    k, v = k_ref[k_slice, :], v_ref[k_slice, :]
    s = dot_nt(q, k, precision)
    if masked:
      s = jnp.where(visible(q_pos, j * block_k + k_iota, window, q_seg_lo=q_seg_lo), s, NEG_INF)
    p = fm.exp2(s - lse)
    ds = p * (dot_nt(do, v, precision) - delta)
    return dq + dot_nn(ds.astype(k.dtype), k, precision)

  lo, x, y, hi = key_blocks_for_query_block(q_start, block_q, block_k, window, n_k, seg_bounds)
  dq = band_loop(lo, x, y, hi, body, dq, split)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def accumulate_kv_grads(fm: FastMath, dk, dv, s, v, q, do, lse, delta, precision):
  """One query tile's share of the key/value gradients, transposed (keys on rows): s [Y, bq] base-2 logits
  (masked ones NEG_INF), v [Y, P], q, do [bq, P], lse, delta [1, bq]. Returns dk (unscaled), dv [Y, P] fp32."""
  p = fm.exp2(s - lse)
  dv = dv + dot_nn(p.astype(do.dtype), do, precision)
  ds = p * (dot_nt(v, do, precision) - delta)
  return dk + dot_nn(ds.astype(q.dtype), q, precision), dv


def dkdv_kernel(*refs, has_seg: bool, qk_scale: float, scale: float, window: int | None, block_q: int,
                block_k: int, n_q: int, groups: int, split: bool, fm: FastMath):
  """Refs: q, do [T, G, P]; k, v [bk, P]; lse, delta [G, T]; (seg_hi [bk]); out dk, dv [bk, P]. Works
  transposed (keys on rows) so that dk and dv accumulate as [bk, P] without transposing the probabilities."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
  seg_ref = refs.pop(0) if has_seg else None
  dk_ref, dv_ref = refs
  k, v = prescale(k_ref[...], qk_scale), v_ref[...]     # k only enters the logits here
  precision = dot_precision(k.dtype)
  k_start = pl.program_id(0) * block_k
  k_pos = k_start + jnp.arange(block_k, dtype=jnp.int32)[:, None]
  q_iota = jnp.arange(block_q, dtype=jnp.int32)[None, :]
  k_seg_hi, seg_bounds = load_segments(seg_ref) if has_seg else (None, None)
  lo, x, y, hi = query_blocks_for_key_block(k_start, block_q, block_k, window, n_q, seg_bounds)

  def body(i, carry, g, masked):
    dk, dv = carry
    q_slice = pl.ds(i * block_q, block_q)
    q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
    lse, delta = lse_ref[g, q_slice][None, :], delta_ref[g, q_slice][None, :]
    s = dot_nt(k, q, precision)                                     # [bk, bq]
    if masked:
      s = jnp.where(visible(i * block_q + q_iota, k_pos, window, k_seg_hi=k_seg_hi), s, NEG_INF)
    return accumulate_kv_grads(fm, dk, dv, s, v, q, do, lse, delta, precision)

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for g in range(groups):   # static: G is small, and a static head index keeps the loads plain
    carry = band_loop(lo, x, y, hi, functools.partial(body, g=g), carry, split)
  dk, dv = carry
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def dmem_kernel(q_ref, do_ref, lse_ref, delta_ref, mk_ref, mv_ref, mask_ref, dmk_ref, dmv_ref, *,
                has_span: bool, qk_scale: float, scale: float, block_q: int, chunk: int, n_q: int, groups: int,
                fm: FastMath):
  """Refs: q, do [T, G, P]; lse, delta [G, T]; mem_k, mem_v [M, P]; mem_valid [M] or mem_span [2, M]; out
  dmem_k, dmem_v [M, P]. Transposed like `dkdv_kernel`."""
  mk, mv = prescale(mk_ref[...], qk_scale), mv_ref[...]
  precision = dot_precision(mk.dtype)
  valid = None if has_span else (mask_ref[...] != 0)[:, None]
  c = pl.program_id(0)
  lo = c * (chunk // block_q)
  hi = jnp.minimum(lo + chunk // block_q, n_q)
  if has_span:   # slot m seen by the queries at chunk offsets [span[0, m], span[1, m])
    span_lo, span_hi = mask_ref[0, :][:, None], mask_ref[1, :][:, None]
    offset = jnp.arange(block_q, dtype=jnp.int32)[None, :] - c * chunk

  def body(i, carry, g):
    dmk, dmv = carry
    q_slice = pl.ds(i * block_q, block_q)
    q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
    lse, delta = lse_ref[g, q_slice][None, :], delta_ref[g, q_slice][None, :]
    vis = valid if valid is not None else in_span(span_lo, span_hi, i * block_q + offset)   # [M, 1] or [M, bq]
    s = jnp.where(vis, dot_nt(mk, q, precision), NEG_INF)                 # [M, bq]
    return accumulate_kv_grads(fm, dmk, dmv, s, mv, q, do, lse, delta, precision)

  carry = (jnp.zeros(mk.shape, jnp.float32), jnp.zeros(mv.shape, jnp.float32))
  for g in range(groups):
    carry = lax.fori_loop(lo, hi, functools.partial(body, g=g), carry)
  dmk, dmv = carry
  dmk_ref[...] = (dmk * scale).astype(dmk_ref.dtype)
  dmv_ref[...] = dmv.astype(dmv_ref.dtype)


def _launch(blocks: BlockSizes, qk_scale: float, scale: float, interpret: bool):
  """(Triton compiler params, the kernels' common keyword arguments)."""
  params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd)
  return params, dict(qk_scale=qk_scale, scale=scale, fm=FastMath.for_launch(blocks.fast_math, interpret))


def _group_specs(t: int, g: int, p: int):
  """BlockSpecs of a (key block or chunk, batch, kv head) grid's inputs: its group's G query heads of q / do
  [B, T, H, P] and rows of lse / delta [B, H, T]."""
  return (pl.BlockSpec((None, t, g, p), lambda j, bi, ki: (bi, 0, ki, 0)),
          pl.BlockSpec((None, g, t), lambda j, bi, ki: (bi, ki, 0)))


def dq_triton(q, k, v, mem_k, mem_v, mem_valid, seg_lo, mem_span, do, lse, delta, *, scale: float,
              qk_scale: float, window: int | None, chunk: int, blocks: BlockSizes, interpret: bool):
  """`dq_kernel` on a grid (query block, batch, head): padded inputs, lse, delta [B, H, T] -> dq [B, T, H, P]."""
  b, t, h, p = q.shape
  params, common = _launch(blocks, qk_scale, scale, interpret)
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  q_spec = pl.BlockSpec((None, bq, None, p), lambda i, bi, hi: (bi, i, hi, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  in_specs, args = query_block_inputs(q, k, v, mem_k, mem_v, mem_valid, mem_span, seg_lo, bq, chunk)
  has_mem = mem_k is not None
  return pl.pallas_call(
      functools.partial(dq_kernel, has_mem=has_mem, has_span=mem_span is not None, has_seg=seg_lo is not None,
                        window=window, block_q=bq, block_k=bk, n_k=t // bk, chunk=chunk,
                        n_chunks=mem_k.shape[1] if has_mem else 1, split=blocks.split_masked, **common),
      grid=(t // bq, b, h),
      in_specs=in_specs + [q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="memory_attention_dq",
  )(*args, do, lse, delta)


def dkdv_triton(q, k, v, do, lse, delta, seg_hi, *, scale: float, qk_scale: float, window: int | None,
                blocks: BlockSizes, interpret: bool):
  """`dkdv_kernel` on a grid (key block, batch, kv head), each program reading its group's G query heads:
  padded inputs, lse, delta [B, H, T], seg_hi [B, T] or None -> (dk, dv) [B, T, K, P]."""
  b, t, h, p = q.shape
  kh = k.shape[2]
  g = h // kh
  params, common = _launch(blocks, qk_scale, scale, interpret)
  group_spec, group_rows = _group_specs(t, g, p)
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  key_spec = pl.BlockSpec((None, bk, None, p), lambda j, bi, ki: (bi, j, ki, 0))
  in_specs, args = [group_spec, key_spec, key_spec, group_spec, group_rows, group_rows], [q, k, v, do, lse, delta]
  if seg_hi is not None:
    in_specs.append(pl.BlockSpec((None, bk), lambda j, bi, ki: (bi, j)))
    args.append(seg_hi)
  dk, dv = pl.pallas_call(
      functools.partial(dkdv_kernel, has_seg=seg_hi is not None, window=window, block_q=bq, block_k=bk,
                        n_q=t // bq, groups=g, split=blocks.split_masked, **common),
      grid=(t // bk, b, kh),
      in_specs=in_specs,
      out_specs=[key_spec, key_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="memory_attention_dkdv",
  )(*args)
  return dk, dv


def dmem_triton(q, mem_k, mem_v, mem_valid, mem_span, do, lse, delta, *, scale: float, qk_scale: float,
                chunk: int, blocks: BlockSizes, interpret: bool):
  """`dmem_kernel` on a grid (chunk, batch, kv head): padded q, do, memory, mem_valid [B, C, M] or mem_span
  [B, C, 2, M], lse, delta [B, H, T] -> (dmem_k, dmem_v) [B, C, M, K, P]."""
  b, t, h, p = q.shape
  kh = mem_k.shape[3]
  g = h // kh
  params, common = _launch(blocks, qk_scale, scale, interpret)
  group_spec, group_rows = _group_specs(t, g, p)
  bq = blocks.block_q_dq
  n_chunks, m = mem_k.shape[1], mem_k.shape[2]
  mem_spec = pl.BlockSpec((None, None, m, None, p), lambda c, bi, ki: (bi, c, 0, ki, 0))
  if mem_span is None:
    mask_spec, mem_mask = pl.BlockSpec((None, None, m), lambda c, bi, ki: (bi, c, 0)), mem_valid
  else:
    mask_spec, mem_mask = pl.BlockSpec((None, None, 2, m), lambda c, bi, ki: (bi, c, 0, 0)), mem_span
  dmk, dmv = pl.pallas_call(
      functools.partial(dmem_kernel, has_span=mem_span is not None, block_q=bq, chunk=chunk, n_q=t // bq,
                        groups=g, **common),
      grid=(n_chunks, b, kh),
      in_specs=[group_spec, group_spec, group_rows, group_rows, mem_spec, mem_spec, mask_spec],
      out_specs=[mem_spec, mem_spec],
      out_shape=[jax.ShapeDtypeStruct(mem_k.shape, mem_k.dtype),
                 jax.ShapeDtypeStruct(mem_v.shape, mem_v.dtype)],
      compiler_params=params, interpret=interpret, name="memory_attention_dmem",
  )(q, do, lse, delta, mem_k, mem_v, mem_mask)
  return dmk, dmv
