"""The Mamba mixer's causal depthwise conv and SiLU as one Pallas kernel each way: `causal_conv_silu`, the public
entry, and `causal_conv_silu_reference` (`bmojo_jax.layers.causal_conv` then SiLU) that fixes its semantics.

In XLA the conv, SiLU and their gradients ran as four fusions of a Mamba sublayer reading and writing [B, T, E]
several times (~0.8 ms a sublayer at the 1.4B training shape on an H100, docs/train_speed.md); the kernels read x
once each way and recompute the pre-activation in the backward instead of storing it. Files: `kernel.py` (the
forward and backward kernels, `BlockSizes`), `reference.py` (the reference and the shape checks). There is no
TPU kernel: `bmojo_jax.kernels.get_conv_fn` takes the reference there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from bmojo_jax.layers import conv_state_after
from bmojo_jax.pallas_kernels.backend import resolve_backend
from bmojo_jax.pallas_kernels.causal_conv.kernel import BlockSizes, conv_silu_bwd, conv_silu_fwd
from bmojo_jax.pallas_kernels.causal_conv.reference import causal_conv_silu_reference, check_shapes
from bmojo_jax.pallas_kernels.selective_scan.block_sizes import largest_pow2_divisor
from bmojo_jax.pallas_kernels.sharding import per_shard

__all__ = ["BlockSizes", "causal_conv_silu", "causal_conv_silu_reference"]


def causal_conv_silu(x: jax.Array, weight: jax.Array, bias: jax.Array, state: jax.Array,
                     reach: jax.Array | None = None, *, block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """What `causal_conv_silu_reference` computes, through the Triton kernels (Pallas' interpreter on a CPU).

  x [B, T, E]; weight [W, E]; bias [E]; state [B, W-1, E]; reach [B, T] int or None. Returns (y [B, T, E] in
  x.dtype, the last W-1 inputs [B, W-1, E] in x.dtype). The arithmetic is fp32 with one rounding at the end (the
  reference rounds every step in x's dtype). Differentiable in x, weight, bias and state. Under a context mesh
  each device computes its own rows and channels.
  """
  check_shapes(x, weight, bias, state, reach)
  _, interpret = resolve_backend("gpu", interpret)
  bs = _fit(block_sizes or BlockSizes(), x.shape[2])
  reach = None if reach is None else reach.astype(jnp.int32)
  state = state.astype(x.dtype)
  bte = ("batch", None, "inner")
  fn = per_shard(functools.partial(_conv, bs=bs, interpret=interpret), {"batch": x.shape[0], "inner": x.shape[2]},
                 (bte, (None, "inner"), ("inner",), bte, ("batch", None)), bte)
  return fn(x, weight, bias, state, reach), conv_state_after(state, x)


def _fit(bs: BlockSizes, d_inner: int) -> BlockSizes:
  """block_e cut to a power of two that divides E."""
  return dataclasses.replace(bs, block_e=largest_pow2_divisor(d_inner, bs.block_e))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _conv(x, weight, bias, state, reach, bs, interpret):
  return conv_silu_fwd(x, weight, bias, state, reach, bs=bs, interpret=interpret)


def _conv_fwd(x, weight, bias, state, reach, bs, interpret):
  return _conv(x, weight, bias, state, reach, bs, interpret), (x, weight, bias, state, reach)


def _conv_bwd(bs, interpret, res, gy):
  x, weight, bias, state, reach = res
  gx, gw, gb = conv_silu_bwd(x, weight, bias, state, reach, gy, bs=bs, interpret=interpret)
  # Only the first W-1 outputs read the state: its gradient is theirs, through the reference on those tokens.
  width_1 = state.shape[1]
  head = lambda s: causal_conv_silu_reference(x[:, :width_1], weight, bias, s,
                                              None if reach is None else reach[:, :width_1])[0]
  gstate = jax.vjp(head, state)[1](gy[:, :width_1])[0]
  return (gx, gw.sum((0, 1)).astype(weight.dtype), gb.sum((0, 1)).astype(bias.dtype), gstate, None)


_conv.defvjp(_conv_fwd, _conv_bwd)
