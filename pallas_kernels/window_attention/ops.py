"""The GPU op: `memory_attention_gpu`, the Pallas kernels behind a `jax.custom_vjp` that saves only the logsumexp
(the public entry, `pallas_kernels.window_attention.memory_attention`, checks the inputs and shards).

Semantics are exactly `memory_attention_reference` (see `reference.py`). Shapes (legend in
`bmojo_jax/typing.py`): q [B, T, H, P]; k, v [B, T, K, P]; mem_k, mem_v [B, C, M, K, P]; mem_valid [B, C, M]
with C = ceil(T / L); optional segment_ids [B, T] and mem_span [B, C, 2, M]. Returns o [B, T, H, P] in
q.dtype.

Here the inputs are brought to the kernels' layout: T padded to a multiple of every block (padding keys
sit after every real query, so causality hides them; padding queries are sliced off and get a zero
cotangent), M padded to a power of two >= 16 (>= 64 for the Mosaic kernels) with invalid slots, P padded
to a power of two >= 16 with zeros (zero q/k columns add nothing to the logits). Padding is skipped when a
size already fits. This is the one place that picks the kernels: `resolve_impls` resolves the forward, dq and
dk/dv `KernelImpl`s, and the custom VJP's forward and backward launch them (Triton: `forward.py`,
`backward.py`; Mosaic GPU: `forward_mosaic.py`, `dq_mosaic.py`, `dkdv_mosaic.py`; the memory's dk/dv always
Triton). `interpret=True` runs the Triton kernels (and the Mosaic forward, when asked for) on CPU.

Packed rows: the kernels never compare segment ids. `segment_bounds` turns them into seg_lo [B, T] (the
first position of each position's segment: the forward and dq kernels, queries on rows) and seg_hi [B, T]
(the last: the dk/dv kernels, keys on rows); padding positions form one more segment. mem_span reaches the
kernels as [B, C, 2, M] int32 with mem_valid folded in (an invalid or padding slot gets the empty span
[0, 0)), in place of mem_valid. Without segment_ids / mem_span every kernel is traced exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from bmojo_jax.pallas_kernels.fast_math import LOG2E
from bmojo_jax.pallas_kernels.window_attention.backward import dkdv_triton, dmem_triton, dq_triton
from bmojo_jax.pallas_kernels.window_attention.blocks import BlockSizes, KernelImpl
from bmojo_jax.pallas_kernels.window_attention.dkdv_mosaic import dkdv_mosaic, mosaic_dkdv_unsupported
from bmojo_jax.pallas_kernels.window_attention.dq_mosaic import dq_mosaic, mosaic_dq_unsupported
from bmojo_jax.pallas_kernels.window_attention.forward import forward
from bmojo_jax.pallas_kernels.window_attention.forward_mosaic import forward_mosaic, mosaic_forward_unsupported


# The name of the custom VJP forward's outputs (o and lse): the remat policies that keep the attention kernels'
# outputs save them by it (`bmojo_jax.model`). The Mosaic forward's equation is no pallas_call (`plgpu.kernel`
# wraps its mpmd_map in a custom_vmap_call), so a policy that named the kernels' primitive alone recomputed it.
KERNEL_OUTPUTS = "memory_attention_outputs"


def _pow2_at_least(n: int, floor: int) -> int:
  return max(floor, 1 << max(0, (n - 1).bit_length()))


def _memory_slots(n_mem: int, mosaic: bool) -> int:
  """M after padding: a power of two >= 16, and >= 64 for the Mosaic kernels' wgmma tiles (0 stays 0)."""
  return _pow2_at_least(n_mem, 64 if mosaic else 16) if n_mem else 0


def _on_hopper() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def resolve_impls(blocks: BlockSizes, dtype, head_dim: int, chunk: int, n_mem: int,
                  interpret: bool, segments: bool = False, span: bool = False) -> BlockSizes:
  """blocks with forward_impl, dq_impl and dkdv_impl each TRITON or MOSAIC (padded head_dim; n_mem = M
  before padding; segments / span: whether segment_ids / mem_span are given).

  "auto" takes the Mosaic kernel on a compute-capability-9 GPU (not in interpret mode) when the shapes
  allow it; an explicit "mosaic" that cannot run these shapes is an error naming the reason."""
  m_pad = _memory_slots(n_mem, mosaic=True)
  chosen = {}
  for field, unsupported in (("forward_impl", mosaic_forward_unsupported), ("dq_impl", mosaic_dq_unsupported),
                             ("dkdv_impl", mosaic_dkdv_unsupported)):
    impl = getattr(blocks, field)
    if impl != KernelImpl.TRITON:
      why = unsupported(dtype, head_dim, chunk, m_pad, blocks, segments=segments, span=span)
      if field != "forward_impl" and interpret:
        why = why or "in interpret mode (the Mosaic backward kernels run compiled only)"
      if impl == KernelImpl.MOSAIC and why:
        raise ValueError(f"{field}='mosaic' cannot run {why}; use {field}='triton' or 'auto'")
      if impl == KernelImpl.AUTO:
        use_mosaic = why is None and not interpret and _on_hopper()
        impl = KernelImpl.MOSAIC if use_mosaic else KernelImpl.TRITON
    chosen[field] = impl
  return dataclasses.replace(blocks, **chosen)


def segment_bounds(segment_ids, t_pad: int):
  """segment_ids [B, T] -> (seg_lo, seg_hi) [B, t_pad] int32: the first and the last position of each
  position's segment, positions T… (padding) one segment of their own.

  Segments are contiguous runs, so for keys s <= t: same segment iff s >= seg_lo[t] iff t <= seg_hi[s]."""
  b, t = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  if t_pad > t:
    starts = jnp.concatenate([starts, jnp.zeros((b, t_pad - t), bool).at[:, 0].set(True)], axis=1)
  ends = jnp.concatenate([starts[:, 1:], jnp.ones((b, 1), bool)], axis=1)   # the next position starts one
  pos = jnp.arange(t_pad, dtype=jnp.int32)
  seg_lo = lax.cummax(jnp.where(starts, pos, 0), axis=1)
  seg_hi = lax.cummin(jnp.where(ends, pos, t_pad - 1), axis=1, reverse=True)
  return seg_lo, seg_hi


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12, 13))
def _attention(q, k, v, mem_k, mem_v, mem_valid, seg_lo, seg_hi, mem_span, scale, window, chunk, blocks,
               interpret):
  return _attention_fwd(q, k, v, mem_k, mem_v, mem_valid, seg_lo, seg_hi, mem_span, scale, window, chunk,
                        blocks, interpret)[0]


def _attention_fwd(q, k, v, mem_k, mem_v, mem_valid, seg_lo, seg_hi, mem_span, scale, window, chunk, blocks,
                   interpret):
  fwd = forward_mosaic if blocks.forward_impl == KernelImpl.MOSAIC else forward
  o, lse = fwd(q, k, v, mem_k, mem_v, mem_valid, seg_lo, mem_span, qk_scale=scale * LOG2E, window=window,
               chunk=chunk, blocks=blocks, interpret=interpret)
  o, lse = checkpoint_name((o, lse), KERNEL_OUTPUTS)
  return o, (q, k, v, mem_k, mem_v, mem_valid, seg_lo, seg_hi, mem_span, o, lse)


def _attention_bwd(scale, window, chunk, blocks, interpret, res, do):
  """The backward's three kernels, each the one `resolve_impls` chose: dq, dk/dv, and (with memory) the
  memory's dk/dv. delta = Σ_P o·do [B, H, T] fp32 is their shared residual."""
  q, k, v, mem_k, mem_v, mem_valid, seg_lo, seg_hi, mem_span, o, lse = res
  delta = jnp.einsum("BTHP,BTHP->BHT", o.astype(jnp.float32), do.astype(jnp.float32))
  scales = dict(scale=scale, qk_scale=scale * LOG2E)
  if blocks.dq_impl == KernelImpl.MOSAIC:
    dq = dq_mosaic(q, k, v, mem_k, mem_v, mem_valid, seg_lo, mem_span, do, lse, delta, window=window,
                   chunk=chunk, blocks=blocks, **scales)
  else:
    dq = dq_triton(q, k, v, mem_k, mem_v, mem_valid, seg_lo, mem_span, do, lse, delta, window=window,
                   chunk=chunk, blocks=blocks, interpret=interpret, **scales)
  if blocks.dkdv_impl == KernelImpl.MOSAIC:
    dk, dv = dkdv_mosaic(q, k, v, do, lse, delta, seg_hi, window=window, blocks=blocks, **scales)
  else:
    dk, dv = dkdv_triton(q, k, v, do, lse, delta, seg_hi, window=window, blocks=blocks, interpret=interpret,
                         **scales)
  dmk = dmv = None
  if mem_k is not None:
    dmk, dmv = dmem_triton(q, mem_k, mem_v, mem_valid, mem_span, do, lse, delta, chunk=chunk, blocks=blocks,
                           interpret=interpret, **scales)
  return dq, dk, dv, dmk, dmv, None, None, None, None   # integer inputs: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def memory_attention_gpu(q, k, v, mem_k, mem_v, mem_valid, segment_ids, mem_span, *, window: int | None, chunk: int,
                         scale: float, block_sizes: BlockSizes | None, interpret: bool):
  """The GPU kernels on checked inputs (one device's shard under a mesh); o [B, T, H, P] in q.dtype."""
  _, t, _, p = q.shape
  n_mem = 0 if mem_k is None else mem_k.shape[2]
  blocks = (block_sizes or BlockSizes.get_default(p, has_memory=bool(n_mem))).fitted(t, chunk)
  p_pad = _pow2_at_least(p, 16)
  has_span = mem_span is not None and n_mem > 0
  blocks = resolve_impls(blocks, q.dtype, p_pad, chunk, n_mem, interpret, segments=segment_ids is not None,
                         span=has_span)

  t_pad = -(-t // blocks.pad_multiple) * blocks.pad_multiple
  seq_pad = ((0, 0), (0, t_pad - t), (0, 0), (0, p_pad - p))
  if seq_pad != ((0, 0),) * 4:
    q, k, v = (jnp.pad(x, seq_pad) for x in (q, k, v))
  seg_lo = seg_hi = None
  if segment_ids is not None:
    seg_lo, seg_hi = segment_bounds(segment_ids, t_pad)
  if mem_k is None or n_mem == 0:
    mem_k = mem_v = mem_valid = mem_span = None
  else:
    m_pad = _memory_slots(n_mem, mosaic=KernelImpl.MOSAIC in (blocks.forward_impl, blocks.dq_impl))   # dk/dv: no memory
    mem_pad = ((0, 0), (0, 0), (0, m_pad - n_mem), (0, 0), (0, p_pad - p))
    if m_pad != n_mem or p_pad != p:
      mem_k, mem_v = jnp.pad(mem_k, mem_pad), jnp.pad(mem_v, mem_pad)
    if has_span:   # one mask input: an invalid (or padding) slot has the empty span [0, 0)
      mem_span = jnp.where(mem_valid[:, :, None, :] != 0, mem_span.astype(jnp.int32), 0)
      mem_span = jnp.pad(mem_span, ((0, 0), (0, 0), (0, 0), (0, m_pad - n_mem)))
      mem_valid = None
    else:
      mem_valid = jnp.pad(mem_valid.astype(jnp.int32), mem_pad[:3])
  o = _attention(q, k, v, mem_k, mem_v, mem_valid, seg_lo, seg_hi, mem_span, scale, window, chunk, blocks,
                 interpret)
  return o[:, :t, :, :p]
