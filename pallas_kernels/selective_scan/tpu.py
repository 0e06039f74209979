"""Mosaic-TPU selective scan: `selective_scan_tpu`, forward and backward Pallas TPU kernels behind a custom VJP
(the public entry, `pallas_kernels.selective_scan.selective_scan(backend="tpu")`, checks and shards).

Same semantics as `selective_scan_reference` (and the GPU kernels): u, delta, z
[B, T, E]; A [E, N]; Bm, Cm [B, T, N] or grouped [B, T, G, N]; D, delta_bias [E]; h0 [B, E, N]; reset [B, T].
Returns (y [B, T, E] in u.dtype, h_T [B, E, N] fp32).

TPU layout: channels E on the 128 lanes, the state's N on sublanes, so one program holds the state of `block_e`
channels as h [N_pad, block_e] fp32 (N padded to a multiple of 8). E is padded per group to a multiple of 128
(a channel block never straddles two groups of B/C), T to a multiple of the time chunk (a multiple of 8).
B and C enter transposed per chunk, [B, G, T/chunk, N_pad, chunk], so step t's B_t is the column [:, t].

Grid (B, E / block_e, T / chunk), semantics ("parallel", "parallel", "arbitrary"): the state is carried from
chunk to chunk in a VMEM scratch along the sequential last axis. Inside a chunk the steps are unrolled:

    h = exp(dt_t · A) ⊙ (1 - reset_t) ⊙ h + (dt_t · u_t) ⊗ B_t;  y_t = Σ_n h ⊙ C_t

The forward also saves the state entering every chunk ([B, T/chunk, N_pad, E_pad] fp32, the only residual
besides the inputs). The backward walks the chunks last to first (index map T/chunk - 1 - c) carrying the
adjoint g = dL/dh in VMEM: per chunk it recomputes the chunk's states from the saved one into a
[chunk, N_pad, block_e] scratch, then runs the adjoint recurrence backwards over the chunk. dB and dC come out
per channel block ([B, E_pad / block_e, ...]) and are summed over a group's blocks outside; dA, dD and
d(delta_bias) are accumulated in VMEM over the chunks and summed over B outside.

`interpret=True` runs the kernels in Pallas' TPU interpreter on CPU (`pltpu.InterpretParams`); tests use it.
The kernel bodies are tpu_kernels.py's; this file lays the inputs out and calls them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bmojo_jax.pallas_kernels.selective_scan.tpu_kernels import bwd_kernel, f32, fwd_kernel

LANES = 128
SUBLANES = 8


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


class _Plan(NamedTuple):
  chunk: int       # tokens per grid step (a multiple of 8)
  n_chunks: int
  groups: int      # G of B/C (1 for [B, T, N])
  per_group: int   # E // G
  group_pad: int   # E // G padded to a multiple of 128
  block_e: int     # channels per program (a multiple of 128 dividing group_pad)
  n_pad: int       # N padded to a multiple of 8


def _plan(u, Bm, A, chunk: int, block_e: int) -> _Plan:
  _, t, d_inner = u.shape
  groups = Bm.shape[2] if Bm.ndim == 4 else 1
  group_pad = _round_up(d_inner // groups, LANES)
  be = max(LANES, min(_round_up(block_e, LANES), group_pad))
  while group_pad % be:
    be -= LANES
  chunk = _round_up(min(chunk, t), SUBLANES)
  return _Plan(chunk, -(-t // chunk), groups, d_inner // groups, group_pad, be, _round_up(A.shape[1], SUBLANES))


# ---- layout: [..., E] <-> [..., E_pad] (per group), T <-> T_pad, B/C <-> [B, G, C, N_pad, chunk]


def _to_lanes(x, p: _Plan):
  """[..., E] -> [..., G · group_pad]: each group's channels padded with zeros to a multiple of 128."""
  x = x.reshape(*x.shape[:-1], p.groups, p.per_group)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, p.group_pad - p.per_group)])
  return x.reshape(*x.shape[:-2], p.groups * p.group_pad)


def _from_lanes(x, p: _Plan):
  """[..., G · group_pad] -> [..., E]."""
  x = x.reshape(*x.shape[:-1], p.groups, p.group_pad)[..., :p.per_group]
  return x.reshape(*x.shape[:-2], p.groups * p.per_group)


def _pad_time(x, p: _Plan):
  return jnp.pad(x, [(0, 0), (0, p.n_chunks * p.chunk - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _bc_blocks(m, p: _Plan):
  """Bm/Cm [B, T, N] | [B, T, G, N] -> [B, G, C, N_pad, chunk] fp32 (B_t is column t of its chunk)."""
  m = m if m.ndim == 4 else m[:, :, None, :]
  m = jnp.pad(_pad_time(m.astype(f32), p), [(0, 0)] * 3 + [(0, p.n_pad - m.shape[3])])
  b = m.shape[0]
  return m.reshape(b, p.n_chunks, p.chunk, p.groups, p.n_pad).transpose(0, 3, 1, 4, 2)


def _bc_unblock(g, like, p: _Plan):
  """[B, E_pad / block_e, C, N_pad, chunk] per-block partials -> like's shape: each group's blocks summed."""
  b, t, n = like.shape[0], like.shape[1], like.shape[-1]
  g = g.reshape(b, p.groups, -1, p.n_chunks, p.n_pad, p.chunk).sum(2)          # [B, G, C, N_pad, chunk]
  g = g.transpose(0, 2, 4, 1, 3).reshape(b, p.n_chunks * p.chunk, p.groups, p.n_pad)[:, :t, :, :n]
  return (g if like.ndim == 4 else g[:, :, 0]).astype(like.dtype)


def _prepare(u, delta, A, Bm, Cm, D, z, delta_bias, reset, p: _Plan):
  """The kernels' inputs (module docstring); absent z / reset stay None, absent D / delta_bias become 0."""
  e_pad = p.groups * p.group_pad
  lanes = lambda x: _to_lanes(_pad_time(x, p), p)
  vec = lambda x: jnp.zeros((1, e_pad), f32) if x is None else _to_lanes(x.astype(f32)[None], p)
  a_t = jnp.pad(_to_lanes(A.astype(f32).T, p), ((0, p.n_pad - A.shape[1]), (0, 0)))   # [N_pad, E_pad]
  r = None
  if reset is not None:
    r = _pad_time(reset.astype(f32), p).reshape(u.shape[0], p.n_chunks, 1, p.chunk)
  return dict(u=lanes(u), delta=lanes(delta), a=a_t, b=_bc_blocks(Bm, p), c=_bc_blocks(Cm, p), d=vec(D),
              bias=vec(delta_bias), z=None if z is None else lanes(z), r=r)


def _specs(p: _Plan, reverse: bool):
  """BlockSpecs over grid (b, j, c); with reverse the time chunk visited at step c is C - 1 - c."""
  be, nc = p.block_e, p.n_chunks
  tc = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
  per_group = p.group_pad // be
  return dict(
      bte=pl.BlockSpec((None, p.chunk, be), lambda b, j, c: (b, tc(c), j)),
      ne=pl.BlockSpec((p.n_pad, be), lambda b, j, c: (0, j)),
      vec=pl.BlockSpec((1, be), lambda b, j, c: (0, j)),
      bne=pl.BlockSpec((None, p.n_pad, be), lambda b, j, c: (b, 0, j)),
      bvec=pl.BlockSpec((None, 1, be), lambda b, j, c: (b, 0, j)),
      bc=pl.BlockSpec((None, None, None, p.n_pad, p.chunk), lambda b, j, c: (b, j // per_group, tc(c), 0, 0)),
      r=pl.BlockSpec((None, None, 1, p.chunk), lambda b, j, c: (b, tc(c), 0, 0)),
      hc=pl.BlockSpec((None, None, p.n_pad, be), lambda b, j, c: (b, tc(c), 0, j)),
      gbc=pl.BlockSpec((None, None, None, p.n_pad, p.chunk), lambda b, j, c: (b, j, tc(c), 0, 0)),
  )


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, chunk, block_e, interpret, save):
  batch, t, _ = u.shape
  p = _plan(u, Bm, A, chunk, block_e)
  x = _prepare(u, delta, A, Bm, Cm, D, z, delta_bias, reset, p)
  e_pad = p.groups * p.group_pad
  h0 = (jnp.zeros((batch, p.n_pad, e_pad), f32) if h0 is None else
        jnp.pad(_to_lanes(h0.astype(f32).transpose(0, 2, 1), p), ((0, 0), (0, p.n_pad - A.shape[1]), (0, 0))))
  s = _specs(p, reverse=False)
  args = [x["u"], x["delta"], x["a"], x["b"], x["c"], x["d"], x["bias"], h0]
  in_specs = [s["bte"], s["bte"], s["ne"], s["bc"], s["bc"], s["vec"], s["vec"], s["bne"]]
  for name, spec in (("z", s["bte"]), ("r", s["r"])):
    if x[name] is not None:
      args.append(x[name])
      in_specs.append(spec)
  out_shape = [jax.ShapeDtypeStruct(x["u"].shape, u.dtype), jax.ShapeDtypeStruct((batch, p.n_pad, e_pad), f32)]
  out_specs = [s["bte"], s["bne"]]
  if save:
    out_shape.append(jax.ShapeDtypeStruct((batch, p.n_chunks, p.n_pad, e_pad), f32))
    out_specs.append(s["hc"])
  kernel = functools.partial(fwd_kernel, chunk=p.chunk, seq_len=t, softplus_on=softplus_on,
                             has_z=z is not None, has_reset=reset is not None, save=save)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, e_pad // p.block_e, p.n_chunks), in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((p.n_pad, p.block_e), f32), pltpu.VMEM((p.chunk, p.block_e), f32)],
      compiler_params=_SEMANTICS, interpret=_interpret(interpret), name="selective_scan_tpu_fwd")(*args)
  y = _from_lanes(outs[0][:, :t], p)
  h_last = _from_lanes(outs[1], p)[:, :A.shape[1]].transpose(0, 2, 1)
  return y, h_last, (outs[2] if save else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def _scan(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, chunk, block_e, interpret):
  y, h_last, _ = _forward(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, chunk, block_e,
                          interpret, save=False)
  return y, h_last


def _scan_fwd(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, chunk, block_e, interpret):
  y, h_last, hc = _forward(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, softplus_on, chunk, block_e,
                           interpret, save=True)
  return (y, h_last), (u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, hc)


def _scan_bwd(softplus_on, chunk, block_e, interpret, res, cts):
  u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, hc = res
  gy, gh_last = cts
  batch, t, _ = u.shape
  p = _plan(u, Bm, A, chunk, block_e)
  x = _prepare(u, delta, A, Bm, Cm, D, z, delta_bias, reset, p)
  e_pad = p.groups * p.group_pad
  n_blocks = e_pad // p.block_e
  gy = _to_lanes(_pad_time(gy, p), p)
  gh_last = jnp.pad(_to_lanes(gh_last.astype(f32).transpose(0, 2, 1), p),
                    ((0, 0), (0, p.n_pad - A.shape[1]), (0, 0)))
  s = _specs(p, reverse=True)
  args = [x["u"], x["delta"], x["a"], x["b"], x["c"], x["d"], x["bias"]]
  in_specs = [s["bte"], s["bte"], s["ne"], s["bc"], s["bc"], s["vec"], s["vec"]]
  for name, spec in (("z", s["bte"]), ("r", s["r"])):
    if x[name] is not None:
      args.append(x[name])
      in_specs.append(spec)
  args += [hc, gy, gh_last]
  in_specs += [s["hc"], s["bte"], s["bne"]]
  bte = jax.ShapeDtypeStruct(x["u"].shape, f32)
  out_shape = [bte, bte] + ([bte] if z is not None else []) + [
      jax.ShapeDtypeStruct((batch, n_blocks, p.n_chunks, p.n_pad, p.chunk), f32)] * 2 + [
      jax.ShapeDtypeStruct((batch, p.n_pad, e_pad), f32), jax.ShapeDtypeStruct((batch, 1, e_pad), f32),
      jax.ShapeDtypeStruct((batch, 1, e_pad), f32), jax.ShapeDtypeStruct((batch, p.n_pad, e_pad), f32)]
  out_specs = [s["bte"], s["bte"]] + ([s["bte"]] if z is not None else []) + [
      s["gbc"], s["gbc"], s["bne"], s["bvec"], s["bvec"], s["bne"]]
  be = p.block_e
  scratch = [pltpu.VMEM((p.n_pad, be), f32), pltpu.VMEM((p.chunk, p.n_pad, be), f32)] + [
      pltpu.VMEM((p.chunk, be), f32)] * 3 + [pltpu.VMEM((p.n_pad, be), f32)] + [pltpu.VMEM((1, be), f32)] * 2
  kernel = functools.partial(bwd_kernel, chunk=p.chunk, seq_len=t, softplus_on=softplus_on,
                             has_z=z is not None, has_reset=reset is not None)
  outs = list(pl.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, n_blocks, p.n_chunks), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch, compiler_params=_SEMANTICS, interpret=_interpret(interpret),
      name="selective_scan_tpu_bwd")(*args))
  gu, gdelta = outs.pop(0), outs.pop(0)
  gz = outs.pop(0) if z is not None else None
  gb, gc, ga, gd, gbias, gh0 = outs
  seq = lambda g, like: _from_lanes(g[:, :t], p).astype(like.dtype)
  vec = lambda g, like: _from_lanes(g.sum((0, 1)), p).astype(like.dtype)
  n = A.shape[1]
  return (seq(gu, u), seq(gdelta, delta), _from_lanes(ga.sum(0), p)[:n].T.astype(A.dtype),
          _bc_unblock(gb, Bm, p), _bc_unblock(gc, Cm, p), None if D is None else vec(gd, D),
          None if z is None else seq(gz, z), None if delta_bias is None else vec(gbias, delta_bias),
          None if h0 is None else _from_lanes(gh0, p)[:, :n].transpose(0, 2, 1).astype(h0.dtype),
          None)                                                                # reset: not differentiable


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_tpu(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, *, delta_softplus: bool, chunk: int = 16,
                       block_e: int = 128, interpret: bool = False):
  """The Mosaic-TPU kernels on checked inputs (one device's shard): reset [B, T] fp32 (1.0 = reset) or None.
  Returns (y [B, T, E] in u.dtype, h_T [B, E, N] fp32); differentiable in every array but reset. chunk: tokens
  per grid step (rounded up to a multiple of 8); block_e: channels per program (a multiple of 128)."""
  return _scan(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset, bool(delta_softplus), int(chunk), int(block_e),
               bool(interpret))
