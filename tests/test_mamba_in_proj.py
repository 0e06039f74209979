"""`Mamba.in_proj_parts` (two GEMMs, one per half of in_proj's kernel; one GEMM for a single token) equals in_proj(x) sliced, values and
gradients (fp32); in bf16 the same up to the GEMM's rounding. In either kernel layout ([D, 2, E] or [2, E, D]); the
out_in model built from the same seed gives the in_out one's parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmojo_jax.mamba import Mamba
from tests.conftest import tiny_config


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype,T", [("float32", 13), ("bfloat16", 13), ("float32", 1)])   # T 1: the decode GEMV
def test_in_proj_parts_equal_the_sliced_projection(dtype, T, layout):
  mamba = Mamba(tiny_config("mamba", compute=dict(dtype=dtype, kernel_layout=layout)), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, T, 32), jnp.float32).astype(dtype)
  g = jax.random.normal(jax.random.key(1), (2, T, 2, 64), jnp.float32)

  def parts(m, x):
    u, z = m.in_proj_parts(x)
    return jnp.stack([u, z], axis=2)

  def sliced(m, x):
    uz = m.in_proj(x)
    return jnp.stack([uz[:, :, 0], uz[:, :, 1]], axis=2)

  def value_and_grads(f):
    loss = lambda m, x: jnp.sum(f(m, x).astype(jnp.float32) * g)
    return f(mamba, x), nnx.grad(loss, argnums=(0, 1))(mamba, x)

  (got, (gm, gx)), (want, (wm, wx)) = value_and_grads(parts), value_and_grads(sliced)
  assert got.dtype == want.dtype == jnp.dtype(dtype)
  tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
  f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_allclose(f32(got), f32(want), **tol)
  np.testing.assert_allclose(f32(gx), f32(wx), **tol)
  np.testing.assert_allclose(f32(gm.in_proj.kernel[...]), f32(wm.in_proj.kernel[...]), **tol)
  if layout == "out_in":
    assert mamba.in_proj.kernel.shape == (2, 64, 32)
    in_out = Mamba(tiny_config("mamba", compute=dict(dtype=dtype)), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(f32(got), f32(parts(in_out, x)), **tol)
