"""Selective scan: the associative path equals the sequential reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax.scan import get_scan_fn, selective_scan_associative
from pallas_kernels.selective_scan.reference import selective_scan_reference


def rel_err(a, b):
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def inputs(key, b, t, e, n, groups=None, dt_scale=1.0):
  ks = jax.random.split(key, 9)
  bc_shape = (b, t, n) if groups is None else (b, t, groups, n)
  return dict(u=jax.random.normal(ks[0], (b, t, e)), delta=dt_scale * jax.random.normal(ks[1], (b, t, e)),
              A=-jnp.exp(jax.random.normal(ks[2], (e, n))), Bm=jax.random.normal(ks[3], bc_shape),
              Cm=jax.random.normal(ks[4], bc_shape), D=jax.random.normal(ks[5], (e,)),
              z=jax.random.normal(ks[6], (b, t, e)), delta_bias=jax.random.normal(ks[7], (e,)),
              h0=jax.random.normal(ks[8], (b, e, n)))


@pytest.mark.parametrize("t, chunk", [(1, 4), (37, 8), (64, 16), (101, 128)])
@pytest.mark.parametrize("groups", [None, 2])
def test_associative_matches_sequential(t, chunk, groups):
  x = inputs(jax.random.key(t), 2, t, 8, 4, groups)
  y_ref, h_ref = selective_scan_reference(**x)
  y, h = selective_scan_associative(**x, chunk=chunk)
  assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5


def test_associative_gradients_match():
  x = inputs(jax.random.key(3), 2, 29, 8, 4)
  def loss(fn, args):
    y, h = fn(**args)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * h)
  g_ref = jax.grad(lambda a: loss(selective_scan_reference, a))(x)
  g = jax.grad(lambda a: loss(lambda **k: selective_scan_associative(**k, chunk=8), a))(x)
  for name in x:
    assert rel_err(g[name], g_ref[name]) <= 1e-5, name


def test_initial_state_continues_a_split_sequence():
  x = inputs(jax.random.key(4), 1, 40, 8, 4)
  x["h0"] = None
  y_full, h_full = selective_scan_associative(**x, chunk=8)
  first = {k: (v[:, :17] if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in x.items()}
  rest = {k: (v[:, 17:] if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in x.items()}
  y1, h1 = selective_scan_associative(**first, chunk=8)
  y2, h2 = selective_scan_associative(**{**rest, "h0": h1}, chunk=8)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h2, h_full, rtol=1e-5, atol=1e-6)


def test_no_full_length_state_tensor():
  """The associative path never materializes [B, T, E, N]."""
  b, t, e, n = 1, 256, 8, 4
  x = inputs(jax.random.key(5), b, t, e, n)
  jaxpr = jax.make_jaxpr(lambda a: selective_scan_associative(**a, chunk=32))(x)
  def shapes(jx):
    for eqn in jx.eqns:
      for var in eqn.outvars:
        yield tuple(getattr(var.aval, "shape", ()))
      for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else []:
        yield from shapes(sub)
  big = [s for s in shapes(jaxpr.jaxpr) if len(s) >= 4 and np.prod(s) >= b * t * e * n]
  assert not big, big


def test_scan_selection():
  assert get_scan_fn("sequential") is selective_scan_reference
  with pytest.raises(ValueError):
    get_scan_fn("quantum")
