"""Plain-jnp reference for the Mamba-1 (S6) selective scan: a sequential `lax.scan` over tokens.

Shapes (legend in `bmojo_jax/typing.py`): u, delta, z [B, T, E]; A [E, N]; Bm, Cm [B, T, N] or grouped
[B, T, G, N] (channel e reads group e // (E // G)); D, delta_bias [E]; h0 [B, E, N]; reset [B, T] bool or int.

    dt_t = softplus(delta_t + delta_bias)            (if delta_softplus, else delta_t + delta_bias)
    h_t  = exp(dt_t · A) ⊙ h_{t-1} + (dt_t · u_t) ⊗ B_t
    y_t  = (h_t · C_t + D ⊙ u_t) ⊙ SiLU(z_t)          (D and z optional)

Packed documents: where reset[b, t] is nonzero, token t starts a new document and the state before it is
dropped, h_t = (dt_t · u_t) ⊗ B_t (the decay term is 0, so no gradient crosses the reset either; a reset at
t = 0 drops h0).

The state and all accumulation are fp32; y is returned in u's dtype and the final state in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expand_groups(m: jax.Array, d_inner: int) -> jax.Array:
  """[B, T, N] -> [B, T, 1, N]; [B, T, G, N] -> [B, T, E, N] by repeating each group E // G times."""
  if m.ndim == 3:
    return m[:, :, None, :]
  groups = m.shape[2]
  if d_inner % groups:
    raise ValueError(f"grouped B/C: d_inner={d_inner} is not a multiple of groups={groups}")
  return jnp.repeat(m, d_inner // groups, axis=2)


def discretize(delta, delta_bias, delta_softplus: bool):
  """fp32 dt from the raw projection: softplus(delta + delta_bias)."""
  dt = delta.astype(jnp.float32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(jnp.float32)
  return jax.nn.softplus(dt) if delta_softplus else dt


def skip_and_gate(y, u, D, z):
  """y + D ⊙ u, then ⊙ SiLU(z); all fp32. y, u, z [B, T, E]; D [E]."""
  if D is not None:
    y = y + u.astype(jnp.float32) * D.astype(jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y


def check_reset(reset, u) -> None:
  """Raises ValueError unless reset is None or [B, T] (u [B, T, E])."""
  if reset is not None and tuple(reset.shape) != tuple(u.shape[:2]):
    raise ValueError(f"selective_scan: reset must be [B, T]; got u={tuple(u.shape)}, reset={tuple(reset.shape)}")


def selective_scan_reference(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, *,
                             delta_softplus: bool = True, h0=None, reset=None):
  """Sequential selective scan. Returns (y [B, T, E] in u.dtype, h_T [B, E, N] fp32)."""
  check_reset(reset, u)
  batch, _, d_inner = u.shape
  d_state = A.shape[-1]
  dt = discretize(delta, delta_bias, delta_softplus)                  # [B, T, E]
  A = A.astype(jnp.float32)
  Bm = expand_groups(Bm, d_inner).astype(jnp.float32)                  # [B, T, E|1, N]
  Cm = expand_groups(Cm, d_inner).astype(jnp.float32)
  uf = u.astype(jnp.float32)
  if h0 is None:
    h0 = jnp.zeros((batch, d_inner, d_state), jnp.float32)
  keep = None if reset is None else reset == 0                         # [B, T] bool: no new document here

  def step(h, inputs):
    dt_t, u_t, b_t, c_t, keep_t = inputs                               # [B,E] [B,E] [B,E|1,N] [B,E|1,N] [B]|None
    decayed = jnp.exp(dt_t[..., None] * A) * h
    if keep_t is not None:
      decayed = jnp.where(keep_t[:, None, None], decayed, 0.0)
    h = decayed + (dt_t * u_t)[..., None] * b_t
    y_t = jnp.sum(h * c_t, axis=-1)                                    # [B, E]
    return h, y_t

  xs = tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (dt, uf, Bm, Cm, keep))
  h_last, y = jax.lax.scan(step, h0.astype(jnp.float32), xs)
  y = skip_and_gate(jnp.moveaxis(y, 0, 1), u, D, z)
  return y.astype(u.dtype), h_last
