"""Forward Pallas kernel of the chunked selective scan (Mamba-1 / S6).

Shapes as the kernel sees them (legend in `bmojo_jax/typing.py`; the wrapper in `ops.py` prepares them):
u, delta, z [B, T, E] (T padded to a multiple of the chunk; padded steps have dt = 0); a2 [E, N] fp32 = A·log2(e);
bm, cm [B, T, G, N] (G = 1 when B/C are shared by all channels); d, bias [E] fp32; h0 [B, E, N] fp32;
reset [B, T] fp32 (1.0 where a packed document starts: that step's decay is multiplied by 1 - reset, so the state
before it is dropped; 0.0 on padded steps).
Outputs: y [B, T, E] in u's dtype, h_last [B, E, N] fp32 and, when saving for the backward, hc [B, K, E, N] fp32:
the state *before* each of the K = T / chunk_bwd sub-chunks. With S time segments (`segments.py`), "B" is B·S
rows of T/S tokens each (row b·S + s) and h0 holds each segment's entering state.

Grid (B·S, E / block_e). Each program holds its state tile in registers (oriented by `Tile`: channels on
lanes by default) and walks its rows sequentially: a `fori_loop` over chunks, each chunk's `chunk` steps
unrolled. With `prefetch`, the rows of chunk c+1 are loaded while chunk c computes (they ride in the loop
carry); otherwise each chunk loads its rows at its start. Like d, z, bias and h0, reset is a static optional
input: without it the kernel is traced exactly as before.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bmojo_jax.pallas_kernels.fast_math import FastMath


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler params under either name jax has used for them."""
  cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def segment_start(segments: int, seg_len: int, seq_len: int):
  """(global index of this program's first token, whether the sequence has padded tokens). Grid axis 0 is
  b·S + s when the sequence is cut into S segments of seg_len tokens (`segments.py`)."""
  base = (pl.program_id(0) % segments) * seg_len if segments > 1 else 0
  return base, segments * seg_len != seq_len


def discretize_row(fm: FastMath, delta, bias, valid, softplus_on: bool):
  """dt for one token row [E_blk]: softplus(delta + bias), zero on padded tokens; also the pre-activation."""
  x = delta.astype(jnp.float32)
  if bias is not None:
    x = x + bias
  dt = fm.softplus(x) if softplus_on else x
  if valid is not None:
    dt = jnp.where(valid, dt, 0.0)
  return dt, x


class Tile(NamedTuple):
  """Orientation of a program's state tile in registers. The refs always hold [E_blk, N] states; in-kernel
  the tile is [E_blk, N] (`lanes_e=False`: Triton puts N on a warp's lanes, so every Σ_n is a cross-lane
  shuffle reduction) or [N, E_blk] (`lanes_e=True`: channels on lanes, each thread holds all N states of its
  channel, so Σ_n stays in-thread and the per-channel rows (u, dt, z, y) are one value per thread)."""
  lanes_e: bool

  def orient(self, x):
    """[E_blk, N] <-> tile orientation (a transpose is its own inverse)."""
    return x.T if self.lanes_e else x

  def e(self, v):
    """[E_blk] per-channel vector -> broadcastable against the tile."""
    return v[None, :] if self.lanes_e else v[:, None]

  def n(self, v):
    """[N] per-state vector -> broadcastable against the tile."""
    return v[:, None] if self.lanes_e else v[None, :]

  def sum_n(self, x):
    """Σ over the N states of a tile -> [E_blk]."""
    return jnp.sum(x, axis=0 if self.lanes_e else 1)

  def sum_e(self, x):
    """Σ over the E_blk channels of a tile -> [N]."""
    return jnp.sum(x, axis=1 if self.lanes_e else 0)


RESET_EXPONENT = -1e30  # added to a reset token's exponent: 2^(x - 1e30) is exactly 0, with no inf - inf


def decay_tile(fm: FastMath, tile: Tile, dt, a2, reset):
  """exp(dt A) for one token as a tile (dt [E_blk], a2 the tile of A·log2(e)), times 1 - reset where the row
  has a reset (a scalar: 1.0 where a new document starts there), so the state before that token is dropped.

  The reset enters the exponent, 2^(dt·a2 + reset·RESET_EXPONENT): one fma per element where the plain decay
  has a multiply, rather than a multiply more, which slowed the forward (docs/selective_scan_notes.md, "Packed
  documents")."""
  if reset is None:
    return fm.exp2(tile.e(dt) * a2)
  return fm.exp2(fm.fma(tile.e(dt), a2, reset * RESET_EXPONENT))


def pop_refs(refs, *present):
  """The kernel's refs in order, one per entry of `present`: the next ref where it is true, None where an
  optional input or output is absent (pallas_call passes only the arrays given)."""
  refs = list(refs)
  out = [refs.pop(0) if p else None for p in present]
  assert not refs, f"{len(refs)} refs left over"
  return out


def load_rows(refs, t0, chunk: int):
  """Rows t0 .. t0+chunk-1 of each [T, ...] ref in `refs` (None entries stay None): list over steps of tuples."""
  return [tuple(None if r is None else r[t0 + i] for r in refs) for i in range(chunk)]


def _fwd_kernel(*refs, seq_len: int, t_pad: int, segments: int, chunk: int, save_every: int,
                softplus_on: bool, has_d: bool, has_z: bool, has_bias: bool, has_h0: bool, has_reset: bool,
                save: bool, prefetch: bool, tile: Tile, fm: FastMath):
  """Kernel body. In-refs u, delta [T, E_blk]; a2 [E_blk, N]; bm, cm [T, N]; d, bias [E_blk]; z [T, E_blk];
  h0 [E_blk, N]; reset [T]. Out-refs y [T, E_blk], h_last [E_blk, N], hc [K, E_blk, N]."""
  (u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, h0_ref, r_ref, y_ref, hlast_ref,
   hc_ref) = pop_refs(refs, *[True] * 5, has_d, has_z, has_bias, has_h0, has_reset, True, True, save)

  a2 = tile.orient(a_ref[...].astype(jnp.float32))                     # tile of A·log2(e)
  d = d_ref[...].astype(jnp.float32) if has_d else None                # [E_blk]
  bias = bias_ref[...].astype(jnp.float32) if has_bias else None
  h = tile.orient(h0_ref[...].astype(jnp.float32)) if has_h0 else jnp.zeros(a2.shape, jnp.float32)
  num_chunks = t_pad // chunk
  base, padded = segment_start(segments, t_pad, seq_len)
  row_refs = (u_ref, delta_ref, b_ref, c_ref, z_ref, r_ref)

  def body(c, carry):
    h, cur = carry
    if prefetch:
      nxt = load_rows(row_refs, jnp.minimum(c + 1, num_chunks - 1) * chunk, chunk)   # chunk c+1
    else:
      cur, nxt = load_rows(row_refs, c * chunk, chunk), ()
    t0 = c * chunk
    for i in range(chunk):
      if save and i % save_every == 0:
        hc_ref[c * (chunk // save_every) + i // save_every] = tile.orient(h)
      u, delta, bt, ct, z, r = cur[i]
      valid = (base + t0 + i) < seq_len if padded else None
      dt, _ = discretize_row(fm, delta, bias, valid, softplus_on)       # [E_blk]
      uf = u.astype(jnp.float32)
      da = decay_tile(fm, tile, dt, a2, r)                             # tile
      h = fm.fma(da, h, tile.e(dt * uf) * tile.n(bt.astype(jnp.float32)))
      y = tile.sum_n(h * tile.n(ct.astype(jnp.float32)))               # [E_blk]
      if has_d:
        y = y + d * uf
      if has_z:
        zf = z.astype(jnp.float32)
        y = y * (zf * fm.sigmoid(zf))
      y_ref[t0 + i] = y.astype(y_ref.dtype)
    return h, nxt

  first = load_rows(row_refs, 0, chunk) if prefetch else ()
  h, _ = jax.lax.fori_loop(0, num_chunks, body, (h, first))
  hlast_ref[...] = tile.orient(h)


def scan_fwd(u, delta, a2, bm, cm, d=None, z=None, bias=None, h0=None, reset=None, *, seq_len: int,
             softplus_on: bool, segments: int = 1, block_e: int, chunk: int, save_every: int, num_warps: int,
             num_stages: int, save: bool, prefetch: bool = True, lanes_e: bool = False, fast_math: bool = False,
             interpret: bool = False):
  """Runs the forward kernel on prepared inputs (see module docstring). Returns (y, h_last, hc or None)."""
  batch, t_pad, d_inner = u.shape
  groups, d_state = bm.shape[2], bm.shape[3]
  if t_pad % chunk or chunk % save_every:
    raise ValueError(f"scan_fwd: T={t_pad} must be a multiple of chunk={chunk}, itself a multiple of {save_every}")
  per_group = d_inner // groups
  if d_inner % block_e or per_group % block_e:
    raise ValueError(f"scan_fwd: block_e={block_e} must divide E={d_inner} and E/G={per_group}")
  grid = (batch, d_inner // block_e)
  num_saves = t_pad // save_every

  row = pl.BlockSpec((None, t_pad, block_e), lambda b, j: (b, 0, j))
  bc = pl.BlockSpec((None, t_pad, None, d_state), lambda b, j: (b, 0, (j * block_e) // per_group, 0))
  vec = pl.BlockSpec((block_e,), lambda b, j: (j,))
  state = pl.BlockSpec((None, block_e, d_state), lambda b, j: (b, j, 0))
  scalars = pl.BlockSpec((None, t_pad), lambda b, j: (b, 0))          # reset: one value per token

  args = [u, delta, a2, bm, cm]
  in_specs = [row, row, pl.BlockSpec((block_e, d_state), lambda b, j: (j, 0)), bc, bc]
  for x, spec in ((d, vec), (z, row), (bias, vec), (h0, state), (reset, scalars)):
    if x is not None:
      args.append(x)
      in_specs.append(spec)
  out_shape = [jax.ShapeDtypeStruct((batch, t_pad, d_inner), u.dtype),
               jax.ShapeDtypeStruct((batch, d_inner, d_state), jnp.float32)]
  out_specs = [row, state]
  if save:
    out_shape.append(jax.ShapeDtypeStruct((batch, num_saves, d_inner, d_state), jnp.float32))
    out_specs.append(pl.BlockSpec((None, num_saves, block_e, d_state), lambda b, j: (b, 0, j, 0)))

  kernel = functools.partial(
      _fwd_kernel, seq_len=seq_len, t_pad=t_pad, segments=segments, chunk=chunk, save_every=save_every,
      softplus_on=softplus_on, has_d=d is not None, has_z=z is not None, has_bias=bias is not None,
      has_h0=h0 is not None, has_reset=reset is not None, save=save, prefetch=prefetch, tile=Tile(lanes_e),
      fm=FastMath.for_launch(fast_math, interpret))
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      compiler_params=compiler_params(num_warps, num_stages), interpret=interpret,
      name="selective_scan_fwd")(*args)
  return outs[0], outs[1], (outs[2] if save else None)
