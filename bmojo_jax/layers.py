"""Basic layers: parameters with logical axes, projections (`Projection`), RMSNorm, RoPE, SwiGLU MLP, causal
depthwise conv.

Shape letters are those of `bmojo_jax/typing.py`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bmojo_jax import typing as tp
from bmojo_jax.config import KernelLayout, ModelConfig

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> nnx.Param:
  """A parameter carrying its logical axis names (`nnx.get_partition_spec` reads them)."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), sharding_names=tuple(axes), eager_sharding=False)


class Projection(nnx.Module):
  """A linear map without bias, x [..., *in] -> [..., *out]: the projections of every mixer.

  `spec` is the einsum of the training layout (`KernelLayout.IN_OUT`), e.g. "BTD,DHP->BTHP": its kernel
  letters are the contracted dims first, then the output dims ([D, H, P]); `shape` and `axes` (logical axis
  names) are given in that order. With `cfg.compute.kernel_layout` OUT_IN the kernel is stored output dims
  first, contracted dims last ([H, P, D], axes permuted alike) and the einsum is "BTD,HPD->BTHP": at one token
  a row XLA:GPU reads it as a row reduction near the copy bandwidth (docs/inference.md, "Kernel layout").
  Either way the parameter is `kernel` (the same state path), drawn by `init` in the IN_OUT shape and
  transposed, so one seed gives the same map in both layouts; x and the kernel are cast to the compute dtype
  before the einsum (as `nnx.Einsum`, which this replaces, did).
  """

  def __init__(self, spec: str, shape: Sequence[int], axes: Sequence[str | None], cfg: ModelConfig,
               rngs: nnx.Rngs, init: Initializer):
    lhs, out = spec.replace(" ", "").split("->")
    x_letters, w_letters = lhs.split(",")
    n_in = next((i for i, c in enumerate(w_letters) if c not in x_letters), len(w_letters))
    contracted, produced = w_letters[:n_in], w_letters[n_in:]
    if (not contracted or not produced or any(c in out for c in contracted)
        or any(c not in out or c in x_letters for c in produced)):
      raise ValueError(f"Projection spec {spec!r}: the kernel's letters must be the contracted dims, then the "
                       "output dims (the in_out layout)")
    if len(shape) != len(w_letters) or len(axes) != len(w_letters):
      raise ValueError(f"Projection spec {spec!r}: shape {tuple(shape)} and axes {tuple(axes)} must have one "
                       f"entry per kernel letter ({w_letters})")
    self.layout = cfg.compute.kernel_layout
    self.n_in = n_in                                  # contracted dims of the kernel
    self.out_shape = tuple(shape[n_in:])           # what x's contracted dims become (either layout)
    self.dtype = cfg.compute.jnp_dtype
    kernel = init(rngs.params(), tuple(shape), cfg.weight_dtype)
    axes = tuple(axes)
    if self.layout == KernelLayout.OUT_IN:
      self.spec = f"{x_letters},{produced}{contracted}->{out}"
      kernel, axes = transpose_kernel(kernel, n_in), axes[n_in:] + axes[:n_in]
    else:
      self.spec = f"{x_letters},{w_letters}->{out}"
    self.kernel = nnx.Param(kernel, sharding_names=axes, eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))

  def move_to(self, layout: KernelLayout) -> tuple[int, int] | None:
    """(n_first, n_dims) of `transpose_kernel` that takes this kernel (or an array shaped like it, a leading
    layers axis included) to `layout`; None when it is stored so already."""
    if KernelLayout(layout) == self.layout:
      return None
    n_dims = self.n_in + len(self.out_shape)
    return (self.n_in if self.layout == KernelLayout.IN_OUT else len(self.out_shape)), n_dims


def transpose_kernel(kernel: jax.Array, n_first: int, n_dims: int | None = None) -> jax.Array:
  """kernel [..., *a, *b] -> [..., *b, *a], a being its first n_first dims of the trailing n_dims (default: all
  of them; a leading layers axis of scanned blocks is not among them)."""
  n_dims = kernel.ndim if n_dims is None else n_dims
  lead = kernel.ndim - n_dims
  perm = tuple(range(lead)) + tuple(range(lead + n_first, kernel.ndim)) + tuple(range(lead, lead + n_first))
  return jnp.transpose(kernel, perm)


def einsum_layer(spec: str, shape: Sequence[int], axes: Sequence[str | None], cfg: ModelConfig,
                 rngs: nnx.Rngs, std: float) -> Projection:
  """A `Projection` (no bias) whose kernel ~ N(0, std²) carries logical axes; spec documents the shapes."""
  return Projection(spec, shape, axes, cfg, rngs, nnx.initializers.normal(std))


class RMSNorm(nnx.Module):
  """y = x / rms(x) · scale, computed in fp32, returned in the compute dtype. x [..., D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.dtype = cfg.compute.jnp_dtype
    self.scale = param(rngs, nnx.initializers.ones, (cfg.d_model,), (tp.EMBED,), cfg.weight_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_tables(positions: jax.Array, half: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """(sin, cos) [B|1, T, 1, P/2] fp32 of positions [T] or [B, T] int (fp32 angles: exact at long positions)."""
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)                   # [P/2]
  angle = positions.astype(jnp.float32)[..., None] * freq                          # [(B,) T, P/2]
  if angle.ndim == 2:
    angle = angle[None]
  return jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form) in x's dtype. x [B, T, H, P]; positions [T] or [B, T] int.

  With x = (x1, x2) its two halves: out = (x1·cos − x2·sin, x2·cos + x1·sin). Computed on x viewed as
  [B, T, H, 2, P/2]: out = x·cos + rev(x)·(−sin, +sin), rev swapping the halves, so no split or concat; the
  tables are fp32 (`rope_tables`), cast to x's dtype. In fp32 this is `rope_reference` bit for bit."""
  half = x.shape[-1] // 2
  sin, cos = (a.astype(x.dtype)[..., None, :] for a in rope_tables(positions, half, theta))  # [B|1, T, 1, 1, P/2]
  xr = x.reshape(*x.shape[:-1], 2, half)                                           # [B, T, H, 2, P/2]
  sign = jnp.array([-1, 1], x.dtype)[:, None]                                      # [2, 1]
  out = xr * cos + xr[..., ::-1, :] * (sign * sin)
  return out.reshape(x.shape)


def rope_reference(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """`rope` computed in fp32 with a split and a concat (the form before the compute-dtype one)."""
  sin, cos = rope_tables(positions, x.shape[-1] // 2, theta)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class SwiGLU(nnx.Module):
  """out = (SiLU(x W_gate) ⊙ x W_up) W_down. x [B, T, D] -> [B, T, D]; stateless (mixer protocol of
  `bmojo_jax.model`: the state is always None)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.ff_size
    out_std = cfg.init_std / (2 * cfg.n_blocks) ** 0.5
    self.gate = einsum_layer("BTD,DF->BTF", (d, f), (tp.EMBED, tp.MLP), cfg, rngs, cfg.init_std)
    self.up = einsum_layer("BTD,DF->BTF", (d, f), (tp.EMBED, tp.MLP), cfg, rngs, cfg.init_std)
    self.down = einsum_layer("BTF,FD->BTD", (f, d), (tp.MLP, tp.EMBED), cfg, rngs, out_std)

  def __call__(self, x: jax.Array, state=None, *, fading=None, fading_norm=None, cache_size: int | None = None,
               packing=None):
    del state, fading, fading_norm, cache_size, packing
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x)), None

  def start_chunk(self, state=None, fading_norm=None):
    """No memory chunks (`Mixer.start_chunk`)."""
    return state

  def step(self, x: jax.Array, state=None, *, fading=None, fading_norm=None, entered: bool = False):
    return self(x)

  def init_state(self, batch: int, cache_size: int | None = None):
    return None


@jax.custom_vjp
def logits_einsum(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [B, T, D] · w [V, D] -> logits [B, T, V] in fp32 (fp32 accumulation), with a backward in x's dtype.

  The backward rounds the fp32 cotangent to x's dtype before its two matmuls (dx = g·w, dw = gᵀ·x, fp32
  accumulation), as mixed-precision training does everywhere else: left to autodiff, an fp32 cotangent times
  a bf16 operand runs both matmuls in fp32, twice as slow at a large vocabulary (docs/train_speed.md, "What
  changed"). In fp32 this is exactly the autodiff gradient.
  """
  return jnp.einsum("BTD,VD->BTV", x, w, preferred_element_type=jnp.float32)


def _logits_fwd(x, w):
  return logits_einsum(x, w), (x, w)


def _logits_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = jnp.einsum("BTV,VD->BTD", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.einsum("BTV,BTD->VD", g, x, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


logits_einsum.defvjp(_logits_fwd, _logits_bwd)


def causal_conv(u: jax.Array, weight: jax.Array, bias: jax.Array, state: jax.Array,
                reach: jax.Array | None = None):
  """Causal depthwise conv with a carried state.

  u [B, T, E]; weight [W, E] (weight[W-1] multiplies the current token); bias [E];
  state [B, W-1, E], the W-1 inputs before u (zeros at the sequence start);
  reach [B, T] int or None: how many tokens before t the conv may read (a packed row: the position within
  the document, so the conv restarts from zeros at a document's first token); None: all of them.
  Returns (y [B, T, E], new_state [B, W-1, E]).
  """
  width = weight.shape[0]
  t = u.shape[1]
  xpad = jnp.concatenate([state.astype(u.dtype), u], axis=1)                       # [B, T+W-1, E]

  def tap(j):                                                                       # token t - (W-1-j)
    x = xpad[:, j:j + t]
    if reach is not None and j < width - 1:
      x = jnp.where((reach >= width - 1 - j)[..., None], x, 0)
    return x * weight[j].astype(u.dtype)

  y = bias.astype(u.dtype) + sum(tap(j) for j in range(width))
  return y, conv_state_after(state, u)


def conv_state_after(state: jax.Array, u: jax.Array) -> jax.Array:
  """The conv's carried state after u: the last W-1 of the inputs [state, u] ([B, W-1, E] in u's dtype; state
  [B, W-1, E], u [B, T, E], any T >= 1)."""
  return jnp.concatenate([state.astype(u.dtype), u], axis=1)[:, u.shape[1]:]
