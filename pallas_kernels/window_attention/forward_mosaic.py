"""Forward kernel for Hopper through Pallas' Mosaic GPU lowering: warp-specialized, FlashAttention-3 style.

Same contract as `forward.py` (padded inputs -> o [B, T, H, P] in q.dtype and the base-2 logsumexp lse
[B, H, T] fp32), chosen by `BlockSizes.forward_impl` (resolved in `ops.resolve_impls`). Why a second forward:
the Triton lowering cannot overlap the softmax of one tile with the matmuls of another, and the forward
sat between wgmmas, 37% of issue slots busy (docs/window_attention_notes.md).

One CTA per (head, pair of query blocks, batch) runs three warpgroups (`wg`):
  - wg 2, the producer: streams the band's key / value blocks [lo, hi) through `stages` shared-memory slots
    with TMA, and the chunk's memory keys / values / validity bias once, then waits for consumed slots;
  - wg 0 and 1, the consumers: block_q query rows each. They take turns on the tensor cores (the schedule
    barrier): while one runs its q·kᵀ and p·v wgmmas, the other does its softmax.
Both consumers walk the CTA's whole band so that every barrier sees both arrivals; a block that a
consumer's rows do not all fully see goes through the masked body (`fully_visible_key_blocks`). The
memory logits open the online softmax and the diagonal block closes it, as in `forward.py`: a row whose
memory is all invalid (p = 1 on NEG_INF logits) is repaired by the rescaling once it meets its own key.

Packed rows (seg_lo [B, T] int32, see `blocks.py`): the band starts at the block of the CTA's first row's
segment start and each consumer's unmasked run at its last row's (two scalar loads from global memory);
each consumer copies its rows' seg_lo once and its masked body adds key >= seg_lo[row]. mem_span (in place
of mem_valid, [B, C, 2, M] int32, validity folded in) replaces the per-slot bias: the memory prologue
compares the rows' offsets in their chunk, from an iota in the wgmma layout, with the slots' spans.

Limits (`mosaic_forward_unsupported` names the first one hit): bf16 or f16; P a multiple of 64; memory only
when the CTA's 2·block_q rows lie in one chunk, with M a multiple of 64 (ops.py pads it) and the tiles in
shared memory.

Interpret mode (CPU, `interpret=True`) runs the same producer, barriers, slots and masks on the Mosaic GPU
interpreter, with the two matmuls as jnp dots and no tiling/swizzle: the jax 0.10 interpreter has neither
transposed wgmma operands nor `layout_cast`. The interpreter runs each warpgroup as a thread that blocks in
a host callback while it waits on a barrier, and XLA's CPU client executes at most NPROC (default: the core
count) of them at once, so on a 2-core machine two waiting threads starve the ones they wait for (it
"deadlocks", nondeterministically). With NPROC=32 in the environment before jax starts it runs every time
(bf16 rel. err. ~2e-3); it then refuses (ValueError "did not observe all phases") a CTA band of more than
num_stages_mosaic key tiles, because the producer does not wait for its slots' last releases. So the tests
run `cases.MOSAIC_INTERPRET_CASES` (small bands) interpreted, in a subprocess with NPROC=32
(`test_mosaic_forward_interpreted`), and the other Mosaic cases compiled only (on Hopper).
"""

from __future__ import annotations

import functools
import math

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


def smem_bytes(blocks: BlockSizes, head_dim: int, n_mem: int, itemsize: int = 2, segments: bool = False,
               span: bool = False) -> int:
  """Shared memory of one CTA: q/o tiles, the key/value slots, the memory tiles and bias (or spans), the lse
  rows (and the rows' seg_lo)."""
  tiles = (CONSUMERS * blocks.block_q_mosaic + 2 * blocks.num_stages_mosaic * blocks.block_k_mosaic
           + 2 * n_mem) * head_dim * itemsize
  # + barriers and alignment: Mosaic asked for 233,584 bytes at M=128, P=128 where the tiles and vectors
  # come to 230,400 (H100, jax 0.11.2), so M=128 does not fit and takes the Triton forward
  return (tiles + 4 * (n_mem + CONSUMERS * blocks.block_q_mosaic) + 4096
          + packed_smem_bytes(blocks, n_mem, segments, span))


def mosaic_forward_unsupported(dtype, head_dim: int, chunk: int, n_mem: int, blocks: BlockSizes,
                               segments: bool = False, span: bool = False) -> str | None:
  """Why the Mosaic forward cannot run these (padded) shapes, or None when it can."""
  if why := mosaic_layout_unsupported(dtype, head_dim, chunk, n_mem, blocks, blocks.block_k_mosaic):
    return why
  if (need := smem_bytes(blocks, head_dim, n_mem, segments=segments, span=span)) > SMEM_BYTES:
    return f"{need} bytes of shared memory at M={n_mem}, P={head_dim} (the H100 has {SMEM_BYTES})"
  return None


class _Ops:
  """The few operations whose compiled and interpreted forms differ (see the module docstring)."""

  def __init__(self, interpret: bool):
    self.interpret = interpret

  def layout(self, x, layout):
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def iota(self, shape, dim):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

  def load_columns(self, ref):
    """[N] fp32 (or int32) vector from SMEM, laid out to broadcast along the rows of a [bq, N] wgmma tile."""
    return ref[...] if self.interpret else load_vector(ref, plgpu.Layout.WGMMA.reduce(0))

  def load_rows(self, ref):
    """[bq] vector from SMEM, laid out to broadcast along the columns of a [bq, N] wgmma tile."""
    return ref[...] if self.interpret else load_vector(ref, plgpu.Layout.WGMMA.reduce(1))

  def dot_nt(self, a_ref, b_ref, shape, while_running):
    """a_ref [X, P] · b_ref [Y, P]ᵀ -> [X, Y] fp32; while_running() is issued while the wgmma runs."""
    if self.interpret:
      out = lax.dot_general(a_ref[...], b_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
      while_running()
      return out
    return dots_nt(((a_ref, b_ref),), shape, while_running)[0]

  def dot_nn_acc(self, acc, a, b_ref, while_running):
    """acc [X, P] + a [X, Y] · b_ref [Y, P] (fp32 accumulate); while_running() as in `dot_nt`."""
    if self.interpret:
      out = acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32)
      while_running()
      return out
    return dots_nn_acc(((acc, a, b_ref),), while_running)[0]


def forward_mosaic(q, k, v, mem_k, mem_v, mem_valid, seg_lo, mem_span, *, qk_scale: float, window: int | None,
                   chunk: int, blocks: BlockSizes, interpret: bool):
  """Padded inputs (see `forward.py`; T a multiple of blocks.pad_multiple, M of 64) -> (o, lse)."""
  b, t, h, p = q.shape
  kh = k.shape[2]
  g = h // kh
  dtype = q.dtype
  bq, bk, stages = blocks.block_q_mosaic, blocks.block_k_mosaic, blocks.num_stages_mosaic
  has_mem = mem_k is not None
  has_seg, has_span = seg_lo is not None, mem_span is not None
  n_mem = mem_k.shape[2] if has_mem else 0
  if reason := mosaic_forward_unsupported(dtype, p, chunk, n_mem, blocks, segments=has_seg, span=has_span):
    raise ValueError(f"forward_impl='mosaic' cannot run {reason}")
  rows = CONSUMERS * bq
  check_padded(t, rows, bk)
  n_k = t // bk
  n_chunks = mem_k.shape[1] if has_mem else 1
  ops = _Ops(interpret)
  wgmma_layout = None if interpret else plgpu.Layout.WGMMA
  row_layout = None if interpret else plgpu.Layout.WGMMA.reduce(1)

  def kernel(*refs):
    q_ref, k_ref, v_ref, *refs = refs
    mk_ref = mv_ref = bias_ref = seg_ref = None     # bias_ref: the bias [B, C, M] or the spans [B, C, 2, M]
    if has_mem:
      mk_ref, mv_ref, bias_ref, *refs = refs
    if has_seg:
      seg_ref, *refs = refs
    o_ref, lse_ref, *scratch = refs
    ((qo_smem, k_smem, v_smem, lse_smem, mk_smem, mv_smem, bias_smem, seg_smem), arrived, consumed, mem_arrived,
     sched) = scratch
    q_barriers, k_barriers, v_barriers, seg_barriers = arrived
    k_consumed, v_consumed = consumed
    bi, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    cta_q = lax.axis_index("q_pairs") * rows
    seg_first = seg_ref[bi, cta_q] if has_seg else None  # keys before it are invisible to every row
    lo, hi = key_band(cta_q, rows, bk, window, n_k, seg_first)   # the CTA's band; both consumers walk all of it
    n_steps = hi - lo
    kv_head = lax.div(head, jnp.array(g, head.dtype))
    mem_chunk = jnp.minimum(lax.div(cta_q, chunk), n_chunks - 1)

    def schedule():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg == CONSUMERS)
    def _producer():
      if not interpret:
        plgpu.set_max_registers(40, action="decrease")
      memory = (mk_ref, mv_ref, bias_ref, mk_smem, mv_smem, bias_smem, mem_arrived, mem_chunk) if has_mem else None
      produce_band(bi, kv_head, lo, n_steps, bk, stages, ((k_ref, k_smem, k_barriers, k_consumed),
                                                          (v_ref, v_smem, v_barriers, v_consumed)), memory)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      if not interpret:
        plgpu.set_max_registers(232, action="increase")
      qo = qo_smem.at[wg]
      q0 = cta_q + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, bq), head], qo, q_barriers.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(seg_ref.at[bi, pl.ds(q0, bq)], seg_smem.at[wg], seg_barriers.at[wg])
      plgpu.barrier_wait(q_barriers.at[wg])

      if has_mem:
        for i in range(3):
          plgpu.barrier_wait(mem_arrived.at[i])
        s = ops.dot_nt(qo, mk_smem, (bq, n_mem), lambda: None)
        if has_span:   # slot m visible from the rows whose chunk offset lies in [span[0, m], span[1, m])
          offset = q0 - mem_chunk * chunk + ops.iota((bq, n_mem), 0)
          span_lo, span_hi = (lax.broadcast_in_dim(ops.load_columns(bias_smem.at[i]), s.shape, [1]) for i in (0, 1))
          s = jnp.where(in_span(span_lo, span_hi, offset), s * qk_scale, NEG_INF)
        else:
          s = s * qk_scale + lax.broadcast_in_dim(ops.load_columns(bias_smem), s.shape, [1])
        m_i = s.max(axis=1)
        pm = jnp.exp2(s - lax.broadcast_in_dim(m_i, s.shape, [0]))
        l_i = pm.sum(axis=1)
        acc = ops.dot_nn_acc(ops.layout(jnp.zeros((bq, p), jnp.float32), wgmma_layout), pm.astype(dtype),
                             mv_smem, lambda: None)
      else:
        m_i = ops.layout(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
        l_i = ops.layout(jnp.zeros((bq,), jnp.float32), row_layout)
        acc = ops.layout(jnp.zeros((bq, p), jnp.float32), wgmma_layout)

      q_seg_lo = None
      if has_seg:
        plgpu.barrier_wait(seg_barriers.at[wg])
        q_seg_lo = ops.load_rows(seg_smem.at[wg])            # [bq] in the row layout: a few registers
      plgpu.barrier_wait(k_barriers.at[0])
      pl.when(wg == 1)(schedule)                              # start half a step behind consumer 0

      def step_body(j, carry, masked: bool):
        acc, m_i, l_i = carry
        step = j - lo
        slot = slot_of(step, stages)
        qk = ops.dot_nt(qo, k_smem.at[slot], (bq, bk), schedule)
        plgpu.barrier_arrive(k_consumed.at[slot])
        # base-2 softmax, m in scaled units. Unmasked tiles fold the scale into one FMA per logit. Masked
        # tiles scale first and then select NEG_INF, so that a row with no visible key gets exactly
        # NEG_INF - NEG_INF = 0 (p = 1, repaired later): an FMA of NEG_INF · scale - m leaves m's rounding
        # error, up to ~1e22, and exp2 of that is inf.
        scale = qk_scale
        if masked:
          seg = None if q_seg_lo is None else lax.broadcast_in_dim(q_seg_lo, (bq, bk), [0])
          vis = visible(q0 + ops.iota((bq, bk), 0), j * bk + ops.iota((bq, bk), 1), window, q_seg_lo=seg)
          qk, scale = jnp.where(vis, qk * qk_scale, NEG_INF), 1.0
        m_new = jnp.maximum(m_i, qk.max(axis=1) * scale)
        alpha = jnp.exp2(m_i - m_new)
        pk = jnp.exp2(qk * scale - lax.broadcast_in_dim(m_new, qk.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + pk.sum(axis=1)
        p16 = pk.astype(dtype)
        # keep the softmax before the hand-off: the other consumer's matmuls run while this one finishes
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_arrive(sched)                           # done with the softmax
        plgpu.barrier_wait(v_barriers.at[slot])
        plgpu.barrier_wait(sched)                             # the tensor cores are ours

        acc = ops.dot_nn_acc(acc, p16, v_smem.at[slot], wait_next(k_barriers, step, n_steps, stages))
        plgpu.barrier_arrive(v_consumed.at[slot])
        return acc, m_new, l_i

      seg_last = seg_ref[bi, q0 + bq - 1] if has_seg else None
      x, y = split_range(lo, hi, *fully_visible_key_blocks(q0, bq, bk, window, seg_last))
      carry = (acc, m_i, l_i)
      for start, stop, masked in ((lo, x, True), (x, y, False), (y, hi, True)):
        carry = lax.fori_loop(start, stop, functools.partial(step_body, masked=masked), carry)
      acc, m_i, l_i = carry
      pl.when(wg == 0)(schedule)

      qo[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(dtype)
      lse_smem.at[wg][...] = m_i + jnp.log(l_i) * (1.0 / math.log(2.0))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo, o_ref.at[bi, pl.ds(q0, bq), head])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, head, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)

  tiled = {} if interpret else smem_tiling(dtype)
  smem = (
      plgpu.SMEM((CONSUMERS, bq, p), dtype, **tiled),                 # q, then o
      plgpu.SMEM((stages, bk, p), dtype, **tiled),                    # key slots
      plgpu.SMEM((stages, bk, p), dtype, **tiled),                    # value slots
      plgpu.SMEM((CONSUMERS, bq), jnp.float32),                       # lse rows
      plgpu.SMEM((n_mem, p), dtype, **tiled) if has_mem else None,    # chunk memory keys
      plgpu.SMEM((n_mem, p), dtype, **tiled) if has_mem else None,    # chunk memory values
      memory_mask_smem(n_mem, has_span) if has_mem else None,         # bias or spans per memory slot
      plgpu.SMEM((CONSUMERS, bq), jnp.int32) if has_seg else None,    # seg_lo rows
  )
  scratch = (
      smem,
      (plgpu.Barrier(num_barriers=CONSUMERS), plgpu.Barrier(num_barriers=stages),
       plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=CONSUMERS) if has_seg else None),
      (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),) * 2,
      plgpu.Barrier(num_barriers=3) if has_mem else None,
      plgpu.Barrier(num_arrivals=CONSUMERS),
  )
  args = [q, k, v]
  if has_mem:
    args += [mem_k, mem_v, memory_mask(mem_valid, mem_span)]
  if has_seg:
    args.append(seg_lo)
  kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    kwargs["interpret"] = InterpretGPUParams()
  o, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      scratch_types=scratch,
      grid=(h, t // rows, b),
      grid_names=("heads", "q_pairs", "batch"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=blocks.fast_math),
      **kwargs,
  )(*args)
  return o, lse
