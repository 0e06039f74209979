"""Time segments: the sequence is cut into S segments that the main kernels walk in parallel.

One program walks its segment's L = T / S tokens sequentially, so the time of a scan is ~L steps of latency
instead of T. The recurrence h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t is linear in h, so the state entering
segment s follows from two cheap per-segment summaries, computed here by a light kernel that starts each
segment from zero:

    h_end(s)  = decay(s) ⊙ h_in(s) + h_loc(s)        decay(s) = exp(A · Σ_{t in s} dt_t)

and a sequential walk over the S segments (`carry_states`, a small kernel of its own: faster than XLA's
associative scan over segments, which ran as several small fusions; docs/selective_scan_notes.md, v4). The
backward's adjoint runs the same way in reverse time: g_{t-1} = exp(dt_t A) ⊙ (g_t + gout_t ⊗ C_t), so
g_start(s) = decay(s) ⊙ g_end(s) + g_loc(s) (`carry_adjoints`). The main kernels then rerun every segment from
its true entering state / adjoint.

Packed documents: a reset at token t multiplies that step's exp(dt_t A) by 0 (in both directions, so h_loc and
g_loc are computed with it), and the decay of a segment holding any reset is 0: its entering state does not
reach past the reset, nor does the adjoint at its end reach back before it. That per-segment flag (seg_reset
[B, S] fp32, 1.0 where segment s holds a reset) is the carry's one extra input; Σdt is unchanged.

Shapes (legend in `bmojo_jax/typing.py`), segmented as the kernels see them (R = B·S rows of L tokens):
u, delta, z, gy [R, L, E]; bm, cm [R, L, G, N]; a2 [E, N] = A·log2(e); bias [E]; reset [R, L] fp32. Summaries:
h_loc / g_loc [R, E, N] fp32, dtsum [R, E] fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bmojo_jax.pallas_kernels.fast_math import FastMath
from bmojo_jax.pallas_kernels.selective_scan.block_sizes import largest_pow2_divisor
from bmojo_jax.pallas_kernels.selective_scan.kernel import (Tile, compiler_params, decay_tile, discretize_row,
                                                           load_rows, pop_refs, segment_start)


def _states_kernel(*refs, reverse: bool, seq_len: int, seg_len: int, segments: int, chunk: int,
                   softplus_on: bool, has_bias: bool, has_z: bool, has_reset: bool, tile: Tile, fm: FastMath):
  """Forward (reverse=False): in-refs u, delta [L, E_blk], a2 [E_blk, N], bm [L, N], bias, reset [L]; carries
  h = da ⊙ h + (dt u) ⊗ B_t from 0. Reverse: in-refs gy, delta, a2, cm, bias, z, reset; carries
  g = da ⊙ (g + (gy SiLU(z)) ⊗ C_t) from 0 backwards in time. da = exp(dt A) (1 - reset_t).
  Out-refs state [E_blk, N], dtsum [E_blk]."""
  x_ref, delta_ref, a_ref, v_ref, bias_ref, z_ref, r_ref, state_ref, dtsum_ref = pop_refs(
      refs, *[True] * 4, has_bias, has_z, has_reset, True, True)

  a2 = tile.orient(a_ref[...].astype(jnp.float32))
  bias = bias_ref[...].astype(jnp.float32) if has_bias else None
  base, padded = segment_start(segments, seg_len, seq_len)
  num_chunks = seg_len // chunk
  row_refs = (x_ref, delta_ref, v_ref, z_ref, r_ref)

  def chunk_index(it):
    return num_chunks - 1 - it if reverse else it

  def body(it, carry):
    s, dtsum, cur = carry
    k = chunk_index(it)
    nxt = load_rows(row_refs, jnp.clip(chunk_index(it + 1), 0, num_chunks - 1) * chunk, chunk)
    for i in (reversed(range(chunk)) if reverse else range(chunk)):
      x, delta, vt, z, r = cur[i]
      valid = (base + k * chunk + i) < seq_len if padded else None
      dt, _ = discretize_row(fm, delta, bias, valid, softplus_on)      # [E_blk]
      da = decay_tile(fm, tile, dt, a2, r)
      xf = x.astype(jnp.float32)
      if reverse:
        if z is not None:
          zf = z.astype(jnp.float32)
          xf = xf * (zf * fm.sigmoid(zf))                              # gout = gy ⊙ SiLU(z)
        s = da * fm.fma(tile.e(xf), tile.n(vt.astype(jnp.float32)), s)
      else:
        s = fm.fma(da, s, tile.e(dt * xf) * tile.n(vt.astype(jnp.float32)))
      dtsum = dtsum + dt
    return s, dtsum, nxt

  first = load_rows(row_refs, chunk_index(0) * chunk, chunk)
  init = (jnp.zeros(a2.shape, jnp.float32), jnp.zeros(a_ref.shape[:1], jnp.float32), first)
  s, dtsum, _ = jax.lax.fori_loop(0, num_chunks, body, init)
  state_ref[...] = tile.orient(s)
  dtsum_ref[...] = dtsum


def segment_summaries(x, delta, a2, v, bias=None, z=None, reset=None, *, reverse: bool, seq_len: int,
                      segments: int, softplus_on: bool, block_e: int, chunk: int, num_warps: int, num_stages: int,
                      lanes_e: bool = False, fast_math: bool = False, interpret: bool = False):
  """Per-segment (state from zero, Σ dt): forward x=u, v=bm; reverse x=gy, v=cm, z; reset [R, L] fp32 or None.
  Returns ([R, E, N] fp32, [R, E] fp32)."""
  rows, seg_len, d_inner = x.shape
  groups, d_state = v.shape[2], v.shape[3]
  per_group = d_inner // groups
  row = pl.BlockSpec((None, seg_len, block_e), lambda r, j: (r, 0, j))
  args = [x, delta, a2, v]
  in_specs = [row, row, pl.BlockSpec((block_e, d_state), lambda r, j: (j, 0)),
              pl.BlockSpec((None, seg_len, None, d_state), lambda r, j: (r, 0, (j * block_e) // per_group, 0))]
  for arr, spec in ((bias, pl.BlockSpec((block_e,), lambda r, j: (j,))), (z, row),
                    (reset, pl.BlockSpec((None, seg_len), lambda r, j: (r, 0)))):
    if arr is not None:
      args.append(arr)
      in_specs.append(spec)
  kernel = functools.partial(
      _states_kernel, reverse=reverse, seq_len=seq_len, seg_len=seg_len, segments=segments, chunk=chunk,
      softplus_on=softplus_on, has_bias=bias is not None, has_z=z is not None, has_reset=reset is not None,
      tile=Tile(lanes_e), fm=FastMath.for_launch(fast_math, interpret))
  return pl.pallas_call(
      kernel, grid=(rows, d_inner // block_e), in_specs=in_specs,
      out_shape=[jax.ShapeDtypeStruct((rows, d_inner, d_state), jnp.float32),
                 jax.ShapeDtypeStruct((rows, d_inner), jnp.float32)],
      out_specs=[pl.BlockSpec((None, block_e, d_state), lambda r, j: (r, j, 0)),
                 pl.BlockSpec((None, block_e), lambda r, j: (r, j))],
      compiler_params=compiler_params(num_warps, num_stages), interpret=interpret,
      name="selective_scan_segment_" + ("adjoints" if reverse else "states"))(*args)


def _carry_kernel(*refs, reverse: bool, unroll: int, has_reset: bool, fm: FastMath):
  """In-refs loc [S, E_blk, N], dtsum [S, E_blk], a2 [E_blk, N], init [E_blk, N], seg_reset [S]; out-ref
  [S, E_blk, N]. Walks the segments in order (reverse: from the last) carrying x = decay(s) ⊙ x + loc(s) from
  init, and writes x as it enters segment s: forward, the state before segment s; reverse, the adjoint at
  segment s's end. decay(s) = exp(A Σdt) (1 - seg_reset(s)): a segment holding a reset passes nothing on."""
  loc_ref, dtsum_ref, a_ref, init_ref, r_ref, out_ref = pop_refs(refs, True, True, True, True, has_reset, True)
  segments = loc_ref.shape[0]
  a2 = a_ref[...]

  def body(it, x):
    first = segments - (it + 1) * unroll if reverse else it * unroll
    order = [first + i for i in (reversed(range(unroll)) if reverse else range(unroll))]
    rows = [(s, loc_ref[s], dtsum_ref[s], None if r_ref is None else r_ref[s])
            for s in order]                                            # loads first: independent of x
    for s, loc, dtsum, r in rows:
      out_ref[s] = x
      decay = fm.exp2(dtsum[:, None] * a2)
      if r is not None:
        decay = decay * (1.0 - r)
      x = fm.fma(decay, x, loc)
    return x

  jax.lax.fori_loop(0, segments // unroll, body, init_ref[...])


def _carry(loc, dtsum, a2, init, seg_reset, *, reverse: bool, fast_math: bool, interpret: bool):
  """loc [B, S, E, N] fp32, dtsum [B, S, E], a2 [E, N], init [B, E, N], seg_reset [B, S] or None
  -> [B, S, E, N] (see `_carry_kernel`)."""
  batch, segments, d_inner, d_state = loc.shape
  block = largest_pow2_divisor(d_inner, 16)
  tiles = pl.BlockSpec((None, segments, block, d_state), lambda b, j: (b, 0, j, 0))
  args = [loc, dtsum, a2, init]
  in_specs = [tiles, pl.BlockSpec((None, segments, block), lambda b, j: (b, 0, j)),
              pl.BlockSpec((block, d_state), lambda b, j: (j, 0)),
              pl.BlockSpec((None, block, d_state), lambda b, j: (b, j, 0))]
  if seg_reset is not None:
    args.append(seg_reset.astype(jnp.float32))
    in_specs.append(pl.BlockSpec((None, segments), lambda b, j: (b, 0)))
  kernel = functools.partial(_carry_kernel, reverse=reverse, unroll=largest_pow2_divisor(segments, 8),
                             has_reset=seg_reset is not None, fm=FastMath.for_launch(fast_math, interpret))
  return pl.pallas_call(
      kernel, grid=(batch, d_inner // block), out_shape=jax.ShapeDtypeStruct(loc.shape, jnp.float32),
      in_specs=in_specs, out_specs=tiles, compiler_params=compiler_params(1, 1), interpret=interpret,
      name="selective_scan_carry_" + ("adjoints" if reverse else "states"))(*args)


def carry_states(h_loc, dtsum, a2, h0, seg_reset=None, *, fast_math: bool = False, interpret: bool = False):
  """The state entering each segment: [B, S, E, N] (h_loc [B, S, E, N], dtsum [B, S, E], h0 [B, E, N],
  seg_reset [B, S]: 1.0 where segment s holds a reset, or None)."""
  return _carry(h_loc, dtsum, a2, h0, seg_reset, reverse=False, fast_math=fast_math, interpret=interpret)


def carry_adjoints(g_loc, dtsum, a2, g_last, seg_reset=None, *, fast_math: bool = False,
                   interpret: bool = False):
  """The adjoint dL/dh at the end of each segment: [B, S, E, N] (g_last [B, E, N] = dL/dh_T)."""
  return _carry(g_loc, dtsum, a2, g_last, seg_reset, reverse=True, fast_math=fast_math, interpret=interpret)


def segment_resets(reset, segments: int):
  """reset [B, S·L] fp32 -> [B, S] fp32: 1.0 where segment s holds a reset (its decay is then 0)."""
  return jnp.max(reset.reshape(reset.shape[0], segments, -1), axis=-1)


def carry_reference(loc, dtsum, a2, init, seg_reset=None, *, reverse: bool):
  """`carry_states` (reverse=False) / `carry_adjoints` (reverse=True) as a sequential jnp scan over segments."""
  if seg_reset is None:
    seg_reset = jnp.zeros(dtsum.shape[:2], jnp.float32)

  def step(x, inputs):
    loc_s, dtsum_s, r_s = inputs
    decay = jnp.where(r_s[:, None, None] != 0, 0.0, jnp.exp2(dtsum_s[..., None] * a2))
    return decay * x + loc_s, x

  xs = (jnp.moveaxis(loc, 1, 0), jnp.moveaxis(dtsum, 1, 0), jnp.moveaxis(seg_reset, 1, 0))
  _, out = jax.lax.scan(step, init, xs, reverse=reverse)
  return jnp.moveaxis(out, 0, 1)
