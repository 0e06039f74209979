"""Every family: causal, trains under jit in fp32 and bf16 with finite loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bmojo_jax import LanguageModel
from tests.conftest import tiny_config


def test_causality(family):
  model = LanguageModel(tiny_config(family, init_std=0.1), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 26), 0, 64)
  changed = tokens.at[:, 13:].set((tokens[:, 13:] + 7) % 64)
  forward = nnx.jit(lambda m, x: m(x))
  a, b = forward(model, tokens), forward(model, changed)
  np.testing.assert_array_equal(a[:, :13], b[:, :13])
  assert not np.allclose(a[:, 13:], b[:, 13:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_backward_under_jit(family, dtype):
  cfg = tiny_config(family, dtype=dtype)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 19), 0, 64)

  @nnx.jit
  def loss_and_grad(model, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      assert logits.dtype == jnp.float32
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return nnx.value_and_grad(loss_fn)(model)

  loss, grads = loss_and_grad(model, tokens)
  assert np.isfinite(loss) and abs(float(loss) - np.log(64)) < 0.5
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def test_remat_changes_nothing_but_memory():
  tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 64)
  results = []
  for remat in (False, True):
    model = LanguageModel(tiny_config("bmojo", remat=remat), rngs=nnx.Rngs(0))
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(tokens[:, :-1]), tokens[:, 1:]).mean()
    loss, grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)
    results.append((loss, jax.tree.leaves(grads)))
  (loss_a, grads_a), (loss_b, grads_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for a, b in zip(grads_a, grads_b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
