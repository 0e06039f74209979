"""A decode step's cache update as the model uses it: `decode_attn_impl` picks the kernel or the reference, an
attention sublayer's decode state through the kernel = through the reference, and the step shifts the fading
buffer and the innovation history in the kernel (pallas_kernels/decode_update; the kernel itself against its
reference: tests/test_decode_update.py)."""

import jax
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import kernels
from bmojo_jax.attention import Attention
from bmojo_jax.config import DecodeAttnImpl
from bmojo_jax.kernels import get_decode_update_fn
from bmojo_jax.memory.store import NO_POS
from bmojo_jax.pallas_kernels.decode_update import BlockSizes, decode_token_update, decode_token_update_reference
from tests.conftest import host_normal, jaxpr_eqns, tiny_config
from tests.test_decode_update import assert_same


def test_update_fn_follows_decode_attn_impl(monkeypatch):
  """decode_attn_impl names both kernels of a decode step's attention sublayer: reference -> the jnp form,
  pallas -> the kernel, auto -> the reference on CPU and the kernel on a GPU (where the resolver leaves `auto`
  to the per-call choice of the attention)."""
  assert get_decode_update_fn("reference") is decode_token_update_reference
  assert get_decode_update_fn("pallas") is decode_token_update
  assert get_decode_update_fn("auto") is (decode_token_update if jax.default_backend() == "gpu" else
                                          decode_token_update_reference)
  monkeypatch.setattr(kernels, "resolve_decode_attn_impl", lambda impl, backend=None: DecodeAttnImpl(impl)
                      if impl != "auto" else DecodeAttnImpl.AUTO)                    # the GPU's resolution
  assert get_decode_update_fn("auto") is decode_token_update
  assert get_decode_update_fn("reference") is decode_token_update_reference
  with pytest.raises(ValueError, match="num_warps must be positive"):
    BlockSizes(num_warps=0)
  with pytest.raises(ValueError, match="shift_rows must be positive"):
    BlockSizes(shift_rows=0)


def test_attention_step_pallas_state_equals_reference():
  """`Attention.step` of a B'MOJO sublayer (k_e 3, ring of 8) over 19 tokens, through the chunk boundaries and
  ring wraps, with decode_attn_impl pallas and reference: the decode states are equal bit for bit (the update
  moves the same data; the state does not depend on the attention output) and the outputs agree."""
  make = lambda impl: Attention(tiny_config("bmojo", init_std=0.1, n_eidetic=6, eidetic_per_chunk=3,
                                            compute=dict(decode_attn_impl=impl)), rngs=nnx.Rngs(0))
  a, fading = host_normal(8, (2, 19, 2, 1, 32))

  @nnx.jit
  def decode(module):
    def body(state, x):
      y, state = module.step(x[0], state, fading=x[1])
      return state, (y, state.cand.pos)
    return jax.lax.scan(body, module.init_state(2, 8), (a, fading))

  (state_p, (y_p, pos_p)), (state_r, (y_r, pos_r)) = decode(make("pallas")), decode(make("reference"))
  assert_same(state_p, state_r)
  np.testing.assert_array_equal(np.asarray(pos_p), np.asarray(pos_r))
  assert int(np.sum(np.asarray(pos_r) != NO_POS)) > 10                    # candidates were taken at every chunk
  np.testing.assert_allclose(np.asarray(y_p), np.asarray(y_r), atol=1e-5, rtol=1e-5)


def concatenates(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every concatenate in a jaxpr and the jaxprs inside its equations (loops, conditionals)."""
  return [tuple(eqn.outvars[0].aval.shape) for eqn, _ in jaxpr_eqns(jaxpr) if eqn.primitive.name == "concatenate"]


@pytest.mark.parametrize("family", ["bmojo", "bmojo_f"])
def test_attention_step_shifts_in_the_kernel(family):
  """With decode_attn_impl pallas, `Attention.step` shifts the fading buffer and the history in the update kernel:
  its program has no concatenate of the fading buffer's shape [B, M_f, D] (the reference's step has one) nor of
  the history and the input [B, 5, D] (the reference's step has one, `last_inputs`; the score reads the history as
  it is, `predictor_taps`)."""
  cfg = lambda impl: tiny_config(family, compute=dict(decode_attn_impl=impl))
  b, d = 2, cfg("pallas").d_model
  a, fading = host_normal(11, (2, b, 1, d))
  counts = {}
  for impl in ("pallas", "reference"):
    module = Attention(cfg(impl), rngs=nnx.Rngs(0))
    state = module.init_state(b, 8)
    jaxpr = jax.make_jaxpr(lambda a, f, s: module.step(a, s, fading=f))(a, fading, state).jaxpr
    shapes = concatenates(jaxpr)
    counts[impl] = (shapes.count(state.next_fading.shape), shapes.count((b, 5, d)))
  history = family == "bmojo"                                        # B'MOJO-F has no eidetic score
  assert counts == {"pallas": (0, 0), "reference": (1, int(history))}, counts
