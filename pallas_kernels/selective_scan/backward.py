"""Backward Pallas kernel of the chunked selective scan.

Inputs as the forward kernel saw them (see `kernel.py`, also for time segments and reset [B, T]) plus
hc [B, K, E, N] (the state before each of the K = T / chunk sub-chunks, saved by the forward), gy [B, T, E] and
gh_last [B, E, N]. Outputs: gu, gdelta, gz [B, T, E] in their primals' dtypes; gb, gc [B, T, E / block_e, N] fp32
partial sums over each program's channels (the wrapper sums them per group); ga [B, E, N], gd, gbias [B, E]
fp32 partial over batch; gh0 [B, E, N] fp32.

Grid (B, E / block_e). Each program walks the sub-chunks in reverse. For a sub-chunk it recomputes the `chunk`
states from the saved one, keeps them in registers (the steps are unrolled), then walks them backwards carrying
the adjoint state gh = dL/dh_t:

    gh   += gout_t ⊗ C_t                       gout_t = gy_t ⊙ SiLU(z_t)
    gx    = gh ⊙ h_{t-1} ⊙ exp(dt_t A)         (= dL/d(dt_t A))
    gA   += gx ⊙ dt_t                          gdt_t = Σ_n gx A + u_t Σ_n gh B_t
    gu_t  = dt_t Σ_n gh B_t + gout_t D        gB_t = Σ_e gh (dt_t u_t),  gC_t = Σ_e gout_t h_t
    gh    = gh ⊙ exp(dt_t A)

The walk keeps few tiles live (the kernel is bound by its registers): it recomputes exp(dt_t A) instead of keeping
the sub-chunk's decays, and takes h_{t-1} ⊙ exp(dt_t A) as h_t - (dt_t u_t) ⊗ B_t (the forward's product, rounded
alike), so neither h_{t-1} nor A's tile stays live (Σ_n gx A = ln 2 · Σ_n gx A·log2(e)): chunk + 3 state tiles
instead of 2·chunk + 5. One H100, 8 x 2048 x 4096 x 16 bf16: fwd+bwd 4.33 -> 3.83 ms against keeping them
(benchmarks/results/selective_scan_lean_bwd_h100.json).

With packed documents every exp(dt_t A) above is da_t = exp(dt_t A) (1 - reset_t), the factor the forward used:
h_t = da_t ⊙ h_{t-1} + (dt_t u_t) ⊗ B_t, so dL/dh_{t-1} = da_t ⊙ gh and dL/d(dt_t A) = gh ⊙ h_{t-1} ⊙ da_t
(d da_t / d(dt_t A) = da_t). At a reset da_t = 0: no adjoint crosses it, and the decay term gives gA and gdt
nothing (gx = 0, h_t - (dt_t u_t) ⊗ B_t being exactly 0 there); the input term (dt_t u_t) ⊗ B_t is untouched.

No [B, T, E, N] tensor is formed: states live in registers one sub-chunk at a time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bmojo_jax.pallas_kernels.fast_math import FastMath
from bmojo_jax.pallas_kernels.selective_scan.kernel import (Tile, compiler_params, decay_tile, discretize_row,
                                                           load_rows, pop_refs, segment_start)


def _bwd_kernel(*refs, seq_len: int, t_pad: int, segments: int, chunk: int, softplus_on: bool,
                has_d: bool, has_z: bool, has_bias: bool, has_reset: bool, prefetch: bool, tile: Tile,
                fm: FastMath):
  """Kernel body. In-refs u, delta [T, E_blk]; a2 [E_blk, N]; bm, cm [T, N]; d [E_blk]; z [T, E_blk];
  bias [E_blk]; hc [K, E_blk, N]; gy [T, E_blk]; gh_last [E_blk, N]; reset [T]. Out-refs gu, gdelta, gz
  [T, E_blk]; gb, gc [T, N]; ga [E_blk, N]; gd, gbias [E_blk]; gh0 [E_blk, N]."""
  (u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, hc_ref, gy_ref, ghlast_ref, r_ref,  # inputs
   gu_ref, gdelta_ref, gz_ref, gb_ref, gc_ref, ga_ref, gd_ref, gbias_ref, gh0_ref) = pop_refs(          # outputs
       refs, *[True] * 5, has_d, has_z, has_bias, True, True, True, has_reset,
       True, True, has_z, True, True, True, has_d, has_bias, True)

  a2 = tile.orient(a_ref[...].astype(jnp.float32))                     # tile of A·log2(e)
  d = d_ref[...].astype(jnp.float32) if has_d else None
  bias = bias_ref[...].astype(jnp.float32) if has_bias else None
  num_chunks = t_pad // chunk
  base, padded = segment_start(segments, t_pad, seq_len)
  row_refs = (u_ref, delta_ref, b_ref, c_ref, z_ref, gy_ref, r_ref)
  zeros_e = jnp.zeros(a_ref.shape[:1], jnp.float32)

  def body(it, carry):
    gh, ga, gd, gbias, cur, h_start = carry
    k = num_chunks - 1 - it
    if prefetch:                                                       # the previous sub-chunk
      k_next = jnp.maximum(k - 1, 0)
      nxt, h_next = load_rows(row_refs, k_next * chunk, chunk), tile.orient(hc_ref[k_next])
    else:
      cur, h_start = load_rows(row_refs, k * chunk, chunk), tile.orient(hc_ref[k])
      nxt, h_next = (), jnp.zeros((), jnp.float32)
    t0 = k * chunk

    # Recompute this sub-chunk's states from the saved one.
    hs, dts, xs = [h_start], [], []
    h = h_start
    for i in range(chunk):
      u, delta, bt, _, _, _, r = cur[i]
      valid = (base + t0 + i) < seq_len if padded else None
      dt, x = discretize_row(fm, delta, bias, valid, softplus_on)
      da = decay_tile(fm, tile, dt, a2, r)                             # 0 at a reset: see the module docstring
      h = fm.fma(da, h, tile.e(dt * u.astype(jnp.float32)) * tile.n(bt.astype(jnp.float32)))
      hs.append(h)
      dts.append(dt)
      xs.append(x)

    # Walk it backwards.
    for i in reversed(range(chunk)):
      u, _, bt, ct, z, gy, r = cur[i]
      t = t0 + i
      uf, btf, ctf, gyf = (v.astype(jnp.float32) for v in (u, bt, ct, gy))
      dt = dts[i]
      da = decay_tile(fm, tile, dt, a2, r)                             # recomputed: fewer live tiles
      if has_z:
        zf = z.astype(jnp.float32)
        sz = fm.sigmoid(zf)
        out = tile.sum_n(hs[i + 1] * tile.n(ctf))
        if has_d:
          out = out + d * uf
        gz_ref[t] = (gyf * out * sz * (1.0 + zf * (1.0 - sz))).astype(gz_ref.dtype)
        gout = gyf * (zf * sz)
      else:
        gout = gyf
      gh = fm.fma(tile.e(gout), tile.n(ctf), gh)
      gc_ref[t] = tile.sum_e(tile.e(gout) * hs[i + 1])
      gx = gh * (hs[i + 1] - tile.e(dt * uf) * tile.n(btf))           # gh h_{t-1} da_t, the forward's rounding
      ga = fm.fma(gx, tile.e(dt), ga)
      ghb = tile.sum_n(gh * tile.n(btf))                               # [E_blk]
      gdt = tile.sum_n(gx * a2) * math.log(2.0) + uf * ghb
      gu = dt * ghb
      if has_d:
        gu = gu + gout * d
        gd = gd + gout * uf
      gb_ref[t] = tile.sum_e(gh * tile.e(dt * uf))
      gdelta = gdt * fm.sigmoid(xs[i]) if softplus_on else gdt
      if padded:
        gdelta = jnp.where(base + t < seq_len, gdelta, 0.0)
      if has_bias:
        gbias = gbias + gdelta
      gu_ref[t] = gu.astype(gu_ref.dtype)
      gdelta_ref[t] = gdelta.astype(gdelta_ref.dtype)
      gh = gh * da
    return gh, ga, gd, gbias, nxt, h_next

  k_last = num_chunks - 1
  first = ((load_rows(row_refs, k_last * chunk, chunk), tile.orient(hc_ref[k_last])) if prefetch
           else ((), jnp.zeros((), jnp.float32)))
  init = (tile.orient(ghlast_ref[...].astype(jnp.float32)), jnp.zeros_like(a2), zeros_e, zeros_e, *first)
  gh, ga, gd, gbias, _, _ = jax.lax.fori_loop(0, num_chunks, body, init)
  gh0_ref[...] = tile.orient(gh)
  ga_ref[...] = tile.orient(ga)
  if has_d:
    gd_ref[...] = gd
  if has_bias:
    gbias_ref[...] = gbias


def scan_bwd(u, delta, a2, bm, cm, d, z, bias, hc, gy, gh_last, reset=None, *, seq_len: int,
             softplus_on: bool, segments: int = 1, block_e: int, chunk: int, num_warps: int, num_stages: int,
             prefetch: bool = True, lanes_e: bool = False, fast_math: bool = False,
             interpret: bool = False):
  """Runs the backward kernel. Returns (gu, gdelta, gz|None, gb_part, gc_part, ga_part, gd_part|None,
  gbias_part|None, gh0); shapes in the module docstring."""
  batch, t_pad, d_inner = u.shape
  groups, d_state = bm.shape[2], bm.shape[3]
  num_saves = hc.shape[1]
  if num_saves * chunk != t_pad:
    raise ValueError(f"scan_bwd: hc {hc.shape} does not hold one state per {chunk} of T={t_pad} tokens")
  per_group = d_inner // groups
  if d_inner % block_e or per_group % block_e:
    raise ValueError(f"scan_bwd: block_e={block_e} must divide E={d_inner} and E/G={per_group}")
  n_blk = d_inner // block_e
  grid = (batch, n_blk)

  row = pl.BlockSpec((None, t_pad, block_e), lambda b, j: (b, 0, j))
  bc = pl.BlockSpec((None, t_pad, None, d_state), lambda b, j: (b, 0, (j * block_e) // per_group, 0))
  part = pl.BlockSpec((None, t_pad, None, d_state), lambda b, j: (b, 0, j, 0))
  vec = pl.BlockSpec((block_e,), lambda b, j: (j,))
  bvec = pl.BlockSpec((None, block_e), lambda b, j: (b, j))
  state = pl.BlockSpec((None, block_e, d_state), lambda b, j: (b, j, 0))

  args = [u, delta, a2, bm, cm]
  in_specs = [row, row, pl.BlockSpec((block_e, d_state), lambda b, j: (j, 0)), bc, bc]
  for x, spec in ((d, vec), (z, row), (bias, vec)):
    if x is not None:
      args.append(x)
      in_specs.append(spec)
  args += [hc, gy, gh_last]
  in_specs += [pl.BlockSpec((None, num_saves, block_e, d_state), lambda b, j: (b, 0, j, 0)), row, state]
  if reset is not None:
    args.append(reset)
    in_specs.append(pl.BlockSpec((None, t_pad), lambda b, j: (b, 0)))  # one value per token

  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(delta.shape, delta.dtype)]
  out_specs = [row, row]
  if z is not None:
    out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
    out_specs.append(row)
  out_shape += [jax.ShapeDtypeStruct((batch, t_pad, n_blk, d_state), f32)] * 2
  out_specs += [part, part]
  out_shape.append(jax.ShapeDtypeStruct((batch, d_inner, d_state), f32))
  out_specs.append(state)
  for x in (d, bias):
    if x is not None:
      out_shape.append(jax.ShapeDtypeStruct((batch, d_inner), f32))
      out_specs.append(bvec)
  out_shape.append(jax.ShapeDtypeStruct((batch, d_inner, d_state), f32))
  out_specs.append(state)

  kernel = functools.partial(_bwd_kernel, seq_len=seq_len, t_pad=t_pad, segments=segments, chunk=chunk,
                             softplus_on=softplus_on, has_d=d is not None, has_z=z is not None,
                             has_bias=bias is not None, has_reset=reset is not None, prefetch=prefetch,
                             tile=Tile(lanes_e), fm=FastMath.for_launch(fast_math, interpret))
  outs = list(pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      compiler_params=compiler_params(num_warps, num_stages), interpret=interpret,
      name="selective_scan_bwd")(*args))
  gu, gdelta = outs.pop(0), outs.pop(0)
  gz = outs.pop(0) if z is not None else None
  gb, gc, ga = outs.pop(0), outs.pop(0), outs.pop(0)
  gd = outs.pop(0) if d is not None else None
  gbias = outs.pop(0) if bias is not None else None
  (gh0,) = outs
  return gu, gdelta, gz, gb, gc, ga, gd, gbias, gh0
