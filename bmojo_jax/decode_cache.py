"""The attention sublayer's decode cache: the ring of the last S keys and values, and attention over cached parts.

`Attention.step` writes a token's key and value into slot position % S; `ring_cache` builds that ring from keys
held in position order (the parallel pass, the continuations of `bmojo_jax.continuation`); `decode_attention`
attends one query per row over the ring and the memory tokens where they lie.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF


def ring_positions(t: jax.Array | int, size: int) -> jax.Array:
  """[size] int: the position slot s of a ring of `size` slots holds once position t is written, the latest
  position <= t congruent to s mod size: t - ((t - s) mod size) (negative: the slot is still empty)."""
  return t - jnp.mod(t - jnp.arange(size), size)


def ring_valid(t: jax.Array | int, size: int, window: int | None) -> jax.Array:
  """[size] bool: the slots the query at position t attends to (after its own key is written): filled, and inside
  the window t - window < position <= t (all of them when window is None). The decode kernel derives the same
  inside (`pallas_kernels.decode_attention`)."""
  slot_pos = ring_positions(t, size)
  valid = slot_pos >= 0
  return valid if window is None else valid & (slot_pos > t - window)


def ring_cache(x: jax.Array, first: jax.Array | int, end: jax.Array | int, size: int) -> jax.Array:
  """The ring of `size` slots after the tokens before `end`, from x [B, N, K, P] holding positions
  first + [0, N): slot s holds the latest position < end congruent to s mod size (as `Attention.step` writes
  them), zeros for positions below 0. The positions end - size .. end - 1 that are >= 0 must lie in x."""
  slot_pos = ring_positions(end - 1, size)
  rows = jnp.take(x, jnp.clip(slot_pos - first, 0, x.shape[1] - 1), axis=1)
  return jnp.where((slot_pos >= 0)[None, :, None, None], rows, 0).astype(x.dtype)


def decode_attention(q: jax.Array, parts) -> jax.Array:
  """One query per row over several key sets, one softmax: q [B, H, P]; parts [(k, v [B, S_i, K, P], valid
  [B or 1, S_i])] -> o [B, H, P] (fp32 logits and softmax; the probabilities meet v in v's dtype).

  The parts (ring cache, fading tokens, store) are attended where they lie: only their logits [B, K, G, S_i]
  are concatenated, never their keys and values, so a token reads the cache once and copies none of it.
  """
  b, h, p = q.shape
  kh = parts[0][0].shape[2]
  qg = q.reshape(b, kh, h // kh, p)
  logits = [jnp.where(valid[:, None, None, :],
                      jnp.einsum("BKGP,BSKP->BKGS", qg, k, preferred_element_type=jnp.float32) / math.sqrt(p),
                      NEG_INF) for k, _, valid in parts]
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  bounds = np.cumsum([k.shape[1] for k, _, _ in parts])[:-1]
  o = sum(jnp.einsum("BKGS,BSKP->BKGP", pr.astype(v.dtype), v, preferred_element_type=jnp.float32)
          for pr, (_, v, _) in zip(jnp.split(probs, bounds, axis=-1), parts))
  return o.reshape(b, h, p).astype(q.dtype)
