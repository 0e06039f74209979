"""The GPU selective scan: input preparation and the `jax.custom_vjp` that ties the forward (`kernel.py`) and
backward (`backward.py`) Pallas kernels together (Triton; Pallas' interpreter on CPU). The public entry,
`pallas_kernels.selective_scan.selective_scan`, checks the shapes and runs `selective_scan_gpu` per shard.

Shapes (legend in `bmojo_jax/typing.py`): u, delta, z [B, T, E]; A [E, N]; Bm, Cm [B, T, N] or grouped
[B, T, G, N]; D, delta_bias [E]; h0 [B, E, N]; reset [B, T] (bool or int, nonzero = a packed document starts
at that token). Semantics are exactly `selective_scan_reference`'s.

A reset enters every kernel as one fp32 value per token (1.0 = reset) that multiplies that step's decay by
1 - reset, forward and backward; time segments holding a reset pass no state (forward) or adjoint (backward)
across them (`segments.py`). It is a static optional input: with reset=None every kernel is traced as before.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bmojo_jax.pallas_kernels.selective_scan.backward import scan_bwd
from bmojo_jax.pallas_kernels.selective_scan.block_sizes import BlockSizes, largest_pow2_divisor
from bmojo_jax.pallas_kernels.fast_math import LOG2E
from bmojo_jax.pallas_kernels.selective_scan.kernel import scan_fwd
from bmojo_jax.pallas_kernels.selective_scan.segments import (carry_adjoints, carry_states, segment_resets,
                                                   segment_summaries)


class _Plan(NamedTuple):
  t_pad: int        # padded sequence length = segments * seg_len
  n_pad: int        # N padded to a power of two
  chunk: int        # forward chunk (unrolled steps)
  segments: int     # time segments S (segments.py); 1 = one program walks the whole sequence
  seg_len: int      # tokens per segment, a multiple of chunk
  block_e: int      # forward channels per program
  block_e_bwd: int  # backward channels per program


def _plan(u, Bm, A, bs: BlockSizes) -> _Plan:
  """Static tiling for these shapes."""
  _, t, d_inner = u.shape
  groups = Bm.shape[2] if Bm.ndim == 4 else 1
  n_pad = pl.next_power_of_2(A.shape[1])
  chunk = min(bs.chunk, bs.chunk_bwd * pl.cdiv(t, bs.chunk_bwd))
  per_group = d_inner // groups
  block_e = largest_pow2_divisor(per_group, bs.block_e)
  programs = u.shape[0] * d_inner // block_e
  cut = bs.segment_len and (not bs.segment_below_programs or programs < bs.segment_below_programs)
  segments = pl.cdiv(t, chunk * pl.cdiv(bs.segment_len, chunk)) if cut else 1
  seg_len = chunk * pl.cdiv(pl.cdiv(t, segments), chunk)      # balanced: pad less than one chunk per segment
  return _Plan(segments * seg_len, n_pad, chunk, segments, seg_len, block_e,
               largest_pow2_divisor(per_group, bs.block_e_bwd))


def _fwd_kwargs(p: _Plan, bs: BlockSizes, seq_len: int, softplus_on: bool, interpret: bool) -> dict:
  """Keyword arguments shared by the forward kernel and both segment-summary passes."""
  return dict(seq_len=seq_len, softplus_on=softplus_on, segments=p.segments, block_e=p.block_e, chunk=p.chunk,
              num_warps=bs.num_warps, num_stages=bs.num_stages, lanes_e=bs.channels_on_lanes,
              fast_math=bs.fast_math, interpret=interpret)


def _split(x, segments):
  """[B, S·L, ...] -> [B·S, L, ...] (free: a reshape of contiguous rows); None stays None."""
  return None if x is None else x.reshape(x.shape[0] * segments, x.shape[1] // segments, *x.shape[2:])


def _join(x, segments):
  """[B·S, L, ...] -> [B, S·L, ...]."""
  return x.reshape(x.shape[0] // segments, x.shape[1] * segments, *x.shape[2:])


def _pad(x, axis, size):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _prepare(u, delta, A, Bm, Cm, D, z, delta_bias, h0, t_pad, n_pad):
  """Pads T to t_pad (padded steps get dt = 0 inside the kernels) and N to a power of two, makes B/C grouped."""
  bm = Bm if Bm.ndim == 4 else Bm[:, :, None, :]
  cm = Cm if Cm.ndim == 4 else Cm[:, :, None, :]
  u, delta, z, bm, cm = (_pad(x, 1, t_pad) for x in (u, delta, z, bm, cm))
  bm, cm = _pad(bm, 3, n_pad), _pad(cm, 3, n_pad)
  a2 = _pad(A.astype(jnp.float32) * LOG2E, 1, n_pad)
  h0 = None if h0 is None else _pad(h0.astype(jnp.float32), 2, n_pad)
  d = None if D is None else D.astype(jnp.float32)
  bias = None if delta_bias is None else delta_bias.astype(jnp.float32)
  return u, delta, a2, bm, cm, d, z, bias, h0


def _forward(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, bs, interpret, save):
  batch, t, d_inner = u.shape
  p = _plan(u, Bm, A, bs)
  u, delta, a2, bm, cm, d, z, bias, h0 = _prepare(u, delta, A, Bm, Cm, D, z, delta_bias, h0, p.t_pad, p.n_pad)
  reset = _pad(reset, 1, p.t_pad)                                     # padded steps: 0, no reset
  S = p.segments
  common = _fwd_kwargs(p, bs, t, softplus_on, interpret)
  if S > 1:  # each segment's entering state from per-segment summaries
    h_loc, dtsum = segment_summaries(_split(u, S), _split(delta, S), a2, _split(bm, S), bias,
                                     reset=_split(reset, S), reverse=False, **common)
    h0 = h0 if h0 is not None else jnp.zeros((batch, d_inner, p.n_pad), jnp.float32)
    h0 = carry_states(h_loc.reshape(batch, S, d_inner, -1), dtsum.reshape(batch, S, d_inner), a2, h0,
                      None if reset is None else segment_resets(reset, S), fast_math=bs.fast_math,
                      interpret=interpret)
    h0 = h0.reshape(batch * S, d_inner, -1)
  y, h_last, hc = scan_fwd(*(_split(x, S) for x in (u, delta)), a2, *(_split(x, S) for x in (bm, cm)), d,
                           _split(z, S), bias, h0, _split(reset, S), save_every=bs.chunk_bwd, save=save,
                           prefetch=bs.prefetch, **common)
  h_last = h_last.reshape(batch, S, d_inner, -1)[:, -1]
  return _join(y, S)[:, :t], h_last[..., :A.shape[1]], (None if hc is None else _join(hc, S))


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _scan(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, bs, interpret):
  y, h_last, _ = _forward(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, bs, interpret,
                          save=False)
  return y, h_last


def _scan_fwd(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, bs, interpret):
  y, h_last, hc = _forward(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, bs, interpret,
                           save=True)
  return (y, h_last), (u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, hc)


def _scan_bwd(softplus_on, bs, interpret, res, cts):
  u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, hc = res
  gy, gh_last = cts
  batch, t, d_inner = u.shape
  d_state = A.shape[1]
  p = _plan(u, Bm, A, bs)
  S = p.segments
  u_p, delta_p, a2, bm, cm, d, z_p, bias, _ = _prepare(u, delta, A, Bm, Cm, D, z, delta_bias, None, p.t_pad,
                                                      p.n_pad)
  u_p, delta_p, bm, cm, z_p = (_split(x, S) for x in (u_p, delta_p, bm, cm, z_p))
  gy = _split(_pad(gy.astype(u.dtype), 1, p.t_pad), S)
  gh_last = _pad(gh_last.astype(jnp.float32), 2, p.n_pad)
  reset_p = _pad(reset, 1, p.t_pad)
  if S > 1:  # the adjoint entering each segment from its end, from per-segment summaries
    g_loc, dtsum = segment_summaries(gy, delta_p, a2, cm, bias, z_p, _split(reset_p, S), reverse=True,
                                     **_fwd_kwargs(p, bs, t, softplus_on, interpret))
    gh_last = carry_adjoints(g_loc.reshape(batch, S, d_inner, -1), dtsum.reshape(batch, S, d_inner), a2, gh_last,
                             None if reset is None else segment_resets(reset_p, S), fast_math=bs.fast_math,
                             interpret=interpret)
  gu, gdelta, gz, gb, gc, ga, gd, gbias, gh0 = scan_bwd(
      u_p, delta_p, a2, bm, cm, d, z_p, bias, _split(hc, S), gy, gh_last.reshape(batch * S, d_inner, -1),
      _split(reset_p, S), seq_len=t, softplus_on=softplus_on, segments=S, block_e=p.block_e_bwd,
      chunk=bs.chunk_bwd, num_warps=bs.num_warps_bwd, num_stages=bs.num_stages, prefetch=bs.prefetch_bwd,
      lanes_e=bs.channels_on_lanes_bwd, fast_math=bs.fast_math, interpret=interpret)
  groups = bm.shape[2]

  def fold(g, like):  # [B·S, L, E/be, N_pad] partials -> like's shape: sum each group's blocks
    g = _join(g, S).reshape(batch, p.t_pad, groups, -1, p.n_pad).sum(3)[:, :t, :, :d_state]
    return (g if like.ndim == 4 else g[:, :, 0]).astype(like.dtype)

  gh0 = gh0.reshape(batch, S, d_inner, -1)[:, 0]
  return (_join(gu, S)[:, :t], _join(gdelta, S)[:, :t], ga.sum(0)[:, :d_state].astype(A.dtype), fold(gb, Bm),
          fold(gc, Cm), None if D is None else gd.sum(0).astype(D.dtype),
          None if z is None else _join(gz, S)[:, :t],
          None if delta_bias is None else gbias.sum(0).astype(delta_bias.dtype),
          None if h0 is None else gh0[..., :d_state].astype(h0.dtype),
          None)                                                         # reset: not differentiable


# optimize_remat: under jax.checkpoint the VJP forward (the kernel that also writes hc) becomes its own equation
# (`remat_opt`), so a policy that does not save it runs the primal kernel (no hc) in the forward pass and the VJP
# forward once in the backward, instead of writing hc in both (bmojo_jax/model.py, the remat policies).
_scan.defvjp(_scan_fwd, _scan_bwd, optimize_remat=True)


def selective_scan_gpu(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, *, delta_softplus: bool,
                       block_sizes: BlockSizes | None, interpret: bool):
  """The Pallas GPU kernels on checked inputs (one device's shard): reset [B, T] fp32 (1.0 = reset) or None.
  Returns (y [B, T, E] in u.dtype, h_T [B, E, N] fp32); differentiable in every array but reset."""
  return _scan(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, bool(delta_softplus),
               block_sizes or BlockSizes.get_default(), bool(interpret))
