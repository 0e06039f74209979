"""What inference_bench.py's decode timings use: a cache placed at a context without filling it, and greedy
sampling compiled once."""

import jax
import jax.numpy as jnp

from bmojo_jax.attention import AttnState
from bmojo_jax.inference import sample

greedy = jax.jit(lambda logits: sample(logits, None))   # logits [B, V] -> argmax tokens [B] int32


def at_position(cache, pos: int):
  """The cache with every attention position set to `pos` (ring contents are irrelevant to the cost)."""
  return jax.tree.map(lambda s: s._replace(pos=jnp.full_like(s.pos, pos)) if isinstance(s, AttnState) else s,
                      cache, is_leaf=lambda s: isinstance(s, AttnState))
