"""The Mamba (S6) mixer, as in the Mamba paper (docs/spec.md, "Mamba mixer").

    (u, z) = x W_in                         x [B, T, D] -> u, z [B, T, E]
    u      = SiLU(causal_conv(u))           depthwise, kernel W = 4, carried state [B, W-1, E]
    (dt_low, B_t, C_t) = u W_x              [B, T, R], [B, T, N], [B, T, N]
    dt     = softplus(dt_low W_dt + dt_bias)  (fused into the scan)
    h_t    = exp(dt_t·A) ⊙ h_{t-1} + (dt_t·u_t) ⊗ B_t,   A = -exp(A_log) [E, N]
    y_t    = h_t·C_t + D ⊙ u_t
    out    = (y ⊙ SiLU(z)) W_out            [B, T, D]

The same `__call__` serves the parallel pass (any T, optional initial state) and the decode step (T = 1);
the module follows the mixer protocol of `bmojo_jax.model` (`__call__`, `step`, `init_state`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bmojo_jax import typing as tp
from bmojo_jax.config import ConvImpl, KernelLayout, ModelConfig, ScanImpl
from bmojo_jax.kernels import get_conv_fn, get_scan_fn
from bmojo_jax.layers import Projection, einsum_layer, param
from bmojo_jax.segments import Packing
from bmojo_jax.pallas_kernels.sharding import constrain


class MambaState(NamedTuple):
  conv: jax.Array  # [B, W-1, E] the last W-1 conv inputs
  ssm: jax.Array   # [B, E, N] fp32


def _a_log_init(key, shape, dtype):
  """S4D-real: A_log[e, n] = log(n + 1)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """dt ~ log-uniform[dt_min, dt_max] (clamped at floor); bias = softplus^{-1}(dt)."""
  def init(key, shape, dtype):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _symmetric_uniform(bound: float):
  """U(-bound, bound): PyTorch's default for Conv1d / Linear weights (bound = fan_in^-1/2), as Mamba uses."""
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


class Mamba(nnx.Module):
  """Mamba mixer. `__call__(x, state=None) -> (out, final_state)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, e, n, r, w = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
    pdt = cfg.weight_dtype
    self.cfg = cfg
    self.in_proj = einsum_layer("BTD,DJE->BTJE", (d, 2, e), (tp.EMBED, None, tp.INNER), cfg, rngs, cfg.init_std)
    conv_init = _symmetric_uniform(1.0 / math.sqrt(w))           # depthwise: fan-in W (docs/spec.md)
    self.conv_weight = param(rngs, conv_init, (w, e), (tp.CONV, tp.INNER), pdt)
    self.conv_bias = param(rngs, conv_init, (e,), (tp.INNER,), pdt)
    self.x_proj = einsum_layer("BTE,EX->BTX", (e, r + 2 * n), (tp.INNER, None), cfg, rngs, cfg.init_std)
    self.dt_proj = Projection("BTR,RE->BTE", (r, e), (tp.RANK, tp.INNER), cfg, rngs, _symmetric_uniform(r ** -0.5))
    self.dt_bias = param(rngs, _dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), (e,), (tp.INNER,),
                         pdt)
    self.A_log = param(rngs, _a_log_init, (e, n), (tp.INNER, tp.STATE), pdt)
    self.D = param(rngs, nnx.initializers.ones, (e,), (tp.INNER,), pdt)
    self.out_proj = einsum_layer("BTE,ED->BTD", (e, d), (tp.INNER, tp.EMBED), cfg, rngs,
                                 cfg.init_std / (2 * cfg.n_blocks) ** 0.5)

  def __call__(self, x: jax.Array, state: MambaState | None = None, *, fading=None, fading_norm=None,
               cache_size: int | None = None, packing: Packing | None = None) -> tuple[jax.Array, MambaState]:
    """x [B, T, D] -> (out [B, T, D], state after the last token). `state` continues a sequence; with
    `packing` (several documents in a row) the conv and SSM states restart from zero at every document's first
    token after the row's first. fading, fading_norm and cache_size are part of the mixer protocol and unused
    here."""
    del fading, fading_norm, cache_size
    cfg = self.cfg
    if state is None:
      state = self.init_state(x.shape[0])
    reach = reset = None
    if packing is not None:
      reach = jnp.where(packing.ids == 0, cfg.d_conv, packing.offset)  # the first document continues `state`
      reset = packing.starts
    u, z = self.in_proj_parts(x)
    # One decode token's conv is a few [B, E] products: the jnp form, whatever the config.
    conv = get_conv_fn(ConvImpl.REFERENCE if x.shape[1] == 1 else cfg.compute.conv_impl)
    u, conv_state = conv(u, self.conv_weight[...], self.conv_bias[...], state.conv, reach)
    dt_low, b, c = jnp.split(self.x_proj(u), [cfg.rank, cfg.rank + cfg.d_state], axis=-1)
    delta = self.dt_proj(dt_low)
    a = -jnp.exp(self.A_log[...].astype(jnp.float32))
    impl = ScanImpl.SEQUENTIAL if x.shape[1] == 1 else cfg.compute.scan_impl   # one decode step needs no chunking
    scan = get_scan_fn(impl, chunk=cfg.compute.scan_chunk)
    y, ssm = scan(u, delta, a, b, c, self.D[...], z, self.dt_bias[...], delta_softplus=True, h0=state.ssm,
                  reset=reset)
    return self.out_proj(y.astype(cfg.compute.jnp_dtype)), MambaState(conv_state.astype(state.conv.dtype), ssm)

  def in_proj_parts(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(u, z) [B, T, E] of x [B, T, D]: in_proj's kernel ([D, 2, E], or [2, E, D] in the out_in layout) as two
    GEMMs, one per half, so each result is its own contiguous array. `self.in_proj(x)` [B, T, 2, E] sliced would
    give the same values, but z, an operand of the scan kernel, would then be copied out of it (2·B·T·E elements
    moved, 268 MB a layer at 1.4B, 16k tokens) and the backward would assemble the [B, T, 2, E] cotangent from du
    and dz."""
    dtype = self.cfg.compute.jnp_dtype
    out_in = self.in_proj.layout == KernelLayout.OUT_IN
    # Under FSDP the kernel is gathered whole, like every weight, before it is cut in halves (cut first, XLA
    # gathered each half: an all-gather of a shape no parameter has).
    axes = (None, tp.INNER, None) if out_in else (None, None, tp.INNER)
    w = constrain(self.in_proj.kernel[...], axes).astype(dtype)                      # [D, 2, E] | [2, E, D]
    x = x.astype(dtype)
    if x.shape[1] == 1:
      # One token (a decode step): one GEMV over the whole contiguous kernel. Per half, w[:, j] is a strided
      # view that XLA:GPU emits as a reduction at half the speed (0.48 ms of a 4.6 ms 1.4B step on an H100);
      # the [B, 1, 2, E] result is tiny, so slicing it copies nothing worth counting.
      uz = jnp.einsum("BTD,JED->BTJE" if out_in else "BTD,DJE->BTJE", x, w)
      return uz[:, :, 0], uz[:, :, 1]
    if out_in:
      return tuple(jnp.einsum("BTD,ED->BTE", x, w[j]) for j in (0, 1))
    return tuple(jnp.einsum("BTD,DE->BTE", x, w[:, j]) for j in (0, 1))

  def start_chunk(self, state: MambaState, fading_norm=None) -> MambaState:
    """No memory chunks: the state as it is (`Mixer.start_chunk`)."""
    return state

  def step(self, x: jax.Array, state: MambaState, *, fading=None, fading_norm=None, entered: bool = False
           ) -> tuple[jax.Array, MambaState]:
    """One token per row: x [B, 1, D] -> (out [B, 1, D], state)."""
    return self(x, state, fading=fading)

  def init_state(self, batch: int, cache_size: int | None = None) -> MambaState:
    del cache_size  # constant size: conv window and SSM state
    cfg = self.cfg
    return MambaState(conv=jnp.zeros((batch, cfg.d_conv - 1, cfg.d_inner), cfg.compute.jnp_dtype),
                      ssm=jnp.zeros((batch, cfg.d_inner, cfg.d_state), jnp.float32))
