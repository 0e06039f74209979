"""Packed documents: a row of T tokens that holds several documents (docs/spec.md, "Packed documents").

The caller describes a packed row by `segment_ids` [B, T] (as `train/data/text.py` emits them: one id per
document, 0 on padding). A segment is a maximal run of equal ids, so ids need not be unique or increasing:
[1, 1, 2, 2, 1] is three segments. Nothing crosses a segment boundary: attention keys, memory tokens, the SSM
and conv states, the innovation history. The row's first segment continues whatever state the pass starts
from (none in training), so a packed row gives the outputs of its segments run one by one.

`Packing` holds what the layers need, derived once per forward pass:

    ids        [B, T] int32  the segment's index in the row (0, 1, …): equal ids <=> same document
    offset     [B, T] int32  the token's position within its segment (0 at the segment's first token)
    end        [B, T] int32  the row position one past the segment's last token
    positions  [B, T] int32  RoPE positions: the caller's `positions` (e.g. the position within a document that
                             started in an earlier row), else `offset`
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Packing(NamedTuple):
  ids: jax.Array
  offset: jax.Array
  end: jax.Array
  positions: jax.Array

  @property
  def starts(self) -> jax.Array:
    """[B, T] bool: the token starts a segment after the row's first one (a state restarts before it)."""
    return (self.offset == 0) & (jnp.arange(self.offset.shape[1]) > 0)


def packing(segment_ids: jax.Array | None, positions: jax.Array | None, shape: tuple[int, int]
            ) -> Packing | None:
  """The `Packing` of a [B, T] batch; None when neither input is given (one document per row).

  positions alone (RoPE positions, one document per row) gives a Packing with one segment per row.
  """
  if segment_ids is None and positions is None:
    return None
  b, t = shape
  for name, x in (("segment_ids", segment_ids), ("positions", positions)):
    if x is not None and (x.shape != (b, t) or not jnp.issubdtype(x.dtype, jnp.integer)):
      raise ValueError(f"{name} must be an integer array of the tokens' shape {(b, t)}; got {x.dtype}{x.shape}")
  iota = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    change = jnp.zeros((b, t), bool)
  else:
    change = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
  ids = jnp.cumsum(change, axis=1, dtype=jnp.int32)
  offset = iota - jax.lax.cummax(jnp.where(change, iota, 0), axis=1)
  next_start = jnp.where(change, iota, t)[:, 1:]                                   # starts after position t
  end = jax.lax.cummin(jnp.pad(next_start, ((0, 0), (0, 1)), constant_values=t), axis=1, reverse=True)
  positions = offset if positions is None else positions.astype(jnp.int32)
  return Packing(ids=ids, offset=offset, end=end, positions=positions)
