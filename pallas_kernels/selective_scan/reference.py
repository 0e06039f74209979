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


def _shape_error(msg, **arrays):
  shapes = ", ".join(f"{k}={None if v is None else tuple(v.shape)}" for k, v in arrays.items())
  return ValueError(f"selective_scan: {msg}; got {shapes}")


def check_shapes(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, h0=None, reset=None):
  """Raises ValueError (printing every shape) unless the inputs fit the legend in the module docstring."""
  arrays = dict(u=u, delta=delta, A=A, Bm=Bm, Cm=Cm, D=D, z=z, delta_bias=delta_bias, h0=h0, reset=reset)
  if u.ndim != 3:
    raise _shape_error("u must be [B, T, E]", **arrays)
  batch, t, d_inner = u.shape
  if delta.shape != u.shape or (z is not None and z.shape != u.shape):
    raise _shape_error("delta and z must have u's shape [B, T, E]", **arrays)
  if A.ndim != 2 or A.shape[0] != d_inner:
    raise _shape_error("A must be [E, N]", **arrays)
  d_state = A.shape[1]
  if Bm.shape != Cm.shape or Bm.ndim not in (3, 4) or Bm.shape[:2] != (batch, t) or Bm.shape[-1] != d_state:
    raise _shape_error("Bm and Cm must both be [B, T, N] or [B, T, G, N]", **arrays)
  if Bm.ndim == 4 and d_inner % Bm.shape[2]:
    raise _shape_error("grouped Bm/Cm: E must be a multiple of G", **arrays)
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None and x.shape != (d_inner,):
      raise _shape_error(f"{name} must be [E]", **arrays)
  if h0 is not None and h0.shape != (batch, d_inner, d_state):
    raise _shape_error("h0 must be [B, E, N]", **arrays)
  if reset is not None and reset.shape != (batch, t):
    raise _shape_error("reset must be [B, T]", **arrays)
  if t < 1:
    raise _shape_error("T must be >= 1", **arrays)


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
