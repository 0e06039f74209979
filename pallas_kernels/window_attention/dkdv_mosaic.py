"""dk/dv kernel for Hopper through Pallas' Mosaic GPU lowering: warp-specialized like `dq_mosaic.py`.

Same contract as `backward.dkdv_kernel` (padded q, do [B, T, H, P], k, v [B, T, K, P], lse and delta [B, H, T]
fp32 -> dk, dv [B, T, K, P]), chosen by `BlockSizes.dkdv_impl`. The memory's dk/dv stay in the Triton
`dmem_kernel`. Works transposed (keys on rows), as the Triton kernel does.

One CTA per (kv head, pair of key blocks, batch), three warpgroups:
  - wg 2, the producer: for each of the group's G query heads, streams the query blocks whose window holds
    the CTA's keys (q, do and the lse/delta rows) through `stages` shared-memory slots with TMA;
  - wg 0 and 1, the consumers: block_q_mosaic keys each, with their k and v resident. Per query block,
    sᵀ = k·qᵀ and dpᵀ = v·doᵀ (two wgmmas issued together), pᵀ = exp2(sᵀ·scale - lse), dsᵀ = pᵀ ⊙ (dpᵀ -
    delta), then dv += pᵀ·do and dk += dsᵀ·q (two more). The consumers run unsynchronized, as in
    `dq_mosaic.py`.
A masked logit is NEG_INF, so pᵀ, dsᵀ and their shares of dk and dv are exactly 0.
Packed rows (seg_hi [B, T] int32, see `blocks.py`): the query band ends at the last key's segment end and
each consumer's unmasked run at its first key's (scalar loads from global memory); each consumer copies its
keys' seg_hi once and its masked body adds query <= seg_hi[key].

Limits (`mosaic_dkdv_unsupported`): bf16 or f16, P a multiple of 64; compiled only (see `dq_mosaic.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from bmojo_jax.pallas_kernels.window_attention.blocks import (BlockSizes, fully_visible_query_blocks, query_band,
                                                    split_range, visible)
from bmojo_jax.pallas_kernels.window_attention.mosaic_common import (CONSUMERS, SMEM_BYTES, check_padded, dots_nn_acc,
                                                           dots_nt, load_vector, mosaic_layout_unsupported,
                                                           slot_of, smem_tiling, wait_next)
from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF


def dkdv_smem_bytes(blocks: BlockSizes, head_dim: int, itemsize: int = 2, segments: bool = False) -> int:
  """Shared memory of one CTA: k/dk and v/dv tiles, the q/do slots and the lse/delta rows (and the keys'
  seg_hi)."""
  tiles = 2 * (CONSUMERS * blocks.block_q_mosaic + blocks.num_stages_bwd_mosaic * blocks.block_q_dkv_mosaic)
  return (tiles * head_dim * itemsize + 4 * 2 * blocks.num_stages_bwd_mosaic * blocks.block_q_dkv_mosaic + 4096
          + 4 * CONSUMERS * blocks.block_q_mosaic * segments)


def mosaic_dkdv_unsupported(dtype, head_dim: int, chunk: int, n_mem: int, blocks: BlockSizes,
                            segments: bool = False, span: bool = False) -> str | None:
  """Why the Mosaic dk/dv kernel cannot run these (padded) shapes, or None when it can (memory is not read)."""
  del n_mem, span
  if why := mosaic_layout_unsupported(dtype, head_dim, chunk, 0, blocks, blocks.block_q_dkv_mosaic):
    return why
  if (need := dkdv_smem_bytes(blocks, head_dim, segments=segments)) > SMEM_BYTES:
    return f"{need} bytes of shared memory at P={head_dim} (the H100 has {SMEM_BYTES})"
  return None


def dkdv_mosaic(q, k, v, do, lse, delta, seg_hi=None, *, scale: float, qk_scale: float, window: int | None,
                blocks: BlockSizes):
  """Padded inputs (T a multiple of blocks.pad_multiple), lse, delta [B, H, T], seg_hi [B, T] or None ->
  (dk, dv)."""
  b, t, h, p = q.shape
  kh = k.shape[2]
  g = h // kh
  dtype = q.dtype
  bk, bq, stages = blocks.block_q_mosaic, blocks.block_q_dkv_mosaic, blocks.num_stages_bwd_mosaic
  has_seg = seg_hi is not None
  if reason := mosaic_dkdv_unsupported(dtype, p, 1, 0, blocks, segments=has_seg):
    raise ValueError(f"dkdv_impl='mosaic' cannot run {reason}")
  rows = CONSUMERS * bk
  check_padded(t, rows, bq)
  n_q = t // bq
  wgmma_layout, col_layout = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(0)

  def kernel(*refs):
    q_ref, k_ref, v_ref, do_ref, stats_ref, *refs = refs
    seg_ref = None
    if has_seg:
      seg_ref, *refs = refs
    dk_ref, dv_ref, smem, own, arrived, consumed = refs
    k_smem, v_smem, q_smem, do_smem, stats_smem, seg_smem = smem
    q_arrived, do_arrived, stats_arrived = arrived
    bi, kv_head, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    cta_k = lax.axis_index("k_pairs") * rows
    seg_last = seg_ref[bi, cta_k + rows - 1] if has_seg else None   # no query after it sees these keys
    lo, hi = query_band(cta_k, rows, bq, window, n_q, seg_last)  # the CTA's band; both consumers walk all of it
    n_steps = hi - lo

    @pl.when(wg == CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, g * n_steps)
      def _stream(step):
        slot = slot_of(step, stages)
        gi = lax.div(step, n_steps)
        i = lo + step - gi * n_steps
        head = kv_head * g + gi

        @pl.when(step >= stages)
        def _wait_free():
          plgpu.barrier_wait(consumed.at[slot])
        block = (bi, pl.ds(i * bq, bq), head)
        plgpu.copy_gmem_to_smem(q_ref.at[block], q_smem.at[slot], q_arrived.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[block], do_smem.at[slot], do_arrived.at[slot])
        plgpu.copy_gmem_to_smem(stats_ref.at[bi, head, :, pl.ds(i * bq, bq)], stats_smem.at[slot],
                                stats_arrived.at[slot])

    @pl.when(wg < CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
      k0 = cta_k + wg * bk
      copies = ((k_ref.at[bi, pl.ds(k0, bk), kv_head], k_tile), (v_ref.at[bi, pl.ds(k0, bk), kv_head], v_tile))
      if has_seg:
        copies += ((seg_ref.at[bi, pl.ds(k0, bk)], seg_smem.at[wg]),)
      for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, own.at[wg * len(copies) + i])
      for i in range(len(copies)):
        plgpu.barrier_wait(own.at[wg * len(copies) + i])
      k_seg_hi = load_vector(seg_smem.at[wg], wgmma_layout.reduce(1)) if has_seg else None   # [bk]: few registers
      plgpu.barrier_wait(q_arrived.at[0])

      def step_body(i, carry, gi: int, masked: bool):
        dk, dv = carry
        step = gi * n_steps + i - lo
        slot = slot_of(step, stages)
        plgpu.barrier_wait(do_arrived.at[slot])
        s, dp = dots_nt(((k_tile, q_smem.at[slot]), (v_tile, do_smem.at[slot])), (bk, bq))   # [bk, bq]
        plgpu.barrier_wait(stats_arrived.at[slot])
        lse = lax.broadcast_in_dim(load_vector(stats_smem.at[slot, 0], col_layout), s.shape, [1])
        delta = lax.broadcast_in_dim(load_vector(stats_smem.at[slot, 1], col_layout), s.shape, [1])
        s = s * qk_scale
        if masked:
          iota = lambda d: plgpu.broadcasted_iota(jnp.int32, (bk, bq), d, layout=wgmma_layout)
          seg = None if k_seg_hi is None else lax.broadcast_in_dim(k_seg_hi, (bk, bq), [0])
          s = jnp.where(visible(i * bq + iota(1), k0 + iota(0), window, k_seg_hi=seg), s, NEG_INF)
        pr = jnp.exp2(s - lse)
        ds = pr * (dp - delta)
        pr, ds = pr.astype(dtype), ds.astype(dtype)
        dv, dk = dots_nn_acc(((dv, pr, do_smem.at[slot]), (dk, ds, q_smem.at[slot])),
                             wait_next(q_arrived, step, g * n_steps, stages))
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

      zeros = plgpu.layout_cast(jnp.zeros((bk, p), jnp.float32), wgmma_layout)
      carry = (zeros, zeros)
      seg_first = seg_ref[bi, k0] if has_seg else None
      x, y = split_range(lo, hi, *fully_visible_query_blocks(k0, bk, bq, window, n_q, seg_first))
      for gi in range(g):       # static: G is small
        for start, stop, masked in ((lo, x, True), (x, y, False), (y, hi, True)):
          carry = lax.fori_loop(start, stop, functools.partial(step_body, gi=gi, masked=masked), carry)
      dk, dv = carry

      k_tile[...] = (dk * scale).astype(dtype)
      v_tile[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[bi, pl.ds(k0, bk), kv_head])
      plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[bi, pl.ds(k0, bk), kv_head])
      plgpu.wait_smem_to_gmem(0)

  tiled = smem_tiling(dtype)
  smem = (
      plgpu.SMEM((CONSUMERS, bk, p), dtype, **tiled),                 # k, then dk
      plgpu.SMEM((CONSUMERS, bk, p), dtype, **tiled),                 # v, then dv
      plgpu.SMEM((stages, bq, p), dtype, **tiled),                    # query slots
      plgpu.SMEM((stages, bq, p), dtype, **tiled),                    # do slots
      plgpu.SMEM((stages, 2, bq), jnp.float32),                       # lse, delta rows
      plgpu.SMEM((CONSUMERS, bk), jnp.int32) if has_seg else None,    # the keys' seg_hi
  )
  scratch = (
      smem,
      plgpu.Barrier(num_barriers=CONSUMERS * (3 if has_seg else 2)),  # k, v (seg_hi) per consumer
      tuple(plgpu.Barrier(num_barriers=stages) for _ in range(3)),    # q, do, rows arrived per slot
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),     # slot consumed by both consumers
  )
  stats = jnp.stack([lse, delta], axis=2)                           # [B, H, 2, T]
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
      scratch_types=scratch,
      grid=(kh, t // rows, b),
      grid_names=("kv_heads", "k_pairs", "batch"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=blocks.fast_math),
  )(q, k, v, do, stats, *([seg_hi] if has_seg else []))
