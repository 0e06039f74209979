"""The causal depthwise conv + SiLU of the Mamba mixer in plain jnp: the semantics the kernels match.

    y_t = SiLU(bias + Σ_j weight[j] ⊙ x_{t-(W-1-j)})      x [B, T, E], weight [W, E], bias [E]

The W-1 inputs before x_0 come from `state` [B, W-1, E] (zeros at a sequence's start); with `reach` [B, T] a tap
reading d tokens back contributes only where reach_t >= d (a packed row restarts the conv at each document).
"""

from __future__ import annotations

import jax

from bmojo_jax.layers import causal_conv


def check_shapes(x, weight, bias, state, reach=None):
  """Raises ValueError naming the argument whose shape does not fit x [B, T, E]."""
  if x.ndim != 3:
    raise ValueError(f"causal_conv_silu: x must be [B, T, E], got shape {x.shape}")
  b, t, e = x.shape
  width = weight.shape[0] if weight.ndim == 2 else 0
  if weight.ndim != 2 or weight.shape[1] != e or width < 2:
    raise ValueError(f"causal_conv_silu: weight must be [W >= 2, E={e}], got shape {weight.shape}")
  if bias.shape != (e,):
    raise ValueError(f"causal_conv_silu: bias must be [E={e}], got shape {bias.shape}")
  if state.shape != (b, width - 1, e):
    raise ValueError(f"causal_conv_silu: state must be [B={b}, W-1={width - 1}, E={e}], got shape {state.shape}")
  if reach is not None and reach.shape != (b, t):
    raise ValueError(f"causal_conv_silu: reach must be [B={b}, T={t}], got shape {reach.shape}")


def causal_conv_silu_reference(x: jax.Array, weight: jax.Array, bias: jax.Array, state: jax.Array,
                               reach: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(SiLU(causal_conv(x)) [B, T, E] in x.dtype, the last W-1 inputs [B, W-1, E]): `bmojo_jax.layers.causal_conv`
  (computed in x's dtype) followed by `jax.nn.silu`."""
  y, new_state = causal_conv(x, weight, bias, state, reach)
  return jax.nn.silu(y), new_state
