"""The associative selective scan (Mamba-1 / S6), the model-side implementation beside the sequential reference
and the Pallas kernel (`bmojo_jax.kernels.get_scan_fn` chooses among the three). All share the signature of
`pallas_kernels.selective_scan.reference.selective_scan_reference`:

    fn(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, *, delta_softplus=True, h0=None, reset=None)
      -> (y [B, T, E] in u.dtype, h_T [B, E, N] fp32)

`reset` [B, T] (bool or int, nonzero = True) marks the first token of each packed document: the state is
dropped before it (see the reference's docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bmojo_jax.pallas_kernels.selective_scan.reference import check_reset, discretize, expand_groups, skip_and_gate


def _combine(left, right):
  """Compose two affine maps h -> a·h + b (left first)."""
  a_l, b_l = left
  a_r, b_r = right
  return a_r * a_l, a_r * b_l + b_r


def selective_scan_associative(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, *,
                               delta_softplus: bool = True, h0=None, reset=None, chunk: int = 128):
  """`lax.associative_scan` within chunks of `chunk` tokens, `lax.scan` carrying the state across chunks.

  The largest temporary is [B, chunk, E, N]: no [B, T, E, N] tensor spans the sequence. A reset makes its
  step's multiplier a = 0, so every composed map from before it to after it (a_cum, and through a_cum the
  carried state of earlier chunks) is 0 too.
  """
  check_reset(reset, u)
  batch, t, d_inner = u.shape
  d_state = A.shape[-1]
  chunk = max(1, min(chunk, t))
  n_chunks = -(-t // chunk)
  t_pad = n_chunks * chunk

  dt = discretize(delta, delta_bias, delta_softplus)                                 # [B, T, E] fp32
  A = A.astype(jnp.float32)
  Bm = expand_groups(Bm, d_inner).astype(jnp.float32)                                 # [B, T, E|1, N]
  Cm = expand_groups(Cm, d_inner).astype(jnp.float32)
  uf = u.astype(jnp.float32)

  def to_chunks(x):  # [B, T, ...] -> [C, B, chunk, ...]; padding has dt = 0 (identity step)
    x = jnp.pad(x, [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, n_chunks, chunk, *x.shape[2:]), 1, 0)

  def chunk_step(h, xs):
    dt_c, u_c, b_c, c_c, r_c = xs                                                     # [B, L, E], …, [B, L]|None
    a = jnp.exp(dt_c[..., None] * A)                                                  # [B, L, E, N]
    if r_c is not None:
      a = a * (1.0 - r_c[:, :, None, None])                                           # a new document: drop h
    b = (dt_c * u_c)[..., None] * b_c
    a_cum, b_cum = jax.lax.associative_scan(_combine, (a, b), axis=1)
    hs = a_cum * h[:, None] + b_cum                                                   # [B, L, E, N]
    return hs[:, -1], jnp.sum(hs * c_c, axis=-1)                                      # [B, E, N], [B, L, E]

  if h0 is None:
    h0 = jnp.zeros((batch, d_inner, d_state), jnp.float32)
  r = None if reset is None else to_chunks((reset != 0).astype(jnp.float32))          # padded steps never reset
  h_last, y = jax.lax.scan(chunk_step, h0.astype(jnp.float32),
                           (*(to_chunks(x) for x in (dt, uf, Bm, Cm)), r))
  y = jnp.moveaxis(y, 0, 1).reshape(batch, t_pad, d_inner)[:, :t]
  return skip_and_gate(y, u, D, z).astype(u.dtype), h_last
