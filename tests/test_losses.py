"""The chunked linear cross-entropy (`bmojo_jax.losses`) against the reference head + loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import LanguageModel
from bmojo_jax import losses
from bmojo_jax.layers import logits_einsum
from tests.conftest import jaxpr_eqns, tiny_config
from bmojo_jax.train import steps
from bmojo_jax.train.data.packing import IGNORE_INDEX


def _inputs(b=3, t=11, d=16, v=37, dtype=jnp.float32, seed=0):
  kx, kw, kl, km = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (b, t, d), jnp.float32).astype(dtype)
  w = (0.5 * jax.random.normal(kw, (v, d), jnp.float32)).astype(dtype)
  labels = jax.random.randint(kl, (b, t), 0, v)
  weights = (jax.random.uniform(km, (b, t)) > 0.3).astype(jnp.float32)   # ~30% ignored
  return x, w, labels, weights


def _reference(x, w, labels, weights):
  ce, correct = losses.token_losses_reference(logits_einsum(x, w), labels)
  return jnp.sum(weights * ce), ce, correct


@pytest.mark.parametrize("block", [1, 7, 12, 33, 4096])   # tb = 1, 2 (T padded), 4 (padded), 11, T
def test_chunked_equals_reference_fp32(block):
  x, w, labels, weights = _inputs()
  chunked = lambda *a: losses.linear_cross_entropy(*a, block)
  got = jax.jit(chunked)(x, w, labels, weights)          # both sides jitted: op by op, block 1 took ~6 s
  want = jax.jit(_reference)(x, w, labels, weights)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[2], want[2])
  grad = lambda f: jax.jit(jax.grad(lambda *a: f(*a)[0], argnums=(0, 1, 3)))(x, w, labels, weights)
  for g, r in zip(grad(chunked), grad(_reference)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_strict_rule_counts_ties_wrong():
  """Equal logits (x = 0) tie every class: no token is correct; a strictly largest label logit is."""
  x, w, labels, weights = _inputs()
  x = x.at[0].set(0.0)
  labels = labels.at[1].set(jnp.argmax(logits_einsum(x, w)[1], -1))   # row 1: every label strictly largest
  logits = logits_einsum(x, w)
  _, ce, correct = losses.linear_cross_entropy(x, w, labels, weights, 5)
  _, want_correct = losses.token_losses_reference(logits, labels)
  assert not bool(jnp.any(correct[0]))
  np.testing.assert_allclose(ce[0], np.log(w.shape[0]), rtol=1e-6)
  strict = np.asarray(logits)
  label_logit = np.take_along_axis(strict, np.asarray(labels)[..., None], -1)[..., 0]
  expect = (strict >= label_logit[..., None]).sum(-1) == 1            # only the label reaches its logit
  np.testing.assert_array_equal(correct, expect)
  np.testing.assert_array_equal(want_correct, expect)
  assert bool(jnp.all(correct[1]))


def test_chunked_bf16_accumulates_in_fp32():
  """bf16 inputs: ce from fp32 logits equals the reference's to fp32 rounding; gradients within bf16."""
  x, w, labels, weights = _inputs(b=2, t=64, d=32, v=300, dtype=jnp.bfloat16, seed=2)
  chunked = lambda *a: losses.linear_cross_entropy(*a, 32)
  got = jax.jit(chunked)(x, w, labels, weights)
  want = jax.jit(_reference)(x, w, labels, weights)
  assert got[1].dtype == jnp.float32
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda *a: f(*a)[0], argnums=(0, 1)))(x, w, labels, weights)
  for g, r in zip(grad(chunked), grad(_reference)):
    assert g.dtype == r.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2e-2, atol=2e-3)


def test_chunked_never_holds_full_logits():
  """Neither the forward nor the backward of the chunked loss has an array of B·T·V elements."""
  x, w, labels, weights = _inputs(b=2, t=64, d=8, v=50)
  f = lambda x, w: losses.linear_cross_entropy(x, w, labels, weights, 32)[0]
  jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w)
  full = 2 * 64 * 50

  sizes = [int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
           for eqn, _ in jaxpr_eqns(jaxpr.jaxpr) for v in eqn.outvars]
  assert max(sizes) < full


@pytest.mark.parametrize("tied,packed", [(True, True), (False, False)])
def test_loss_sums_chunked_equals_reference(tied, packed):
  """`train.steps.loss_sums` with loss_impl chunked vs reference: the same sums, counts and gradients, with
  ignored targets and (packed) rows of several documents; tied and untied heads. The loss reads only the last
  hidden states, so one family (the fastest to compile) stands for all."""
  rng = np.random.default_rng(0)
  b, t = 2, 24
  inputs = rng.integers(0, 64, (b, t)).astype(np.int32)
  targets = rng.integers(0, 64, (b, t)).astype(np.int32)
  targets[:, ::5] = IGNORE_INDEX
  batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
  if packed:
    ids = np.repeat(np.array([[1] * 10 + [2] * 9 + [3] * 5]), b, 0).astype(np.int32)
    pos = np.concatenate([np.arange(10), np.arange(9), np.arange(5)])[None].repeat(b, 0).astype(np.int32)
    batch.update(segment_ids=jnp.asarray(ids), positions=jnp.asarray(pos))
  out = {}
  for impl in ("chunked", "reference"):
    cfg = tiny_config("transformer", tie_embeddings=tied,
                      compute=dict(attn_impl="reference", loss_impl=impl, loss_block=10))
    graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
    loss_and_grads = jax.value_and_grad(steps.loss_sums, argnums=1, has_aux=True)   # jitted: op by op took ~15 s
    out[impl] = jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, batch)
  (loss, (n, c, per_ex)), g = out["chunked"]
  (loss_r, (n_r, c_r, per_ex_r)), g_r = out["reference"]
  np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
  np.testing.assert_array_equal(n, n_r)
  np.testing.assert_array_equal(c, c_r)
  np.testing.assert_allclose(per_ex, per_ex_r, rtol=1e-6)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6), g, g_r)  # grads ~1
