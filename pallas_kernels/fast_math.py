"""Fast fp32 math for the compiled Pallas (Triton) kernels, with a plain-jnp fallback for interpret mode.

Nsight Compute on the H100 showed both kernel families spending most of their instructions on libdevice's
exact functions and on multiplies and adds that were never fused: the Triton pipeline XLA runs does not contract
a·b + c into an FMA, and libdevice's exp2f wraps the one `ex2` instruction in a denormal range check and two
scalings (selective scan forward: 17.5 instructions per (token, channel, state); docs/selective_scan_notes.md).
`FastMath(approx=True)` writes the PTX instead.

Errors with `approx`: exp2 ≤ 2^-22 relative (results under 2^-126 flush to zero); softplus ≤ 2e-5 relative;
sigmoid ≤ 2^-21 relative. Without `approx` (interpret mode: there is no PTX on a CPU) every method is the jnp
expression `jax.nn` would use, so CPU tests check the algorithms and GPU tests check these instructions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


class FastMath(NamedTuple):
  """Elementwise fp32 math inside a kernel body; `approx` selects PTX (compiled) or jnp (interpret)."""
  approx: bool

  @classmethod
  def for_launch(cls, requested: bool, interpret: bool) -> "FastMath":
    """What a `pallas_call` launcher gives its kernel: PTX when asked for and compiled, jnp in interpret mode."""
    return cls(requested and not interpret)

  def exp2(self, x):
    """2^x."""
    if not self.approx:
      return jnp.exp2(x)
    return _asm("ex2.approx.ftz.f32 $0, $1;", x)

  def fma(self, a, b, c):
    """a·b + c, broadcasting."""
    if not self.approx:
      return a * b + c
    return _asm("fma.rn.f32 $0, $1, $2, $3;", a, b, c)

  def softplus(self, x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|)."""
    if not self.approx:
      return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))
    e = self.exp2(jnp.abs(x) * -LOG2E)                                 # (0, 1]
    # log1p(e): lg2(1 + e) loses e's low bits when e is small; there the series (error e^4/4) is exact enough.
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    log1p = jnp.where(e < 2.0 ** -6, series, _asm("lg2.approx.ftz.f32 $0, $1;", 1.0 + e) * LN2)
    return jnp.maximum(x, 0.0) + log1p

  def sigmoid(self, x):
    """1 / (1 + e^-x)."""
    if not self.approx:
      return 1.0 / (1.0 + jnp.exp(-x))
    return _asm("rcp.approx.ftz.f32 $0, $1;", 1.0 + self.exp2(x * -LOG2E))


def _asm(asm: str, *args):
  """One fp32 PTX instruction applied elementwise to args broadcast to a common shape."""
  shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in args))
  args = [jnp.broadcast_to(jnp.asarray(x, jnp.float32), shape) for x in args]
  [out] = pltriton.elementwise_inline_asm(
      asm, args=args, constraints="=f" + ",f" * len(args), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
  return out
