"""Selective scan: the associative path equals the sequential reference, also with packed documents (reset)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax.kernels import get_scan_fn
from bmojo_jax.scan import selective_scan_associative
from bmojo_jax.pallas_kernels.selective_scan.reference import selective_scan_reference


# Jitted once for the module: a case is one compile of each path, not op-by-op dispatch of every jnp call around
# the scans (the same functions; test_reset_shape_is_checked and test_no_full_length_state_tensor call them bare).
reference = jax.jit(selective_scan_reference)
associative = jax.jit(selective_scan_associative, static_argnames="chunk")


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
  y_ref, h_ref = reference(**x)
  y, h = associative(**x, chunk=chunk)
  assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5


def test_associative_gradients_match():
  x = inputs(jax.random.key(3), 2, 29, 8, 4)
  def loss(fn, args):
    y, h = fn(**args)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * h)
  g_ref = jax.jit(jax.grad(lambda a: loss(selective_scan_reference, a)))(x)
  g = jax.jit(jax.grad(lambda a: loss(lambda **k: selective_scan_associative(**k, chunk=8), a)))(x)
  for name in x:
    assert rel_err(g[name], g_ref[name]) <= 1e-5, name


# Tokens starting a document, one row each, T = 37 in chunks of 8: short documents several to a chunk, a reset at
# t = 0 (dropping h0) and at the last token; resets on chunk edges and mid-chunk; random; none (reset all False).
PACKED_STARTS = [[0, 3, 5, 6, 13, 36], [8, 16, 21, 24, 31], None, []]


def packed_reset(t, seed=0):
  """[len(PACKED_STARTS), t] bool (None: Bernoulli(0.2) per token)."""
  rows = [jax.random.bernoulli(jax.random.key(seed), 0.2, (t,)) if starts is None
          else jnp.isin(jnp.arange(t), jnp.array(starts, int)) for starts in PACKED_STARTS]
  return jnp.stack(rows)


def test_associative_packed_matches_sequential():
  """Forward and every gradient with resets; the carry across chunks stops at a reset too."""
  x = inputs(jax.random.key(6), len(PACKED_STARTS), 37, 8, 4)
  reset = packed_reset(37)
  def loss(fn, args):
    y, h = fn(**args, reset=reset)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * h), (y, h)
  (_, out_ref), g_ref = jax.jit(jax.value_and_grad(lambda a: loss(selective_scan_reference, a), has_aux=True))(x)
  scan = get_scan_fn("associative", chunk=8)
  (_, out), g = jax.jit(jax.value_and_grad(lambda a: loss(scan, a), has_aux=True))(x)
  for name, a, b in (("y", out[0], out_ref[0]), ("h", out[1], out_ref[1]), *((k, g[k], g_ref[k]) for k in x)):
    assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
  assert jnp.all(g["h0"][0] == 0) and jnp.all(g_ref["h0"][0] == 0)   # row 0 resets at t = 0


def test_reset_all_false_is_no_reset():
  """An all-false reset changes nothing. The two calls are different programs (the reset path multiplies the
  decay by 1 - reset, or selects through `where`), which XLA may fuse and vectorize differently: bit-equality
  held on some x86-64 hosts and not on others (AMD EPYC: 1.9e-6 max abs). Hence fp32 rounding tolerance."""
  x = inputs(jax.random.key(7), 2, 37, 8, 4)
  never = jnp.zeros((2, 37), jnp.int32)
  for fn in (reference, functools.partial(associative, chunk=8)):
    for a, b in zip(fn(**x, reset=never), fn(**x)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_reset_starts_a_fresh_sequence():
  """A packed row equals its documents run alone (int reset: nonzero = True); also through get_scan_fn."""
  x = inputs(jax.random.key(8), 1, 40, 8, 4)
  reset = jnp.zeros((1, 40), jnp.int32).at[0, jnp.array([0, 17, 23])].set(2)
  seq = {k: (v if k in ("A", "D", "delta_bias") else None) for k, v in x.items()}
  for impl in ("sequential", "associative"):
    y, h = jax.jit(get_scan_fn(impl, chunk=8))(**x, reset=reset)
    for start, end in ((0, 17), (17, 23), (23, 40)):
      doc = {k: (x[k][:, start:end] if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in seq.items()}
      y_doc, h_doc = reference(**doc)
      np.testing.assert_allclose(y[:, start:end], y_doc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, h_doc, rtol=1e-5, atol=1e-6)


def test_reset_shape_is_checked():
  x = inputs(jax.random.key(9), 2, 12, 8, 4)
  for fn in (selective_scan_reference, selective_scan_associative):
    with pytest.raises(ValueError, match=r"reset must be \[B, T\]"):
      fn(**x, reset=jnp.zeros((2, 11), bool))


def test_initial_state_continues_a_split_sequence():
  x = inputs(jax.random.key(4), 1, 40, 8, 4)
  x["h0"] = None
  y_full, h_full = associative(**x, chunk=8)
  first = {k: (v[:, :17] if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in x.items()}
  rest = {k: (v[:, 17:] if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in x.items()}
  y1, h1 = associative(**first, chunk=8)
  y2, h2 = associative(**{**rest, "h0": h1}, chunk=8)
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
