"""`layers.rope` (compute dtype, no concat) against `layers.rope_reference` (fp32, split + concat)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax.layers import rope, rope_reference


@pytest.mark.parametrize("batched", [False, True])
def test_rope_fp32_is_the_reference_bit_for_bit(batched):
  x = jax.random.normal(jax.random.key(0), (2, 37, 3, 16), jnp.float32)
  pos = jnp.arange(37) * 997                                                       # long positions too
  if batched:
    pos = jnp.stack([pos, pos[::-1]])
  np.testing.assert_array_equal(rope(x, pos, 10_000.0), rope_reference(x, pos, 10_000.0))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x, pos, 10_000.0) * jnp.cos(x)))(x)
  np.testing.assert_array_equal(grad(rope), grad(rope_reference))


def test_rope_bf16_within_bf16_rounding():
  x = jax.random.normal(jax.random.key(1), (2, 64, 4, 64), jnp.float32).astype(jnp.bfloat16)
  pos = jnp.arange(64) + 30_000
  got, want = rope(x, pos, 10_000.0), rope_reference(x, pos, 10_000.0)
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
  # The reference rounds once; bf16 arithmetic rounds the tables, two products and the sum: a few ulps of |x|.
  assert err.max() <= 4 * 2.0 ** -8 * float(jnp.max(jnp.abs(x.astype(jnp.float32))))
