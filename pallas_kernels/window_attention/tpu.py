"""Mosaic-TPU memory attention: `memory_attention_tpu`, forward, dq, dk/dv and d(memory) Pallas TPU kernels
behind a custom VJP that saves only the logsumexp (the public entry,
`pallas_kernels.window_attention.memory_attention(backend="tpu")`, checks the inputs and shards).

Same semantics as `memory_attention_reference`: q [B, T, H, P]; k, v [B, T, K, P]; mem_k, mem_v
[B, C, M, K, P] and mem_valid [B, C, M] with C = ceil(T / L); optional segment_ids [B, T] and mem_span
[B, C, 2, M]. Returns o [B, T, H, P] in q.dtype.

Layout: heads before time, q [B, H, T_pad, P], k, v [B, K, T_pad, P], memory [B, K, C, M_pad, P]; T padded to
C·L (padding keys come after every real query, so causality hides them), M to a multiple of 8 (padding slots
invalid). Queries and keys are cut into blocks of `bl` rows (a multiple of 8 dividing the chunk L), so a query
block lies in one chunk and the window (a multiple of L) is a whole number of key blocks.

Block sparsity (splash attention's idea, with the sparsity known statically): query block i sees only the
key blocks i - R … i of its band (R = window / bl; all earlier blocks without a window) and then its chunk's
memory. The kernels' last grid axis walks those R + 1 (+ 1 memory) steps, "arbitrary", carrying the online
softmax (m, l, acc) in VMEM; a key block before position 0 is skipped (`pl.when`) and its index clamped so
that no new block is fetched. Grids ("parallel" except the last one or two axes):

    forward, dq   (B, H, T_pad / bl, R + 1 [+ 1])   query block i, key block i - R + s, or the memory
    dk/dv         (B, K, T_pad / bl, G, R + 1)      key block j, its query heads g, query block j + s
    d(memory)     (B, K, C, G, L / bl)              chunk c's memory, the query blocks of chunk c

A query's mask: keys t - window < t' <= t of its segment (segment ids compared per block pair) and memory
slots with lo <= t - c·L < hi, where [lo, hi) is mem_span with mem_valid folded in ([0, L) for a valid slot
without mem_span, [0, 0) for an invalid or padding slot). Logits, softmax and accumulation are fp32; p is
cast to v's dtype before the p·V matmul, as in jax's TPU flash attention.

`interpret=True` runs the kernels in the TPU interpreter on CPU (`pltpu.InterpretParams`); tests use it. The
kernel bodies and their masks are tpu_kernels.py's; this file lays the inputs out and calls them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bmojo_jax.pallas_kernels.window_attention.tpu_kernels import SUBLANES, dkdv_kernel, dmem_kernel, dq_kernel, fwd_kernel, f32


def block_rows(chunk: int, block: int = 128) -> int:
  """Rows per query / key block: the largest multiple of 8 dividing chunk, at most `block`."""
  if chunk % SUBLANES:
    raise ValueError(f"memory_attention_tpu: chunk={chunk} must be a multiple of {SUBLANES} (TPU sublanes)")
  best = SUBLANES
  for rows in range(SUBLANES, min(chunk, block) + 1, SUBLANES):
    if chunk % rows == 0:
      best = rows
  return best


class _Static(dict):
  """Hashable static configuration of one call (custom_vjp nondiff argument)."""
  def __hash__(self):
    return hash(tuple(sorted(self.items())))


def _params(n_parallel: int, n_arbitrary: int):
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _query_side_specs(cfg, kb_of):
  """in_specs of (q, k, v, seg_q, seg_k, mem_k, mem_v, span) over grid (b, h, qi, step)."""
  bl, p, groups = cfg["bl"], cfg["p"], cfg["groups"]
  per_chunk = cfg["chunk"] // bl
  specs = [pl.BlockSpec((None, None, bl, p), lambda b, h, i, s: (b, h, i, 0)),
           pl.BlockSpec((None, None, bl, p), lambda b, h, i, s: (b, h // groups, kb_of(i, s), 0)),
           pl.BlockSpec((None, None, bl, p), lambda b, h, i, s: (b, h // groups, kb_of(i, s), 0))]
  if cfg["segments"]:
    specs += [pl.BlockSpec((None, None, bl, 1), lambda b, h, i, s: (b, i, 0, 0)),
              pl.BlockSpec((None, None, 1, bl), lambda b, h, i, s: (b, kb_of(i, s), 0, 0))]
  if cfg["memory"]:
    m = cfg["m_pad"]
    mem = pl.BlockSpec((None, None, None, m, p), lambda b, h, i, s: (b, h // groups, i // per_chunk, 0, 0))
    specs += [mem, mem, pl.BlockSpec((None, None, 2, m), lambda b, h, i, s: (b, i // per_chunk, 0, 0))]
  return specs


def _inputs(q, k, v, seg_q, seg_k, mk, mv, span, cfg):
  return [q, k, v] + ([seg_q, seg_k] if cfg["segments"] else []) + ([mk, mv, span] if cfg["memory"] else [])


def _grid_q(cfg, b, h):
  return (b, h, cfg["n_blocks"], cfg["band"] + (1 if cfg["memory"] else 0))


def _kb_of(cfg):
  band = cfg["band"]
  return lambda i, s: jnp.clip(i - band + 1 + s, 0, i)    # clamped: a skipped step fetches no new block


def _forward(q, k, v, seg_q, seg_k, mk, mv, span, cfg):
  b, h, t_pad, p = q.shape
  bl = cfg["bl"]
  row = pl.BlockSpec((None, None, bl, p), lambda b_, h_, i, s: (b_, h_, i, 0))
  col = pl.BlockSpec((None, None, bl, 1), lambda b_, h_, i, s: (b_, h_, i, 0))
  o, lse = pl.pallas_call(
      functools.partial(fwd_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t_pad, 1), f32)],
      grid=_grid_q(cfg, b, h), in_specs=_query_side_specs(cfg, _kb_of(cfg)), out_specs=[row, col],
      scratch_shapes=[pltpu.VMEM((bl, 1), f32), pltpu.VMEM((bl, 1), f32), pltpu.VMEM((bl, p), f32)],
      compiler_params=_params(3, 1), interpret=_interpret(cfg["interpret"]),
      name="memory_attention_tpu_fwd")(*_inputs(q, k, v, seg_q, seg_k, mk, mv, span, cfg))
  return o, lse


def _backward(q, k, v, seg_q, seg_k, mk, mv, span, o, lse, do, cfg):
  b, h, t_pad, p = q.shape
  kh = k.shape[1]
  bl, groups, band, nb = cfg["bl"], cfg["groups"], cfg["band"], cfg["n_blocks"]
  delta = jnp.sum(o.astype(f32) * do.astype(f32), axis=-1, keepdims=True)    # [B, H, T_pad, 1]
  interpret = _interpret(cfg["interpret"])
  row_q = pl.BlockSpec((None, None, bl, p), lambda b_, h_, i, s: (b_, h_, i, 0))
  col_q = pl.BlockSpec((None, None, bl, 1), lambda b_, h_, i, s: (b_, h_, i, 0))
  dq = pl.pallas_call(
      functools.partial(dq_kernel, cfg=cfg), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=_grid_q(cfg, b, h), in_specs=_query_side_specs(cfg, _kb_of(cfg)) + [row_q, col_q, col_q],
      out_specs=row_q, scratch_shapes=[pltpu.VMEM((bl, p), f32)], compiler_params=_params(3, 1),
      interpret=interpret, name="memory_attention_tpu_dq")(
          *_inputs(q, k, v, seg_q, seg_k, mk, mv, span, cfg), do, lse, delta)

  # dk/dv: grid (b, kv head, key block j, query head in group g, query block j + s).
  qb = lambda j, s: jnp.minimum(j + s, nb - 1)
  q_row = pl.BlockSpec((None, None, bl, p), lambda b_, c_, j, g, s: (b_, c_ * groups + g, qb(j, s), 0))
  q_col = pl.BlockSpec((None, None, bl, 1), lambda b_, c_, j, g, s: (b_, c_ * groups + g, qb(j, s), 0))
  kv_row = pl.BlockSpec((None, None, bl, p), lambda b_, c_, j, g, s: (b_, c_, j, 0))
  specs = [q_row, kv_row, kv_row]
  args = [q, k, v]
  if cfg["segments"]:
    specs += [pl.BlockSpec((None, None, bl, 1), lambda b_, c_, j, g, s: (b_, qb(j, s), 0, 0)),
              pl.BlockSpec((None, None, 1, bl), lambda b_, c_, j, g, s: (b_, j, 0, 0))]
    args += [seg_q, seg_k]
  dk, dv = pl.pallas_call(
      functools.partial(dkdv_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(b, kh, nb, groups, band), in_specs=specs + [q_row, q_col, q_col], out_specs=[kv_row, kv_row],
      scratch_shapes=[pltpu.VMEM((bl, p), f32)] * 2, compiler_params=_params(3, 2), interpret=interpret,
      name="memory_attention_tpu_dkdv")(*args, do, lse, delta)
  if not cfg["memory"]:
    return dq, dk, dv, None, None

  # d(memory): grid (b, kv head, chunk c, query head in group g, query block of chunk c).
  per_chunk, m = cfg["chunk"] // bl, cfg["m_pad"]
  n_chunks = mk.shape[2]
  qm = lambda c, s: c * per_chunk + s
  q_row = pl.BlockSpec((None, None, bl, p), lambda b_, k_, c, g, s: (b_, k_ * groups + g, qm(c, s), 0))
  q_col = pl.BlockSpec((None, None, bl, 1), lambda b_, k_, c, g, s: (b_, k_ * groups + g, qm(c, s), 0))
  mem = pl.BlockSpec((None, None, None, m, p), lambda b_, k_, c, g, s: (b_, k_, c, 0, 0))
  span_spec = pl.BlockSpec((None, None, 2, m), lambda b_, k_, c, g, s: (b_, c, 0, 0))
  dmk, dmv = pl.pallas_call(
      functools.partial(dmem_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct(mk.shape, mk.dtype), jax.ShapeDtypeStruct(mv.shape, mv.dtype)],
      grid=(b, kh, n_chunks, groups, per_chunk), in_specs=[q_row, mem, mem, span_spec, q_row, q_col, q_col],
      out_specs=[mem, mem], scratch_shapes=[pltpu.VMEM((m, p), f32)] * 2, compiler_params=_params(3, 2),
      interpret=interpret, name="memory_attention_tpu_dmem")(q, mk, mv, span, do, lse, delta)
  return dq, dk, dv, dmk, dmv


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attention(q, k, v, seg_q, seg_k, mk, mv, span, cfg):
  return _forward(q, k, v, seg_q, seg_k, mk, mv, span, cfg)[0]


def _attention_fwd(q, k, v, seg_q, seg_k, mk, mv, span, cfg):
  o, lse = _forward(q, k, v, seg_q, seg_k, mk, mv, span, cfg)
  return o, (q, k, v, seg_q, seg_k, mk, mv, span, o, lse)


def _attention_bwd(cfg, res, do):
  q, k, v, seg_q, seg_k, mk, mv, span, o, lse = res
  dq, dk, dv, dmk, dmv = _backward(q, k, v, seg_q, seg_k, mk, mv, span, o, lse, do, cfg)
  return dq, dk, dv, None, None, dmk, dmv, None      # integer inputs: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def memory_attention_tpu(q, k, v, mem_k, mem_v, mem_valid, segment_ids, mem_span, *, window: int | None, chunk: int,
                         scale: float, block: int = 128, interpret: bool = False):
  """The Mosaic-TPU kernels on checked inputs (one device's shard under a mesh); o [B, T, H, P] in q.dtype.
  chunk must be a multiple of 8; block caps the rows of a query / key block."""
  b, t, h, p = q.shape
  kh = k.shape[2]
  bl = block_rows(chunk, block)
  n_chunks = -(-t // chunk)
  t_pad = n_chunks * chunk
  n_blocks = t_pad // bl
  n_mem = 0 if mem_k is None else mem_k.shape[2]
  m_pad = -(-n_mem // SUBLANES) * SUBLANES
  cfg = _Static(bl=bl, p=p, chunk=chunk, window=window, scale=scale, groups=h // kh, n_blocks=n_blocks,
                band=n_blocks if window is None else window // bl + 1, segments=segment_ids is not None,
                memory=n_mem > 0, m_pad=m_pad, interpret=bool(interpret))
  to_heads = lambda x: jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  qh, kh_, vh = to_heads(q), to_heads(k), to_heads(v)
  seg_q = seg_k = mk = mv = span = None
  if segment_ids is not None:   # padding positions: one more segment of their own
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)), constant_values=-1)
    seg = jnp.where(jnp.arange(t_pad) < t, seg, jnp.min(seg) - 1)
    seg_q, seg_k = seg.reshape(b, n_blocks, bl, 1), seg.reshape(b, n_blocks, 1, bl)
  if n_mem:
    pad = ((0, 0), (0, 0), (0, m_pad - n_mem), (0, 0), (0, 0))
    mk, mv = (jnp.pad(x, pad).transpose(0, 3, 1, 2, 4) for x in (mem_k, mem_v))   # [B, K, C, M_pad, P]
    if mem_span is None:
      mem_span = jnp.broadcast_to(jnp.array([0, chunk], jnp.int32)[None, None, :, None], (b, n_chunks, 2, n_mem))
    span = jnp.where(mem_valid[:, :, None, :] != 0, mem_span.astype(jnp.int32), 0)
    span = jnp.pad(span, ((0, 0), (0, 0), (0, 0), (0, m_pad - n_mem)))
  o = _attention(qh, kh_, vh, seg_q, seg_k, mk, mv, span, cfg)
  return o.transpose(0, 2, 1, 3)[:, :t]
