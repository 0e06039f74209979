"""Triton kernel of a decode step's attention (flash-decoding) and the combine of its splits.

Shapes as in `reference.py`. One program per (row b, kv head, split j) of the grid (B, K, n_splits): it holds the
G query heads of its kv head (padded to a power of two), loops over its split's blocks of ring slots with a running
max / sum / accumulator (fp32, base 2), and writes them unnormalized; the program of split 0 starts from the memory
tokens (fading, then store). `combine` rescales the splits to their common max and normalizes, in jnp; with one
split (a large batch) the kernel normalizes and writes q's dtype itself. While t < S the slots past t are empty
and a split reads only the blocks up to slot t (a Transformer's ring sized for prompt + new tokens).
Ring validity comes from the scalar t inside: slot s holds position t - ((t - s) mod S), visible when >= 0 and
> t - window. Nothing is concatenated or padded on the way in but q: the ring and the memory are read where they
lie, blocks past S (or past M) masked on load, so S and M may be any size.

Two forms of the products (`BlockSizes.dot`): q·k as a multiply and a sum over P and p·v as one over the block's
keys, in fp32 on the CUDA cores; or both as dots on the tensor cores (fp32 accumulation, p in v's dtype as the
reference has it), a single query head (G = 1, the common case H = K) repeated over the 16 rows Triton's dot needs,
the repeats folded back at the end. Every in-kernel array is a power of two on each side.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bmojo_jax.memory.store import NO_POS
from bmojo_jax.pallas_kernels.fast_math import LOG2E, FastMath
from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tiles and launch parameters of the decode kernel.

  block_k:      ring slots per loop step with G = 1; with G query heads per kv head, block_k // G (the
                [G, block_k, P] products stay the same size), at most next_pow2(S).
  min_programs: the ring is split until B · K · n_splits reaches this (at most one split per block): a batch-1
                step or a long ring (the Transformer's, up to 32k) spreads over the GPU, a batch-64 one keeps one
                split per (row, kv head).
  num_warps, num_stages: Triton's warps per program and software-pipelining depth.
  fast_math:    the softmax's exp2 as PTX `ex2.approx.ftz` (`pallas_kernels/fast_math.py`); ignored in interpret
                mode.
  dot:          q·k and p·v as tensor-core dots where the shapes allow (on a GPU: G = 1, or G >= 16 with
                block_k >= 16·G; P >= 16; memory parts padded to 16 rows, masked; any shape in interpret mode);
                else multiplies and sums. On by default: a 1.4B B'MOJO decode loop at batch 1 ran 451 tok/s
                with it against 405 without (one H100, one call, benchmarks/results/decode_attention_dot_h100.json).
  """
  block_k: int = 64
  min_programs: int = 512
  num_warps: int = 4
  num_stages: int = 2
  fast_math: bool = True
  dot: bool = True

  def __post_init__(self):
    for name in ("block_k", "min_programs", "num_warps", "num_stages"):
      if getattr(self, name) <= 0:
        raise ValueError(f"BlockSizes.{name} must be positive, got {getattr(self, name)}")
    if self.block_k & (self.block_k - 1):
      raise ValueError(f"BlockSizes.block_k must be a power of two, got {self.block_k}")


def next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a launch covers the ring: block_k slots per step, blocks_per_split steps per program, n_splits programs
  per (row, kv head)."""
  block_k: int
  blocks_per_split: int
  n_splits: int
  dot_rows: int = 0     # rows of the tensor-core products (`BlockSizes.dot`); 0: multiplies and sums

  @classmethod
  def of(cls, blocks: BlockSizes, batch: int, kv_heads: int, size: int, group: int, head_size: int, *,
         interpret: bool) -> "Layout":
    """group: query heads per kv head, padded to a power of two; interpret: Pallas' interpreter (any shape takes
    the dot form) or a compiled launch (the dot form needs P and the ring's block >= 16)."""
    block_k = max(1, min(blocks.block_k // group, next_pow2(size)))
    n_blocks = -(-size // block_k)
    want = min(n_blocks, max(1, -(-blocks.min_programs // (batch * kv_heads))))
    per_split = -(-n_blocks // want)
    dot = blocks.dot and (group == 1 or group >= 16) and (interpret or min(head_size, block_k) >= 16)
    return cls(block_k, per_split, -(-n_blocks // per_split), max(16, group) if dot else 0)


def attend(carry, q, k, v, valid, fm: FastMath):
  """The running (o [G, P], m [G], l [G]) after keys k, values v [N, P] (valid [N] bool); q [G, P] fp32, scaled
  by scale · log2(e). Hidden keys add nothing (not even exp2(0) when every key so far is hidden)."""
  o, m, l = carry
  s = jnp.sum(q[:, None, :] * k.astype(jnp.float32)[None, :, :], axis=2)               # [G, N]
  s = jnp.where(valid[None, :], s, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = fm.exp2(m - m_new)
  p = jnp.where(valid[None, :], fm.exp2(s - m_new[:, None]), 0.0)
  l = fm.fma(l, alpha, jnp.sum(p, axis=1))
  o = o * alpha[:, None] + jnp.sum(p[:, :, None] * v.astype(jnp.float32)[None, :, :], axis=1)
  return o, m_new, l


def attend_dot(carry, q, k, v, valid, fm: FastMath, qk_scale: float):
  """`attend` on the tensor cores: q [R, P] in k's dtype, unscaled (R >= 16); q·kᵀ and p·v as dots with fp32
  accumulation, p cast to v's dtype (as the reference does); fp32 inputs multiply in full fp32, not TF32."""
  o, m, l = carry
  precision = lax.Precision.HIGHEST if k.dtype == jnp.float32 else None
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32) * qk_scale                     # [R, N]
  s = jnp.where(valid[None, :], s, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = fm.exp2(m - m_new)
  p = jnp.where(valid[None, :], fm.exp2(s - m_new[:, None]), 0.0)
  l = fm.fma(l, alpha, jnp.sum(p, axis=1))
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                       preferred_element_type=jnp.float32)                                 # [R, P]
  return o * alpha[:, None] + pv, m_new, l


def load_rows(ref, start, rows: int, n: int):
  """ref[start : start + rows] of a [n, P] ref (rows a power of two), rows past n zero; and their mask [rows]."""
  idx = start + jnp.arange(rows, dtype=jnp.int32)
  inside = idx < n
  return plgpu.load(ref.at[pl.ds(start, rows), :], mask=inside[:, None], other=0), inside


def decode_kernel(*refs, has_fading: bool, has_store: bool, window: int | None, chunk: int | None, size: int,
                  n_fading: int, n_store: int, layout: Layout, qk_scale: float, fm: FastMath):
  """Refs: t [], q [G, P], ring k, v [S, P], (fading k, v [M_f, P]), (store k, v [M_e, P], pos [M_e] int32),
  then o [G, P] fp32, m [G], l [G] (this split's unnormalized accumulator, max and sum, base 2), or with one split
  o [G, P] normalized in q's dtype alone."""
  t_ref, q_ref, k_ref, v_ref, *refs = refs
  fk_ref, fv_ref = (refs.pop(0), refs.pop(0)) if has_fading else (None, None)
  sk_ref, sv_ref, spos_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if has_store else (None, None, None)
  o_ref, *stat_refs = refs
  t = t_ref[()]
  q = q_ref[...]
  g = q.shape[0]
  if layout.dot_rows:                  # one query head repeated over the dot's rows, or G >= 16 rows as they are
    q = jnp.broadcast_to(q, (layout.dot_rows, q.shape[1])).astype(k_ref.dtype)
    attend_fn = functools.partial(attend_dot, qk_scale=qk_scale)
  else:
    q = q.astype(jnp.float32) * qk_scale
    attend_fn = attend
  rows = q.shape[0]
  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32))
  split = pl.program_id(2)             # read here: the interpreter has no program id inside a cond or a loop
  zero = split * 0                     # a traced 0: the memory loads start at a dynamic index like the ring's

  # rows loaded per memory part: a power of two, and >= 16 for the dot form (Triton's dot needs 16 keys), masked
  mem_rows = lambda n: max(next_pow2(n), 16 if layout.dot_rows else 1)

  def memory(carry):
    if has_fading:
      k, inside = load_rows(fk_ref, zero, mem_rows(n_fading), n_fading)
      v, _ = load_rows(fv_ref, zero, mem_rows(n_fading), n_fading)
      carry = attend_fn(carry, q, k, v, inside & (t >= chunk), fm)
    if has_store:
      k, inside = load_rows(sk_ref, zero, mem_rows(n_store), n_store)
      v, _ = load_rows(sv_ref, zero, mem_rows(n_store), n_store)
      pos = plgpu.load(spos_ref.at[pl.ds(zero, mem_rows(n_store))], mask=inside, other=NO_POS)
      carry = attend_fn(carry, q, k, v, inside & (pos != NO_POS), fm)
    return carry

  if has_fading or has_store:
    carry = lax.cond(split == 0, memory, lambda c: c, carry)

  bk = layout.block_k

  def ring_block(i, carry):
    start = (split * layout.blocks_per_split + i) * bk
    k, inside = load_rows(k_ref, start, bk, size)
    v, _ = load_rows(v_ref, start, bk, size)
    slot = start + jnp.arange(bk, dtype=jnp.int32)
    slot_pos = t - lax.rem(t - slot + size, size)        # t - slot + size > 0 for every slot < size
    valid = inside & (slot_pos >= 0)
    if window is not None:
      valid &= slot_pos > t - window
    return attend_fn(carry, q, k, v, valid, fm)

  # Slots past t are still empty while t < S: a split stops at the last block holding slot min(t, S - 1).
  first = split * layout.blocks_per_split * bk
  steps = jnp.clip(lax.div(jnp.minimum(t + 1, size) - first + bk - 1, bk), 0, layout.blocks_per_split)
  o, m, l = lax.fori_loop(0, steps, ring_block, carry)
  if rows != g:                        # the repeats of one query head hold the same values: keep one
    o, m, l = (jnp.max(x, axis=0, keepdims=True) for x in (o, m, l))
  if not stat_refs:                    # one split: the softmax is complete here
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
    return
  o_ref[...] = o
  stat_refs[0][...] = m
  stat_refs[1][...] = l


def decode_splits(q, ring_k, ring_v, t, fading, store, *, window: int | None, chunk: int | None, scale: float,
                  blocks: BlockSizes, interpret: bool):
  """(o [B, K, n_splits, G', P] fp32, m, l [B, K, n_splits, G']) of every split, or with one split (o [B, K, 1, G', P]
  normalized, in q.dtype); G' = next_pow2(G) (q padded)."""
  b, h, p = q.shape
  size, kh = ring_k.shape[1], ring_k.shape[2]
  g = h // kh
  gp = next_pow2(g)
  q4 = q.reshape(b, kh, g, p)
  if gp != g:
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  layout = Layout.of(blocks, b, kh, size, gp, p, interpret=interpret)
  rows = lambda n: pl.BlockSpec((None, n, None, p), lambda bi, hi, j: (bi, 0, hi, 0))
  in_specs = [pl.BlockSpec((), lambda bi, hi, j: ()),
              pl.BlockSpec((None, None, gp, p), lambda bi, hi, j: (bi, hi, 0, 0)), rows(size), rows(size)]
  args = [jnp.asarray(t, jnp.int32), q4, ring_k, ring_v]
  if fading is not None:
    in_specs += [rows(fading[0].shape[1])] * 2
    args += list(fading)
  if store is not None:
    n_store = store[0].shape[1]
    in_specs += [rows(n_store)] * 2 + [pl.BlockSpec((None, n_store), lambda bi, hi, j: (bi, 0))]
    args += list(store)
  kernel = functools.partial(
      decode_kernel, has_fading=fading is not None, has_store=store is not None, window=window, chunk=chunk,
      size=size, n_fading=0 if fading is None else fading[0].shape[1],
      n_store=0 if store is None else store[0].shape[1],
      layout=layout, qk_scale=scale * LOG2E, fm=FastMath.for_launch(blocks.fast_math, interpret))
  n = layout.n_splits
  stat = pl.BlockSpec((None, None, None, gp), lambda bi, hi, j: (bi, hi, j, 0))
  o_spec = pl.BlockSpec((None, None, None, gp, p), lambda bi, hi, j: (bi, hi, j, 0, 0))
  out_specs, out_shape = [o_spec], [jax.ShapeDtypeStruct((b, kh, n, gp, p), q.dtype if n == 1 else jnp.float32)]
  if n > 1:
    out_specs += [stat, stat]
    out_shape += [jax.ShapeDtypeStruct((b, kh, n, gp), jnp.float32)] * 2
  return pl.pallas_call(
      kernel,
      grid=(b, kh, n),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="decode_attention",
  )(*args)


def combine(o, m, l, heads: int, dtype) -> jax.Array:
  """The splits' (o [B, K, n, G', P], m, l [B, K, n, G']) as one softmax: o [B, H, P] in dtype (padding heads
  dropped). Some split holds a visible key (slot t mod S, written at t), so the common max is a real logit and a
  split without one (m = NEG_INF, o = l = 0) weighs exp2(NEG_INF - max) = 0."""
  b, kh, _, _, p = o.shape
  m_all = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp2(m - m_all)                                                                   # [B, K, n, G']
  out = jnp.sum(w[..., None] * o, axis=2) / jnp.sum(w * l, axis=2)[..., None]               # [B, K, G', P]
  return out[:, :, :heads // kh].reshape(b, heads, p).astype(dtype)


def decode_step_attention_gpu(q, ring_k, ring_v, t, fading, store, *, window: int | None, chunk: int | None,
                              scale: float | None = None, block_sizes: BlockSizes | None = None,
                              interpret: bool = False) -> jax.Array:
  """The kernel and the combine: o [B, H, P] in q.dtype (shapes checked by the caller)."""
  scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
  p = q.shape[2]
  if not interpret and p & (p - 1):
    raise ValueError(f"the decode kernel needs a power-of-two head size on the GPU (Triton), got P = {p}; use "
                     "decode_attn_impl='reference'")
  b, h, _ = q.shape
  out = decode_splits(q, ring_k, ring_v, t, fading, store, window=window, chunk=chunk, scale=scale,
                      blocks=block_sizes or BlockSizes(), interpret=interpret)
  if len(out) == 1:                                          # one split, normalized in the kernel
    return out[0][:, :, 0, :h // ring_k.shape[2]].reshape(b, h, -1)
  return combine(*out, h, q.dtype)
