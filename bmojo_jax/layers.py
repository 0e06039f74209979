"""Basic layers: parameters with logical axes, RMSNorm, RoPE, SwiGLU MLP, causal depthwise conv.

Shape letters are those of `bmojo_jax/typing.py`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bmojo_jax import typing as tp
from bmojo_jax.config import ModelConfig

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> nnx.Param:
  """A parameter carrying its logical axis names (`nnx.get_partition_spec` reads them)."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), sharding_names=tuple(axes), eager_sharding=False)


def einsum_layer(spec: str, shape: Sequence[int], axes: Sequence[str | None], cfg: ModelConfig,
                 rngs: nnx.Rngs, std: float) -> nnx.Einsum:
  """An `nnx.Einsum` projection (no bias) whose kernel carries logical axes; spec documents the shapes."""
  return nnx.Einsum(spec, tuple(shape), dtype=cfg.compute.jnp_dtype, param_dtype=cfg.weight_dtype,
                    kernel_init=nnx.initializers.normal(std), rngs=rngs,
                    kernel_metadata={"sharding_names": tuple(axes), "eager_sharding": False})


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

  def step(self, x: jax.Array, state=None, *, fading=None):
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
  return y, xpad[:, t:]
