"""Attention reference paths: blockwise = dense masked; no T×T scores with a window; exact masks; the
jax.nn.dot_product_attention path (attn_impl='cudnn') = the reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import ConfigError, LanguageModel
from bmojo_jax.attention import Attention
from bmojo_jax.kernels import dot_product_attention
from bmojo_jax.pallas_kernels.window_attention.reference import memory_attention_reference
from tests.conftest import host_normal, tiny_config


def dense_memory_attention(q, k, v, mem_k, mem_v, mem_valid, window, chunk):
  """Dense [T, T] masked attention: the obvious implementation, for small T only."""
  b, t, h, p = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, p)
  pos = np.arange(t)
  mask = pos[None, :] <= pos[:, None]
  if window is not None:
    mask &= pos[None, :] > pos[:, None] - window
  logits = jnp.where(mask, jnp.einsum("BTKGP,BSKP->BKGTS", qg, k) / np.sqrt(p), -1e30)
  if mem_k is not None:
    chunk_of = pos // chunk
    mem_logits = jnp.einsum("BTKGP,BTMKP->BKGTM", qg, mem_k[:, chunk_of]) / np.sqrt(p)
    logits = jnp.concatenate([logits, jnp.where(mem_valid[:, chunk_of][:, None, None], mem_logits, -1e30)], -1)
  probs = jax.nn.softmax(logits, -1)
  out = jnp.einsum("BKGTS,BSKP->BTKGP", probs[..., :t], v)
  if mem_k is not None:
    out += jnp.einsum("BKGTM,BTMKP->BTKGP", probs[..., t:], mem_v[:, pos // chunk])
  return out.reshape(b, t, h, p)


@pytest.mark.parametrize("t, window, chunk, m, heads", [
    (37, 8, 4, 3, (4, 2)), (32, 16, 16, 0, (2, 2)), (21, None, 5, 0, (4, 1)), (50, 12, 4, 5, (2, 1)),
])
def test_reference_matches_dense(t, window, chunk, m, heads):
  h, kh = heads
  q = host_normal(t, (2, t, h, 8))                   # inputs built on the host: no eager op per shape
  k, v = (host_normal(t + i, (2, t, kh, 8)) for i in (1, 2))
  c = -(-t // chunk)
  mem = (host_normal(t + 3, (2, c, m, kh, 8)), host_normal(t + 4, (2, c, m, kh, 8)),
         np.random.default_rng(t + 5).random((2, c, m)) < 0.6) if m else (None, None, None)
  out = jax.jit(functools.partial(memory_attention_reference, window=window, chunk=chunk))(q, k, v, *mem)
  want = jax.jit(dense_memory_attention, static_argnums=(6, 7))(q, k, v, *mem, window, chunk)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_no_quadratic_scores_with_a_window():
  t, w, c = 512, 16, 16
  q = np.zeros((1, t, 2, 8), np.float32)
  jaxpr = jax.make_jaxpr(lambda q: memory_attention_reference(q, q, q, window=w, chunk=c))(q)
  for eqn in jaxpr.jaxpr.eqns:
    for var in eqn.outvars:
      assert np.prod(var.aval.shape) < t * t, (eqn.primitive, var.aval.shape)


def test_keys_outside_window_get_exactly_zero_gradient():
  t, w, c = 24, 8, 4
  q, k, v = (host_normal(i, (1, t, 2, 8)) for i in range(3))
  query = 20
  gk = jax.jit(jax.grad(lambda k: jnp.sum(memory_attention_reference(q, k, v, window=w, chunk=c)[:, query])))(k)
  norms = np.abs(np.asarray(gk)[0]).sum((-1, -2))                  # checked on the host
  assert np.all(norms[:query - w + 1] == 0) and np.all(norms[query + 1:] == 0)
  assert np.all(norms[query - w + 1:query + 1] > 0)


def _grad_norms(family, wrt, planted=6):
  """|d out[t_query] / d input[t']| per t' for the Attention module of `family` (a: input, f: fading source)."""
  cfg = tiny_config(family, window=4, chunk_size=4, n_fading=2, n_eidetic=4, eidetic_per_chunk=1)
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  a = 0.1 * host_normal(1, (1, 24, cfg.d_model))   # inputs built on the host: no eager op per shape
  a[:, planted] = 5.0                               # a planted, surprising token
  f = host_normal(2, (1, 24, cfg.d_model))
  query = 23                                       # end of chunk 5; its window is 20..23
  def out(a, f):
    return jnp.sum(attn(a, fading=f if cfg.fading else None)[0][:, query])
  g = jax.jit(jax.grad(out, argnums=(0, 1)))(a, f)[0 if wrt == "a" else 1]
  return np.abs(np.asarray(g)[0]).sum(-1)          # on the host


def test_memory_reaches_beyond_the_window():
  # Eidetic: the planted token at position 6 (chunk 1) is in the FIFO store of chunk 5 (chunks 1-4, k_e 1),
  # so it reaches query 23 through its key and value; planted in chunk 0 it has been evicted.
  assert _grad_norms("bmojo", "a", planted=6)[6] > 0
  assert _grad_norms("bmojo", "a", planted=2)[2] == 0
  # Fading: the last 2 mixer outputs of chunk 4 (positions 18, 19) are the fading tokens of chunk 5.
  g = _grad_norms("bmojo_f", "f")
  assert np.all(g[18:20] > 0) and np.all(g[:18] == 0) and np.all(g[20:] == 0)
  # B'MOJO-F has no eidetic store: the planted token is beyond the window and unreachable.
  assert np.all(_grad_norms("bmojo_f", "a")[:20] == 0)


def test_hybrid_has_zero_gradient_beyond_the_window():
  g = _grad_norms("hybrid", "a")
  assert np.all(g[:20] == 0) and np.all(g[20:] > 0)


@pytest.mark.parametrize("window", [None, 8])
def test_dot_product_attention_matches_reference(window):
  """attn_impl='cudnn' goes through jax.nn.dot_product_attention; its XLA implementation (the one a CPU runs)
  gives the reference's output and gradients for full causal and sliding-window attention with GQA."""
  q = host_normal(0, (2, 37, 4, 16))
  k, v = (host_normal(i, (2, 37, 2, 16)) for i in (1, 2))
  run = lambda fn, **kw: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, window=window, chunk=4, **kw)))
  out = jax.jit(jax.value_and_grad(run(dot_product_attention, implementation="xla"), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.jit(jax.value_and_grad(run(memory_attention_reference), argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cudnn_attention_refuses_memory_and_cpu():
  with pytest.raises(ConfigError, match="attn_impl='cudnn' has no memory tokens"):
    tiny_config("bmojo", compute=dict(attn_impl="cudnn"))
  if jax.default_backend() != "gpu":
    model = LanguageModel(tiny_config("hybrid", compute=dict(attn_impl="cudnn")), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attn_impl='cudnn' needs a GPU, but the backend is 'cpu'"):
      model(np.zeros((1, 8), np.int32))
