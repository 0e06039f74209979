"""dq kernel for Hopper through Pallas' Mosaic GPU lowering: warp-specialized like `forward_mosaic.py`.

Same contract as `backward.dq_kernel` (padded inputs, the residual lse and delta = Σ_P o·do [B, H, T] fp32
-> dq [B, T, H, P] in q.dtype), chosen by `BlockSizes.dq_impl`. Why: it is faster than the Triton dq kernel
on the H100 (docs/window_attention_notes.md, v7).

One CTA per (head, pair of query blocks, batch), three warpgroups as in the forward:
  - wg 2, the producer: streams the band's key / value blocks through `stages` shared-memory slots with
    TMA, and the chunk's memory keys / values / validity bias once;
  - wg 0 and 1, the consumers: block_q query rows each, with their q, do, lse and delta resident. Per key
    block, s = q·kᵀ and dp = do·vᵀ (two wgmmas issued together), p = exp2(s·scale - lse),
    ds = p ⊙ (dp - delta), dq += ds·k (a third). The two consumers run unsynchronized: a schedule barrier
    that made them take turns on the tensor cores, as the forward's does, was no faster (v7's sweeps).
No online softmax: lse is known, so every tile's p is final and the order of the key blocks is free. The
memory term is one more tile, first. A masked logit is NEG_INF, so p, ds and its share of dq are exactly 0.
Packed rows (seg_lo) and memory spans are masked as in `forward_mosaic.py`: the band and each consumer's
unmasked run shrink by two scalar loads of seg_lo, the masked body adds key >= seg_lo[row], and the memory
tile compares the rows' chunk offsets with the slots' spans instead of adding the bias.

Limits (`mosaic_dq_unsupported`): those of the Mosaic forward, with this kernel's shared memory; compiled
only (no interpret mode: see `forward_mosaic.py` for what the jax 0.10 interpreter does with these kernels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from bmojo_jax.pallas_kernels.window_attention.blocks import (BlockSizes, fully_visible_key_blocks, in_span,
                                                    key_band, split_range, visible)
from bmojo_jax.pallas_kernels.window_attention.mosaic_common import (CONSUMERS, SMEM_BYTES, check_padded, dots_nn_acc,
                                                           dots_nt, load_vector, memory_mask, memory_mask_smem,
                                                           mosaic_layout_unsupported, packed_smem_bytes,
                                                           produce_band, slot_of, smem_tiling,
                                                           wait_next)
from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF


def dq_smem_bytes(blocks: BlockSizes, head_dim: int, n_mem: int, itemsize: int = 2, segments: bool = False,
                  span: bool = False) -> int:
  """Shared memory of one CTA: q/dq and do tiles, key/value slots, memory tiles and bias (or spans),
  lse/delta rows (and seg_lo rows)."""
  tiles = (2 * CONSUMERS * blocks.block_q_mosaic + 2 * blocks.num_stages_bwd_mosaic * blocks.block_k_dq_mosaic
           + 2 * n_mem) * head_dim * itemsize
  return (tiles + 4 * (n_mem + 2 * CONSUMERS * blocks.block_q_mosaic) + 4096     # + barriers, alignment
          + packed_smem_bytes(blocks, n_mem, segments, span))


def mosaic_dq_unsupported(dtype, head_dim: int, chunk: int, n_mem: int, blocks: BlockSizes,
                          segments: bool = False, span: bool = False) -> str | None:
  """Why the Mosaic dq kernel cannot run these (padded) shapes, or None when it can."""
  if why := mosaic_layout_unsupported(dtype, head_dim, chunk, n_mem, blocks, blocks.block_k_dq_mosaic):
    return why
  if (need := dq_smem_bytes(blocks, head_dim, n_mem, segments=segments, span=span)) > SMEM_BYTES:
    return (f"{need} bytes of shared memory at M={n_mem}, P={head_dim}, block_k_dq_mosaic="
            f"{blocks.block_k_dq_mosaic} (the H100 has {SMEM_BYTES})")
  return None


def dq_mosaic(q, k, v, mem_k, mem_v, mem_valid, seg_lo, mem_span, do, lse, delta, *, scale: float,
              qk_scale: float, window: int | None, chunk: int, blocks: BlockSizes):
  """Padded inputs (T a multiple of blocks.pad_multiple, M of 64), lse, delta [B, H, T] -> dq."""
  b, t, h, p = q.shape
  g = h // k.shape[2]
  dtype = q.dtype
  bq, bk, stages = blocks.block_q_mosaic, blocks.block_k_dq_mosaic, blocks.num_stages_bwd_mosaic
  has_mem = mem_k is not None
  has_seg, has_span = seg_lo is not None, mem_span is not None
  n_mem = mem_k.shape[2] if has_mem else 0
  if reason := mosaic_dq_unsupported(dtype, p, chunk, n_mem, blocks, segments=has_seg, span=has_span):
    raise ValueError(f"dq_impl='mosaic' cannot run {reason}")
  rows = CONSUMERS * bq
  check_padded(t, rows, bk)
  n_k = t // bk
  n_chunks = mem_k.shape[1] if has_mem else 1
  wgmma_layout, row_layout = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)

  def kernel(*refs):
    q_ref, k_ref, v_ref, *refs = refs
    mk_ref = mv_ref = bias_ref = seg_ref = None     # bias_ref: the bias [B, C, M] or the spans [B, C, 2, M]
    if has_mem:
      mk_ref, mv_ref, bias_ref, *refs = refs
    if has_seg:
      seg_ref, *refs = refs
    do_ref, lse_ref, delta_ref, dq_ref, *scratch = refs
    (q_smem, do_smem, rows_smem, k_smem, v_smem, mk_smem, mv_smem, bias_smem, seg_smem), own, arrived, consumed, \
        mem_arrived = scratch
    k_barriers, v_barriers = arrived
    k_consumed, v_consumed = consumed
    bi, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    cta_q = lax.axis_index("q_pairs") * rows
    seg_first = seg_ref[bi, cta_q] if has_seg else None  # keys before it are invisible to every row
    lo, hi = key_band(cta_q, rows, bk, window, n_k, seg_first)   # the CTA's band; both consumers walk all of it
    n_steps = hi - lo
    kv_head = lax.div(head, jnp.array(g, head.dtype))
    mem_chunk = jnp.minimum(lax.div(cta_q, chunk), n_chunks - 1)

    @pl.when(wg == CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      memory = (mk_ref, mv_ref, bias_ref, mk_smem, mv_smem, bias_smem, mem_arrived, mem_chunk) if has_mem else None
      produce_band(bi, kv_head, lo, n_steps, bk, stages, ((k_ref, k_smem, k_barriers, k_consumed),
                                                          (v_ref, v_smem, v_barriers, v_consumed)), memory)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
      q0 = cta_q + wg * bq
      rows_at = (bi, head, pl.ds(q0, bq))
      copies = ((q_ref.at[bi, pl.ds(q0, bq), head], q_tile), (do_ref.at[bi, pl.ds(q0, bq), head], do_tile),
                (lse_ref.at[rows_at], rows_smem.at[wg, 0]), (delta_ref.at[rows_at], rows_smem.at[wg, 1]))
      if has_seg:
        copies += ((seg_ref.at[bi, pl.ds(q0, bq)], seg_smem.at[wg]),)
      for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, own.at[wg * len(copies) + i])
      for i in range(len(copies)):
        plgpu.barrier_wait(own.at[wg * len(copies) + i])
      lse = load_vector(rows_smem.at[wg, 0], row_layout)
      delta = load_vector(rows_smem.at[wg, 1], row_layout)
      q_seg_lo = load_vector(seg_smem.at[wg], row_layout) if has_seg else None   # [bq]: a few registers

      def grad_logits(s, dp, masked_by=None, bias=None):
        """ds [bq, Y] bf16 from s = q·kᵀ (unscaled) and dp = do·vᵀ; masked_by: visible [bq, Y] or None."""
        s = s * qk_scale
        if bias is not None:
          s = s + bias
        if masked_by is not None:
          s = jnp.where(masked_by, s, NEG_INF)
        pr = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
        return (pr * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))).astype(dtype)

      dq = plgpu.layout_cast(jnp.zeros((bq, p), jnp.float32), wgmma_layout)
      if has_mem:
        for i in range(3):
          plgpu.barrier_wait(mem_arrived.at[i])
        s, dp = dots_nt(((q_tile, mk_smem), (do_tile, mv_smem)), (bq, n_mem))
        if has_span:   # slot m visible from the rows whose chunk offset lies in [span[0, m], span[1, m])
          offset = q0 - mem_chunk * chunk + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=wgmma_layout)
          span_lo, span_hi = (lax.broadcast_in_dim(load_vector(bias_smem.at[i], wgmma_layout.reduce(0)), s.shape,
                                                   [1]) for i in (0, 1))
          ds = grad_logits(s, dp, masked_by=in_span(span_lo, span_hi, offset))
        else:
          bias = lax.broadcast_in_dim(load_vector(bias_smem, wgmma_layout.reduce(0)), s.shape, [1])
          ds = grad_logits(s, dp, bias=bias)
        [dq] = dots_nn_acc(((dq, ds, mk_smem),), lambda: None)

      plgpu.barrier_wait(k_barriers.at[0])

      def step_body(j, dq, masked: bool):
        step = j - lo
        slot = slot_of(step, stages)
        plgpu.barrier_wait(v_barriers.at[slot])
        s, dp = dots_nt(((q_tile, k_smem.at[slot]), (do_tile, v_smem.at[slot])), (bq, bk))
        plgpu.barrier_arrive(v_consumed.at[slot])
        vis = None
        if masked:
          iota = lambda d: plgpu.broadcasted_iota(jnp.int32, (bq, bk), d, layout=wgmma_layout)
          seg = None if q_seg_lo is None else lax.broadcast_in_dim(q_seg_lo, (bq, bk), [0])
          vis = visible(q0 + iota(0), j * bk + iota(1), window, q_seg_lo=seg)
        ds = grad_logits(s, dp, vis)
        [dq] = dots_nn_acc(((dq, ds, k_smem.at[slot]),), wait_next(k_barriers, step, n_steps, stages))
        plgpu.barrier_arrive(k_consumed.at[slot])
        return dq

      seg_last = seg_ref[bi, q0 + bq - 1] if has_seg else None
      x, y = split_range(lo, hi, *fully_visible_key_blocks(q0, bq, bk, window, seg_last))
      for start, stop, masked in ((lo, x, True), (x, y, False), (y, hi, True)):
        dq = lax.fori_loop(start, stop, functools.partial(step_body, masked=masked), dq)

      q_tile[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[bi, pl.ds(q0, bq), head])
      plgpu.wait_smem_to_gmem(0)

  tiled = smem_tiling(dtype)
  smem = (
      plgpu.SMEM((CONSUMERS, bq, p), dtype, **tiled),                 # q, then dq
      plgpu.SMEM((CONSUMERS, bq, p), dtype, **tiled),                 # do
      plgpu.SMEM((CONSUMERS, 2, bq), jnp.float32),                    # lse, delta rows
      plgpu.SMEM((stages, bk, p), dtype, **tiled),                    # key slots
      plgpu.SMEM((stages, bk, p), dtype, **tiled),                    # value slots
      plgpu.SMEM((n_mem, p), dtype, **tiled) if has_mem else None,    # chunk memory keys
      plgpu.SMEM((n_mem, p), dtype, **tiled) if has_mem else None,    # chunk memory values
      memory_mask_smem(n_mem, has_span) if has_mem else None,         # bias or spans per memory slot
      plgpu.SMEM((CONSUMERS, bq), jnp.int32) if has_seg else None,    # seg_lo rows
  )
  scratch = (
      smem,
      plgpu.Barrier(num_barriers=CONSUMERS * (5 if has_seg else 4)),  # q, do, lse, delta (seg_lo) per consumer
      (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
      (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),) * 2,
      plgpu.Barrier(num_barriers=3) if has_mem else None,
  )
  args = [q, k, v]
  if has_mem:
    args += [mem_k, mem_v, memory_mask(mem_valid, mem_span)]
  if has_seg:
    args.append(seg_lo)
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=scratch,
      grid=(h, t // rows, b),
      grid_names=("heads", "q_pairs", "batch"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=blocks.fast_math),
  )(*args, do, lse, delta)
