"""What the three Mosaic GPU kernels (`forward_mosaic.py`, `dq_mosaic.py`, `dkdv_mosaic.py`) share.

The CTA layout (CONSUMERS compute warpgroups and one producer), the limits they check (`mosaic_layout_unsupported`,
`check_padded`, SMEM_BYTES), their shared-memory layouts (`smem_tiling`, the memory mask), the producer loop of
the forward and the dq kernel (`produce_band`), the slot arithmetic of the streamed tiles (`slot_of`,
`wait_next`) and the wgmma helpers. Shapes as in `forward.py` (padded).
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax import lax

from bmojo_jax.pallas_kernels.window_attention.blocks import BlockSizes
from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF

CONSUMERS = 2                    # compute warpgroups per CTA; wg index CONSUMERS is the producer
SMEM_BYTES = 227 * 1024          # H100 / H200 shared memory per CTA
_SWIZZLE_BYTES = 128


def packed_smem_bytes(blocks: BlockSizes, n_mem: int, segments: bool, span: bool) -> int:
  """What segments (each consumer's seg_lo rows, int32) and spans (a second int32 per memory slot on top of
  the bias's one) add to the forward's or the dq kernel's shared memory."""
  return 4 * (CONSUMERS * blocks.block_q_mosaic * segments + n_mem * span)


MAX_COPY_ROWS = 256   # TMA: at most 256 elements along each dimension of one copy


def mosaic_layout_unsupported(dtype, head_dim: int, chunk: int, n_mem: int, blocks: BlockSizes,
                              block_k: int) -> str | None:
  """What the Mosaic kernels share: dtype, tiles, memory (block_k: the kernel's streamed tile)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype)} (the Mosaic kernels take bf16 or f16)"
  if head_dim % 64:
    return f"head_dim {head_dim} (the Mosaic kernels need a multiple of 64)"
  if blocks.block_q_mosaic != 64 or block_k % 64:
    return (f"block_q_mosaic {blocks.block_q_mosaic} / key tile {block_k} (one wgmma row block of 64 per "
            "consumer; key tiles a multiple of 64)")
  if n_mem and chunk % (CONSUMERS * blocks.block_q_mosaic):
    return f"chunk {chunk} with memory (both consumers of a CTA must read one chunk: a multiple of 128)"
  if n_mem > MAX_COPY_ROWS:
    return (f"M={n_mem} memory slots (a chunk's memory is loaded by one TMA copy, which moves at most "
            f"{MAX_COPY_ROWS} elements along a dimension)")
  return None


def check_padded(t: int, rows: int, tile: int) -> None:
  """T must be a multiple of a CTA's rows and of the streamed tile (`BlockSizes.pad_multiple` sees to it)."""
  if t % rows or t % tile:
    raise ValueError(f"T={t} must be padded to a multiple of {rows} and {tile} (BlockSizes.pad_multiple)")


def memory_mask(mem_valid, mem_span):
  """What the forward and the dq kernel read for the memory mask: the spans [B, C, 2, M] int32 as they are,
  or mem_valid as a bias [B, C, M] fp32 (0 or NEG_INF, added to the scaled logits)."""
  if mem_span is not None:
    return mem_span
  return jnp.where(mem_valid != 0, 0.0, NEG_INF).astype(jnp.float32)


def memory_mask_smem(n_mem: int, span: bool):
  """The SMEM buffer `memory_mask` is copied into."""
  return plgpu.SMEM((2, n_mem), jnp.int32) if span else plgpu.SMEM((n_mem,), jnp.float32)


def smem_tiling(dtype) -> dict:
  """The tiling and swizzle of every 16-bit wgmma operand tile in shared memory."""
  return dict(transforms=(plgpu.TilingTransform((8, _SWIZZLE_BYTES // jnp.dtype(dtype).itemsize)),
                          plgpu.SwizzleTransform(_SWIZZLE_BYTES)))


def load_vector(ref, layout):
  """An fp32 vector from SMEM in a register layout (jax 0.10 takes the index positionally, 0.11 not)."""
  if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def slot_of(step, stages: int):
  """The shared-memory slot of a streamed tile: step mod stages (step a traced int)."""
  return lax.rem(step, jnp.array(stages, step.dtype))


def wait_next(ready, step, n_steps, stages: int):
  """A callable (for `while_running` of the wgmma helpers) that waits until the tile of step + 1 has arrived
  in its slot (ready: the per-slot barriers), when step + 1 < n_steps."""
  def wait():
    nxt = step + 1

    @pl.when(nxt < n_steps)
    def _():
      plgpu.barrier_wait(ready.at[slot_of(nxt, stages)])
  return wait


def produce_band(bi, kv_head, lo, n_steps, bk: int, stages: int, streams, memory=None):
  """The producer warpgroup of the forward and the dq kernel.

  memory = (mem_k, mem_v, bias refs, their SMEM tiles, a 3-barrier ref, chunk): the chunk's memory keys,
  values ([B, C, M, K, P]) and bias ([B, C, M]; or spans [B, C, 2, M]), copied once. streams = ((src
  [B, T, K, P], slots [stages, bk, P], ready, freed barriers), ...): key blocks [lo, lo + n_steps) of the
  band, each slot refilled once both consumers have freed it."""
  if memory is not None:
    mk_ref, mv_ref, bias_ref, mk_smem, mv_smem, bias_smem, arrived, chunk = memory
    for i, (src, dst) in enumerate(((mk_ref, mk_smem), (mv_ref, mv_smem))):
      plgpu.copy_gmem_to_smem(src.at[bi, chunk, :, kv_head], dst, arrived.at[i])
    plgpu.copy_gmem_to_smem(bias_ref.at[bi, chunk], bias_smem, arrived.at[2])

  @pl.loop(0, n_steps)
  def _stream(step):
    slot = slot_of(step, stages)
    block = (bi, pl.ds((lo + step) * bk, bk), kv_head)
    for src, dst, ready, freed in streams:
      @pl.when(step >= stages)
      def _wait_free():
        plgpu.barrier_wait(freed.at[slot])
      plgpu.copy_gmem_to_smem(src.at[block], dst.at[slot], ready.at[slot])


def dots_nt(pairs, shape, while_running=lambda: None):
  """[(a_ref [X, P], b_ref [Y, P]), ...] -> (a·bᵀ [X, Y] fp32, ...), the wgmmas issued back to back and
  while_running() issued while they run."""
  def run(*acc_refs):
    for acc_ref, (a_ref, b_ref) in zip(acc_refs, pairs):
      plgpu.wgmma(acc_ref, a_ref, b_ref.transpose((1, 0)))
    while_running()
    return tuple(acc_ref[...] for acc_ref in acc_refs)
  return pl.run_scoped(run, *(plgpu.ACC(shape, jnp.float32) for _ in pairs))


def dots_nn_acc(triples, while_running):
  """[(acc [X, P], a [X, Y], b_ref [Y, P]), ...] -> (acc + a·b, ...), the wgmmas issued back to back and
  while_running() issued while they run."""
  def run(acc_refs):
    for acc_ref, (_, a, b_ref) in zip(acc_refs, triples):
      plgpu.wgmma(acc_ref, a, b_ref)
    while_running()
  return pl.run_state(run)(tuple(plgpu.ACC.init(acc) for acc, _, _ in triples))
