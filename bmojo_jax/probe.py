"""A model's forward pass sublayer by sublayer, exposing what each attention sublayer sees: for analyses of
what the memory selects (benchmarks/studies/mqar_selection.py, tests/test_selection.py)."""

import jax.numpy as jnp
import numpy as np


def attention_inputs(model, tokens):
  """Per attention sublayer: (attention, a [B, T, D], fading source [B, T, D]); the pass is the model's own
  (checked against `model.hidden`)."""
  x = jnp.take(model.embed[...], tokens, axis=0).astype(model.cfg.compute.jnp_dtype)
  out = []
  for i in range(model.cfg.n_blocks):
    block = model.block(i)
    s = block.mixer1(block.norm1(x))[0]
    h = x + s
    a, fading = block.norm2(h), block.norm2(s)
    out.append((block.mixer2, a, fading))
    x = h + block.mixer2(a, fading=fading)[0]
  np.testing.assert_allclose(x, model.hidden(tokens), atol=1e-4, rtol=1e-4)
  return out
