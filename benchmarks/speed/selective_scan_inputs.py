"""The selective scan benchmark's inputs and the functions it times (also what profile_kernels.py runs): random
inputs at a shape, packed-document resets, and jitted forward / forward+backward of a scan implementation."""

import jax
import jax.numpy as jnp
import numpy as np

from bmojo_jax.pallas_kernels.selective_scan import selective_scan


def make_inputs(B, T, E, N, dtype, seed=0, with_dz=True):
  ks = jax.random.split(jax.random.PRNGKey(seed), 10)
  u = jax.random.normal(ks[0], (B, T, E), jnp.float32).astype(dtype)
  delta = (0.5 * jax.random.normal(ks[1], (B, T, E), jnp.float32) - 2.0).astype(dtype)
  A = -jnp.exp(0.5 * jax.random.normal(ks[2], (E, N), jnp.float32))
  Bm = jax.random.normal(ks[3], (B, T, N), jnp.float32).astype(dtype)
  Cm = jax.random.normal(ks[4], (B, T, N), jnp.float32).astype(dtype)
  D = jax.random.normal(ks[5], (E,), jnp.float32) if with_dz else None
  z = jax.random.normal(ks[6], (B, T, E), jnp.float32).astype(dtype) if with_dz else None
  bias = 0.5 * jax.random.normal(ks[7], (E,), jnp.float32)
  return (u, delta, A, Bm, Cm, D, z, bias)


def packed_reset(B, T, seed=0):
  """[B, T] bool, True at the first token of each packed document (t = 0 included). Document lengths are
  uniform in [1, T/4] (mean ~T/8), so resets fall anywhere: mid-chunk, on time-segment edges, close together."""
  rng = np.random.default_rng(seed)
  reset = np.zeros((B, T), bool)
  for b in range(B):
    t = 0
    while t < T:
      reset[b, t] = True
      t += int(rng.integers(1, max(1, T // 4) + 1))
  return jnp.asarray(reset)


def fwd_fn(scan):
  return jax.jit(lambda *a: scan(*a))


def fwdbwd_fn(scan):
  def f(*a):
    (y, h), vjp = jax.vjp(scan, *a)
    return vjp((y, h))          # cotangents = outputs: real data, no extra inputs
  return jax.jit(f)


def pallas(bs, reset=None):
  return lambda *a: selective_scan(*a, block_sizes=bs, reset=reset)
