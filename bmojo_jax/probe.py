"""A model's forward pass sublayer by sublayer, exposing what each attention sublayer sees: for analyses of
what the memory selects (benchmarks/studies/mqar_selection.py, tests/test_selection.py)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx


def sublayer_inputs(model, tokens):
  """The pass itself, traceable (jit it): per attention sublayer (a [B, T, D], fading source [B, T, D]), and the
  last block's output x [B, T, D]."""
  x = jnp.take(model.embed[...], tokens, axis=0).astype(model.cfg.compute.jnp_dtype)
  out = []
  for i in range(model.cfg.n_blocks):
    block = model.block(i)
    s = block.mixer1(block.norm1(x))[0]
    h = x + s
    a, fading = block.norm2(h), block.norm2(s)
    out.append((a, fading))
    x = h + block.mixer2(a, fading=fading)[0]
  return out, x


_sublayer_inputs = nnx.jit(sublayer_inputs)          # one compile per model shape, not op by op
_hidden = nnx.jit(lambda model, tokens: model.hidden(tokens))


def attention_inputs(model, tokens):
  """Per attention sublayer: (attention, a [B, T, D], fading source [B, T, D]); the pass is the model's own
  (checked against `model.hidden`)."""
  out, x = _sublayer_inputs(model, tokens)
  np.testing.assert_allclose(x, _hidden(model, tokens), atol=1e-4, rtol=1e-4)
  return [(model.block(i).mixer2, a, fading) for i, (a, fading) in enumerate(out)]
