"""The Mosaic-TPU selective scan's kernel bodies: the forward (state carried over chunks, the state entering each
chunk saved) and the backward (the chunk's states recomputed, the adjoint run backwards over it). The layout,
grid and the custom VJP that calls them are tpu.py's (its docstring describes both)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

f32 = jnp.float32


def _softplus(x):
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _chunk_inputs(delta_ref, u_ref, bias_ref, r_ref, chunk_index, *, chunk, seq_len, softplus_on):
  """dt, u (fp32 [chunk, block_e], dt = 0 on padding steps), the pre-softplus dt and the keep factors."""
  raw = delta_ref[...].astype(f32) + bias_ref[...]
  dt = _softplus(raw) if softplus_on else raw
  pos = chunk_index * chunk + jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
  valid = pos < seq_len
  dt = jnp.where(valid, dt, 0.0)
  keep = None if r_ref is None else 1.0 - r_ref[...]                           # [1, chunk]
  return dt, u_ref[...].astype(f32), raw, valid, keep


def _decay(dt_row, a, keep, t):
  decay = jnp.exp(dt_row * a)                                                  # [N_pad, block_e]
  return decay if keep is None else decay * keep[:, t:t + 1]


def fwd_kernel(*refs, chunk, seq_len, softplus_on, has_z, has_reset, save):
  it = iter(refs)
  u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, h0_ref = (next(it) for _ in range(8))
  z_ref = next(it) if has_z else None
  r_ref = next(it) if has_reset else None
  y_ref, hlast_ref = next(it), next(it)
  hc_ref = next(it) if save else None
  h_scr, y_scr = next(it), next(it)

  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    h_scr[...] = h0_ref[...]

  if save:
    hc_ref[...] = h_scr[...]
  dt, uf, _, _, keep = _chunk_inputs(delta_ref, u_ref, bias_ref, r_ref, c, chunk=chunk, seq_len=seq_len,
                                     softplus_on=softplus_on)
  dtu = dt * uf
  a, bm, cm = a_ref[...], b_ref[...], c_ref[...]
  h = h_scr[...]
  for t in range(chunk):                                                       # unrolled: static slices
    h = _decay(dt[t:t + 1], a, keep, t) * h + dtu[t:t + 1] * bm[:, t:t + 1]
    y_scr[t:t + 1, :] = jnp.sum(h * cm[:, t:t + 1], axis=0, keepdims=True)
  h_scr[...] = h
  y = y_scr[...] + uf * d_ref[...]
  if has_z:
    y = y * jax.nn.silu(z_ref[...].astype(f32))
  y_ref[...] = y.astype(y_ref.dtype)

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    hlast_ref[...] = h


def bwd_kernel(*refs, chunk, seq_len, softplus_on, has_z, has_reset):
  it = iter(refs)
  u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, bias_ref = (next(it) for _ in range(7))
  z_ref = next(it) if has_z else None
  r_ref = next(it) if has_reset else None
  hc_ref, gy_ref, ghl_ref = next(it), next(it), next(it)
  gu_ref, gdelta_ref = next(it), next(it)
  gz_ref = next(it) if has_z else None
  gb_ref, gc_ref, ga_ref, gd_ref, gbias_ref, gh0_ref = (next(it) for _ in range(6))
  g_scr, hprev_scr, y_scr, gdtu_scr, gdta_scr, ga_acc, gd_acc, gbias_acc = (next(it) for _ in range(8))

  step = pl.program_id(2)
  c = pl.num_programs(2) - 1 - step                                            # the chunk visited

  @pl.when(step == 0)
  def _():
    g_scr[...] = ghl_ref[...]
    ga_acc[...] = jnp.zeros_like(ga_acc)
    gd_acc[...] = jnp.zeros_like(gd_acc)
    gbias_acc[...] = jnp.zeros_like(gbias_acc)

  dt, uf, raw, valid, keep = _chunk_inputs(delta_ref, u_ref, bias_ref, r_ref, c, chunk=chunk, seq_len=seq_len,
                                           softplus_on=softplus_on)
  dtu = dt * uf
  a, bm, cm, d = a_ref[...], b_ref[...], c_ref[...], d_ref[...]
  # Recompute the chunk's states from the one saved at its start.
  h = hc_ref[...]
  for t in range(chunk):
    hprev_scr[t] = h
    h = _decay(dt[t:t + 1], a, keep, t) * h + dtu[t:t + 1] * bm[:, t:t + 1]
    y_scr[t:t + 1, :] = jnp.sum(h * cm[:, t:t + 1], axis=0, keepdims=True)
  # Gate and skip, vectorized over the chunk.
  gout = gy_ref[...].astype(f32)
  if has_z:
    zf = z_ref[...].astype(f32)
    sig = jax.nn.sigmoid(zf)
    gz_ref[...] = gout * (y_scr[...] + uf * d) * sig * (1.0 + zf * (1.0 - sig))
    gy = gout * zf * sig
  else:
    gy = gout
  gd_acc[...] += jnp.sum(gy * uf, axis=0, keepdims=True)
  # The adjoint recurrence, last step first: g = dL/dh_t.
  g = g_scr[...]
  ga = ga_acc[...]
  for t in reversed(range(chunk)):
    hprev = hprev_scr[t]
    decay = _decay(dt[t:t + 1], a, keep, t)
    g = g + gy[t:t + 1] * cm[:, t:t + 1]
    h_t = decay * hprev + dtu[t:t + 1] * bm[:, t:t + 1]
    gc_ref[:, t:t + 1] = jnp.sum(h_t * gy[t:t + 1], axis=1, keepdims=True)
    gb_ref[:, t:t + 1] = jnp.sum(g * dtu[t:t + 1], axis=1, keepdims=True)
    gdtu_scr[t:t + 1, :] = jnp.sum(g * bm[:, t:t + 1], axis=0, keepdims=True)
    g_log_decay = g * hprev * decay                                            # dL/d(dt·A) elementwise
    gdta_scr[t:t + 1, :] = jnp.sum(g_log_decay * a, axis=0, keepdims=True)
    ga = ga + g_log_decay * dt[t:t + 1]
    g = decay * g
  g_scr[...] = g
  ga_acc[...] = ga
  gdtu = gdtu_scr[...]
  gdt = gdtu * uf + gdta_scr[...]
  gu_ref[...] = gy * d + gdtu * dt
  gdelta = jnp.where(valid, gdt * jax.nn.sigmoid(raw) if softplus_on else gdt, 0.0)
  gdelta_ref[...] = gdelta
  gbias_acc[...] += jnp.sum(gdelta, axis=0, keepdims=True)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    gh0_ref[...] = g
    ga_ref[...] = ga
    gd_ref[...] = gd_acc[...]
    gbias_ref[...] = gbias_acc[...]
