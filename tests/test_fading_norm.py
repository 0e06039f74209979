"""The fading source normalized on the rows read only (`Block` hands s and norm_2 to the memory attention) is
the same model as normalizing all of s first: equal logits, gradients, decode cache and decoded logits (fp32).
The decode cache keeps the read-outs as the attention gets them (s itself, or norm_2(s) when normalized first),
so its next_fading is compared through the tokens decoded across a chunk boundary, which read it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bmojo_jax import LanguageModel
from bmojo_jax import model as model_lib
from bmojo_jax.attention import AttnState
from tests.conftest import tiny_config


def _norm_all_first(self, x, cache=None, *, cache_size=None, decode=False, packing=None):
  """`Block.__call__` as it was: norm_2 over all of s [B, T, D], then the attention reads its rows."""
  state1, state2 = cache if cache is not None else (None, None)

  def run(mixer, inputs, state, fading):
    if decode:
      return mixer.step(inputs, state, fading=fading, entered=True)
    return mixer(inputs, state, fading=fading, cache_size=cache_size, packing=packing)

  s, state1 = run(self.mixer1, self.norm1(x), state1, None)
  h = x + s
  y, state2 = run(self.mixer2, self.norm2(h), state2, self.norm2(s) if self.fading_source else None)
  return h + y, (state1, state2)


def _start_chunk_of_normed_rows(self, cache):
  """`Block.start_chunk` for a cache whose read-outs are normed already (`_norm_all_first`)."""
  return self.mixer1.start_chunk(cache[0]), self.mixer2.start_chunk(cache[1])


PREFILL = 20   # a multiple of the tiny chunk (4): the first decoded token's boundary reads the prefill's read-outs


def _without_next_fading(cache):
  """The cache with every attention state's next_fading left out."""
  is_attn = lambda x: isinstance(x, AttnState)
  return jax.tree.map(lambda x: x._replace(next_fading=None) if is_attn(x) else x, cache, is_leaf=is_attn)


def _outputs(cfg, tokens, targets, segment_ids, more):
  """(logits, gradients, (prefill cache, decoded logits, decoded cache) or None when packed): one compiled
  program; the decoding prefills tokens[:, :PREFILL] and steps through more [B, n] from there."""
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens, segment_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

  @jax.jit
  def run(params):
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    if segment_ids is not None:
      return logits, grads, None
    decoder = nnx.merge(graphdef, params)
    _, cache = decoder.prefill(tokens[:, :PREFILL])
    prefilled, steps = cache, []
    for i in range(more.shape[1]):
      step_logits, cache = decoder.step(more[:, i], cache)
      steps.append(step_logits)
    return logits, grads, (_without_next_fading(prefilled), jnp.stack(steps, 1), _without_next_fading(cache))

  logits, grads, prefill = run(params)
  return logits, nnx.to_pure_dict(grads), prefill


@pytest.mark.parametrize("family,selection,packed", [   # the inner loop: logits, grads and the prefill cache
    ("bmojo", "innovation", False),
    pytest.param("bmojo", "ssm_error", True, marks=pytest.mark.slow),      # CI: packed rows, a score of all rows
    pytest.param("bmojo_f", "innovation", True, marks=pytest.mark.slow)])  # CI: fading tokens only, packed
def test_fading_norm_on_rows_read_equals_norm_all(family, selection, packed, monkeypatch):
  cfg = tiny_config(family, selection=selection, init_std=0.1,
                    compute=dict(scan_impl="sequential", attn_impl="reference"))
  tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, 64)
  targets = jax.random.randint(jax.random.key(1), (2, 21), 0, 64)
  ids = np.repeat(np.array([[1] * 9 + [2] * 12]), 2, 0).astype(np.int32) if packed else None
  more = jax.random.randint(jax.random.key(2), (2, 5), 0, 64)        # positions 20..24: two chunk boundaries
  fast = _outputs(cfg, tokens, targets, ids, more)
  monkeypatch.setattr(model_lib.Block, "__call__", _norm_all_first)
  monkeypatch.setattr(model_lib.Block, "start_chunk", _start_chunk_of_normed_rows)
  ref = _outputs(cfg, tokens, targets, ids, more)
  np.testing.assert_allclose(fast[0], ref[0], rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(fast[1], ref[1], rtol=1e-5, atol=1e-7)
  if fast[2] is not None:
    chex.assert_trees_all_close(fast[2], ref[2], rtol=1e-6, atol=1e-6)
