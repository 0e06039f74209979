"""Every family: causal, trains under jit in fp32 and bf16 with finite loss and gradients; scanned blocks equal
the block loop; remat changes nothing; the logits' backward runs in the compute dtype."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bmojo_jax import LanguageModel, Sublayer
from bmojo_jax.layers import logits_einsum
from bmojo_jax.model import MIXERS, stack_blocks, unstack_blocks
from tests.conftest import FAMILIES, FAMILY_TIERS, INNER_FAMILIES, host_tokens, tiny_config


@pytest.mark.parametrize("family", FAMILY_TIERS)
def test_causality(family):
  model = LanguageModel(tiny_config(family, init_std=0.1), rngs=nnx.Rngs(0))
  tokens = host_tokens(1, (2, 26))
  changed = tokens.copy()
  changed[:, 13:] = (tokens[:, 13:] + 7) % 64
  forward = nnx.jit(lambda m, x: m(x))
  a, b = np.asarray(forward(model, tokens)), np.asarray(forward(model, changed))   # host copies: numpy checks
  np.testing.assert_array_equal(a[:, :13], b[:, :13])
  assert not np.allclose(a[:, 13:], b[:, 13:])


@pytest.mark.parametrize("family, dtype", [   # the inner loop: fp32 of FAMILY_TIERS' families, B'MOJO's bf16
    *(pytest.param(f, "float32", marks=() if f in INNER_FAMILIES else pytest.mark.slow) for f in FAMILIES),
    *(pytest.param(f, "bfloat16", marks=() if f == "bmojo" else pytest.mark.slow) for f in FAMILIES)])
def test_forward_backward_under_jit(family, dtype):
  cfg = tiny_config(family, compute=dict(dtype=dtype))
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens = host_tokens(2, (2, 19))

  @nnx.jit
  def loss_and_grad(model, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      assert logits.dtype == jnp.float32
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return nnx.value_and_grad(loss_fn)(model)

  loss, grads = loss_and_grad(model, tokens)
  assert np.isfinite(loss) and abs(float(loss) - np.log(64)) < 0.5
  leaves = [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]      # host copies: numpy checks
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(np.sum(np.abs(g))) for g in leaves) > 0


def _loss_and_grads(model, tokens):
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(tokens[:, :-1]), tokens[:, 1:]).mean()
  loss, grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)
  return loss, nnx.to_pure_dict(grads)


@functools.lru_cache(maxsize=None)
def _remat_case(impl: str, remat: str):
  """Loss and gradients of the 1-block B'MOJO under `remat`; the remat='none' baseline of each impl is
  compiled once for the module, not once per remat policy."""
  tokens = host_tokens(0, (2, 17))
  cfg = tiny_config("bmojo", compute=dict(scan_impl="associative" if impl == "reference" else "pallas",
                                          attn_impl=impl, remat=remat))
  return _loss_and_grads(LanguageModel(cfg, rngs=nnx.Rngs(0)), tokens)


@pytest.mark.parametrize("impl, remat", [
    ("reference", "full"), ("pallas", "dots_kernels"),            # the inner loop: each impl once
    *(pytest.param(i, r, marks=pytest.mark.slow) for i, r in (("reference", "dots"), ("reference", "dots_kernels"),
                                                              ("pallas", "full"), ("pallas", "dots"))),
])
def test_remat_changes_nothing_but_memory(impl, remat):
  loss_a, grads_a = _remat_case(impl, "none")
  loss_b, grads_b = _remat_case(impl, remat)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  chex.assert_trees_all_close(grads_a, grads_b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILY_TIERS)   # three models a family, in one compiled program
def test_scanned_blocks_equal_the_block_loop(family):
  """scan_layers=True runs the same blocks as the Python loop: same logits and gradients (fp32), and the
  parameter trees convert both ways (stack_blocks / unstack_blocks)."""
  loop_cfg = tiny_config(family, n_layers=4, init_std=0.1, compute=dict(scan_layers=False))   # 2 blocks
  loop = LanguageModel(loop_cfg, rngs=nnx.Rngs(0))
  scanned = nnx.eval_shape(lambda: LanguageModel(loop_cfg.with_compute(scan_layers=True), rngs=nnx.Rngs(0)))
  loop_params = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
  # jitted: the conversions are exact whether run op by op or compiled, and one compile beats ~40 eager ones
  stacked, round_trip = jax.jit(lambda p: (stack_blocks(p), unstack_blocks(stack_blocks(p), 2)))(loop_params)
  graphdef, params = nnx.split(scanned, nnx.Param)
  nnx.replace_by_pure_dict(params, stacked)
  scanned = nnx.merge(graphdef, params)
  chex.assert_shape(scanned.blocks.norm1.scale[...], (2, loop_cfg.d_model))
  chex.assert_trees_all_equal(round_trip, loop_params)
  unrolled = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(
      loop_cfg.with_compute(scan_layers=True, scan_unroll=2), rngs=nnx.Rngs(0)))), nnx.state(scanned))

  tokens = host_tokens(3, (2, 21))
  def loss_and_grads(model):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(tokens[:, :-1]), tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return loss, nnx.to_pure_dict(grads)

  @nnx.jit   # the three models' losses and gradients: one compile, each model its own computation
  def all_three(loop, scanned, unrolled):
    (loss_a, grads_a), *rest = (loss_and_grads(m) for m in (loop, scanned, unrolled))
    return (loss_a, stack_blocks(grads_a)), *rest

  with jax.default_matmul_precision("highest"):   # c: both blocks in one scan iteration
    (loss_a, grads_a), (loss_b, grads_b), (loss_c, grads_c) = all_three(loop, scanned, unrolled)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  chex.assert_trees_all_close(grads_a, grads_b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss_a, loss_c, rtol=1e-6)
  chex.assert_trees_all_close(grads_b, grads_c, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(scanned.block(1), nnx.Param)),
                              nnx.to_pure_dict(nnx.state(loop.block(1), nnx.Param)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_backward_runs_in_the_compute_dtype(dtype):
  x = jax.random.normal(jax.random.key(0), (2, 5, 16), dtype)
  w = jax.random.normal(jax.random.key(1), (32, 16), dtype)
  g = jax.random.normal(jax.random.key(2), (2, 5, 32), jnp.float32)
  out, vjp = jax.vjp(logits_einsum, x, w)
  assert out.dtype == jnp.float32
  dx, dw = vjp(g)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype
  # The reference: autodiff of the fp32 einsum with the cotangent rounded to the compute dtype.
  ref = lambda x, w: jnp.einsum("BTD,VD->BTV", x.astype(jnp.float32), w.astype(jnp.float32))
  with jax.default_matmul_precision("highest"):
    ref_dx, ref_dw = jax.vjp(ref, x, w)[1](g.astype(dtype).astype(jnp.float32))
  tol = 1e-6 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(np.asarray(dx, np.float32), ref_dx, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(dw, np.float32), ref_dw, rtol=tol, atol=tol)


def test_mamba_initialization_follows_the_reference():
  """Mamba's init (docs/spec.md): conv weight and bias ~ U(-W^-1/2, W^-1/2), dt_proj ~ U(-R^-1/2, R^-1/2),
  dt = softplus(dt_bias) log-uniform in [dt_min, dt_max], A_log = log(1..N), D = 1."""
  cfg = tiny_config("mamba", d_model=256, d_state=8, dt_rank=16)
  mixer = LanguageModel(cfg, rngs=nnx.Rngs(0)).block(0).mixer1
  for x, bound in ((mixer.conv_weight[...], 0.5), (mixer.conv_bias[...], 0.5),
                   (mixer.dt_proj.kernel[...], 0.25)):
    x = np.asarray(x).ravel()
    assert x.min() >= -bound and x.max() <= bound
    # symmetric and spread over the whole interval: mean ~0, variance ~bound^2 / 3
    assert abs(x.mean()) < 0.1 * bound and abs(x.var() / (bound ** 2 / 3) - 1) < 0.2, (x.mean(), x.var())
  dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
  assert dt.min() >= cfg.dt_min * 0.99 and dt.max() <= cfg.dt_max * 1.01
  # log-uniform: log dt ~ U[log dt_min, log dt_max] (mean at the midpoint, variance width^2 / 12)
  lo, hi = np.log(cfg.dt_min), np.log(cfg.dt_max)
  assert abs(np.log(dt).mean() - (lo + hi) / 2) < 0.1 * (hi - lo)
  assert abs(np.log(dt).var() / ((hi - lo) ** 2 / 12) - 1) < 0.2
  # below dt_init_floor, dt is floored there (the reference's clamp)
  floored = MIXERS[Sublayer.MAMBA](cfg.replace(dt_min=1e-6, dt_max=1e-3, dt_init_floor=1e-4), rngs=nnx.Rngs(0))
  dt = np.asarray(jax.nn.softplus(floored.dt_bias[...]))
  assert dt.min() >= 1e-4 * 0.999 and np.mean(dt < 1.001e-4) > 0.5
  np.testing.assert_allclose(np.asarray(mixer.A_log[...])[0], np.log(np.arange(1, 9)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(mixer.D[...]), 1.0)
