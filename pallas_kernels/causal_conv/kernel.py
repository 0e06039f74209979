"""Triton kernels (Pallas) of the causal depthwise conv + SiLU, forward and backward.

Grid (B, ⌈T / block_t⌉, E / block_e). A program owns `block_t` tokens of one row and `block_e` channels (the
backward's walks `bwd_blocks` such blocks in a loop, summing the weight and bias gradients over them). It loads
its rows one token at a time ([block_e] each, unrolled, so all loads are in flight together), the W-1 tokens
before its first from x or, at the row's start, from the carried state, and computes in fp32; one rounding to
the output dtype. Everything is elementwise over channels: no cross-lane work.

Forward:   p_t = bias + Σ_j w_j x_{t-(W-1-j)} · [reach_t >= W-1-j],   y_t = p_t σ(p_t)
Backward:  g_t = gy_t σ(p_t)(1 + p_t (1 - σ(p_t)))                   (p recomputed, never stored)
           gx_s = Σ_k w_{W-1-k} g_{s+k} · [reach_{s+k} >= k]          (needs g of the W-1 tokens after the block)
           gw_j = Σ_t g_t x_{t-(W-1-j)} · [...],  gbias = Σ_t g_t      (per program; the wrapper sums them)
The gradient of the state (the W-1 inputs before x_0) is the wrapper's: only the first W-1 outputs read it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bmojo_jax.pallas_kernels.fast_math import FastMath
from bmojo_jax.pallas_kernels.selective_scan.kernel import compiler_params


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_t: int = 32     # tokens per program (unrolled)
  block_e: int = 256    # channels per program (power of 2)
  num_warps: int = 4
  bwd_blocks: int = 8   # time blocks a backward program walks (a loop): its weight and bias sums cover
                        # block_t x bwd_blocks tokens, so XLA adds up that many times fewer partials (an H200 took
                        # 0.24 ms a layer to sum one per 32 tokens at the 1.4B shape)
  fast_math: bool = True  # compiled kernels: PTX ex2 / rcp for the sigmoid (pallas_kernels/fast_math.py)

  def __post_init__(self):
    if min(self.block_t, self.block_e, self.num_warps, self.bwd_blocks) < 1:
      raise ValueError(f"causal_conv BlockSizes: every size must be >= 1, got {self}")


def _rows(x_ref, s_ref, t0, lo: int, hi: int, seq_len: int):
  """{i: x at token t0 + i} for lo <= i < hi, fp32 [block_e]: tokens before 0 from the state [W-1, E_blk],
  tokens past the sequence clamped to its last (their results are masked by the caller)."""
  width_1 = s_ref.shape[0]
  out = {}
  for i in range(lo, hi):
    t = t0 + i
    x = x_ref[jnp.clip(t, 0, seq_len - 1)].astype(jnp.float32)
    if i < 0:                                             # only the row's first block reads the state
      s = s_ref[jnp.clip(width_1 + t, 0, width_1 - 1)].astype(jnp.float32)
      x = jnp.where(t >= 0, x, s)
    out[i] = x
  return out


def _reach(r_ref, t0, i: int, seq_len: int):
  """reach at token t0 + i (clamped into the sequence), or None without packed rows."""
  return None if r_ref is None else r_ref[jnp.clip(t0 + i, 0, seq_len - 1)]


def _taps(xs, width: int, reach, i: int):
  """The conv's inputs for token t0 + i (xs from `_rows`, reach from `_reach`): x_{t-(W-1-j)} for j = 0..W-1, zero
  where reach < W-1-j."""
  taps = []
  for j in range(width):
    d = width - 1 - j
    x = xs[i - d]
    if reach is not None and d:
      x = jnp.where(reach >= d, x, 0.0)
    taps.append(x)
  return taps


def _store_row(ref, t, value, seq_len: int, ragged: bool):
  """ref[t] = value, skipped for a token past the sequence (possible only when the last block is ragged)."""
  if not ragged:
    ref[t] = value
    return

  @pl.when(t < seq_len)
  def _():
    ref[t] = value


def _pre(taps, w, bias):
  p = bias
  for x, wj in zip(taps, w):
    p = p + x * wj
  return p


def _fwd_kernel(*refs, seq_len: int, block_t: int, width: int, has_reach: bool, ragged: bool, fm: FastMath):
  """In-refs x [T, E_blk], w [W, E_blk], bias [E_blk], state [W-1, E_blk], (reach [T]); out-ref y [T, E_blk]."""
  if has_reach:
    x_ref, w_ref, b_ref, s_ref, r_ref, y_ref = refs
  else:
    (x_ref, w_ref, b_ref, s_ref, y_ref), r_ref = refs, None
  t0 = pl.program_id(1) * block_t
  w = [w_ref[j].astype(jnp.float32) for j in range(width)]
  bias = b_ref[...].astype(jnp.float32)
  xs = _rows(x_ref, s_ref, t0, 1 - width, block_t, seq_len)
  for i in range(block_t):
    p = _pre(_taps(xs, width, _reach(r_ref, t0, i, seq_len), i), w, bias)
    _store_row(y_ref, t0 + i, (p * fm.sigmoid(p)).astype(y_ref.dtype), seq_len, ragged)


def _bwd_kernel(*refs, seq_len: int, block_t: int, blocks: int, width: int, has_reach: bool, ragged: bool,
                fm: FastMath):
  """In-refs x, gy [T, E_blk], w [W, E_blk], bias [E_blk], state [W-1, E_blk], (reach [T]); out-refs
  gx [T, E_blk], gw [W, E_blk] and gbias [E_blk] (this program's fp32 sums over its `blocks` time blocks)."""
  if has_reach:
    x_ref, gy_ref, w_ref, b_ref, s_ref, r_ref, gx_ref, gw_ref, gb_ref = refs
  else:
    (x_ref, gy_ref, w_ref, b_ref, s_ref, gx_ref, gw_ref, gb_ref), r_ref = refs, None
  w = [w_ref[j].astype(jnp.float32) for j in range(width)]
  bias = b_ref[...].astype(jnp.float32)
  first = pl.program_id(1) * blocks * block_t

  def block(k, sums):
    gw, gb = _bwd_block(x_ref, gy_ref, s_ref, r_ref, gx_ref, w, bias, first + k * block_t, seq_len=seq_len,
                        block_t=block_t, ragged=ragged, fm=fm)
    return [a + b for a, b in zip(sums[0], gw)], sums[1] + gb

  zeros = jnp.zeros_like(bias)
  gw, gb = jax.lax.fori_loop(0, blocks, block, ([zeros] * width, zeros))
  for j in range(width):
    gw_ref[j] = gw[j]
  gb_ref[...] = gb


def _bwd_block(x_ref, gy_ref, s_ref, r_ref, gx_ref, w, bias, t0, *, seq_len: int, block_t: int, ragged: bool,
               fm: FastMath):
  """gx of tokens t0 .. t0+block_t-1 (stored) and their (gw [W x [E_blk]], gbias [E_blk]) fp32 sums."""
  width = len(w)
  n = block_t + width - 1                                # g of the block's tokens and the W-1 after it
  xs = _rows(x_ref, s_ref, t0, 1 - width, n, seq_len)
  reach = [_reach(r_ref, t0, i, seq_len) for i in range(n)]
  g, gw, gb = [], [jnp.zeros_like(bias) for _ in range(width)], jnp.zeros_like(bias)
  for i in range(n):
    t = t0 + i
    taps = _taps(xs, width, reach[i], i)
    p = _pre(taps, w, bias)
    sig = fm.sigmoid(p)
    gy = gy_ref[jnp.clip(t, 0, seq_len - 1)].astype(jnp.float32)
    gi = jnp.where(t < seq_len, gy * sig * (1.0 + p * (1.0 - sig)), 0.0)
    g.append(gi)
    if i < block_t:                                       # gw, gbias: the block's own tokens only
      gb = gb + gi
      gw = [acc + gi * x for acc, x in zip(gw, taps)]
  for i in range(block_t):
    gx = g[i] * w[width - 1]
    for k in range(1, width):                             # token t0+i+k read x_{t0+i} through tap W-1-k
      gk = g[i + k] * w[width - 1 - k]
      if reach[i + k] is not None:
        gk = jnp.where(reach[i + k] >= k, gk, 0.0)
      gx = gx + gk
    _store_row(gx_ref, t0 + i, gx.astype(gx_ref.dtype), seq_len, ragged)
  return gw, gb


def _specs(batch: int, seq_len: int, d_inner: int, width: int, bs: BlockSizes, has_reach: bool, tokens: int):
  """Grid (B, ⌈T / tokens⌉, E / block_e) and the block specs, `tokens` per program."""
  row = pl.BlockSpec((None, seq_len, bs.block_e), lambda b, i, e: (b, 0, e))
  taps = pl.BlockSpec((width, bs.block_e), lambda b, i, e: (0, e))
  vec = pl.BlockSpec((bs.block_e,), lambda b, i, e: (e,))
  state = pl.BlockSpec((None, width - 1, bs.block_e), lambda b, i, e: (b, 0, e))
  reach = [pl.BlockSpec((None, seq_len), lambda b, i, e: (b, 0))] if has_reach else []
  grid = (batch, pl.cdiv(seq_len, tokens), d_inner // bs.block_e)
  return grid, row, taps, vec, state, reach


def conv_silu_fwd(x, weight, bias, state, reach, *, bs: BlockSizes, interpret: bool):
  """y [B, T, E] in x.dtype (module docstring). reach None or int32 [B, T]."""
  batch, seq_len, d_inner = x.shape
  width = weight.shape[0]
  grid, row, taps, vec, st, rs = _specs(batch, seq_len, d_inner, width, bs, reach is not None, bs.block_t)
  kernel = functools.partial(_fwd_kernel, seq_len=seq_len, block_t=bs.block_t, width=width,
                             has_reach=reach is not None, ragged=seq_len % bs.block_t != 0,
                             fm=FastMath.for_launch(bs.fast_math, interpret))
  args = [x, weight, bias, state] + ([reach] if reach is not None else [])
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=grid,
                        in_specs=[row, taps, vec, st] + rs, out_specs=row,
                        compiler_params=compiler_params(bs.num_warps, 1), interpret=interpret,
                        name="causal_conv_silu_fwd")(*args)


def conv_silu_bwd(x, weight, bias, state, reach, gy, *, bs: BlockSizes, interpret: bool):
  """(gx [B, T, E] in x.dtype, gw partials [B, n, W, E] fp32, gbias partials [B, n, E] fp32), n = ⌈T / (block_t
  bwd_blocks)⌉ (the blocks cut to the row's)."""
  batch, seq_len, d_inner = x.shape
  width = weight.shape[0]
  blocks = min(bs.bwd_blocks, pl.cdiv(seq_len, bs.block_t))
  tokens = blocks * bs.block_t
  grid, row, taps, vec, st, rs = _specs(batch, seq_len, d_inner, width, bs, reach is not None, tokens)
  n_t = grid[1]
  kernel = functools.partial(_bwd_kernel, seq_len=seq_len, block_t=bs.block_t, blocks=blocks, width=width,
                             has_reach=reach is not None, ragged=seq_len % tokens != 0,
                             fm=FastMath.for_launch(bs.fast_math, interpret))
  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, n_t, width, d_inner), f32),
               jax.ShapeDtypeStruct((batch, n_t, d_inner), f32)]
  out_specs = [row, pl.BlockSpec((None, None, width, bs.block_e), lambda b, i, e: (b, i, 0, e)),
               pl.BlockSpec((None, None, bs.block_e), lambda b, i, e: (b, i, e))]
  args = [x, gy, weight, bias, state] + ([reach] if reach is not None else [])
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=[row, row, taps, vec, st] + rs,
                        out_specs=out_specs, compiler_params=compiler_params(bs.num_warps, 1),
                        interpret=interpret, name="causal_conv_silu_bwd")(*args)
