"""Model configuration: one frozen dataclass for all five families (`ModelConfig`), how a model is computed
(`ComputeConfig`, its `compute` field), the implementation enums. Presets live in `bmojo_jax/presets.py`.

The five families share one skeleton (embed -> n_blocks residual blocks -> RMSNorm -> logits). Each block has
two pre-norm residual sublayers of the kinds in `Sublayer`; the family picks them (`FAMILY_SUBLAYERS`):

    transformer  (attention, mlp)       full causal attention by default (window=None), RoPE, SwiGLU MLP
    mamba        (mamba, mamba)         no attention, no MLP
    hybrid       (mamba, attention)     sliding-window attention, no memory tokens
    bmojo_f      (mamba, attention)     + fading memory tokens (n_fading > 0)
    bmojo        (mamba, attention)     + fading and eidetic memory tokens (n_eidetic > 0)

`n_layers` counts sublayers the way the Mamba paper counts layers (a Mamba + attention pair is two layers), so
`n_blocks = n_layers // 2` for every family.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax.numpy as jnp


class Family(enum.StrEnum):
  TRANSFORMER = "transformer"
  MAMBA = "mamba"
  HYBRID = "hybrid"
  BMOJO_F = "bmojo_f"
  BMOJO = "bmojo"


class Sublayer(enum.StrEnum):
  """What a residual sublayer mixes with. Each kind is one module class following the mixer protocol
  (`bmojo_jax.model.MIXERS`, `bmojo_jax.model.Mixer`: `__call__`, `step`, `init_state`) and one closed-form
  parameter count (`bmojo_jax.param_count.SUBLAYER_PARAMS`); code that depends on the kind looks it up there."""
  MAMBA = "mamba"
  ATTENTION = "attention"
  MLP = "mlp"


FAMILY_SUBLAYERS: dict[Family, tuple[Sublayer, Sublayer]] = {
    Family.TRANSFORMER: (Sublayer.ATTENTION, Sublayer.MLP),
    Family.MAMBA: (Sublayer.MAMBA, Sublayer.MAMBA),
    Family.HYBRID: (Sublayer.MAMBA, Sublayer.ATTENTION),
    Family.BMOJO_F: (Sublayer.MAMBA, Sublayer.ATTENTION),
    Family.BMOJO: (Sublayer.MAMBA, Sublayer.ATTENTION),
}


class RematPolicy(enum.StrEnum):
  """What the backward pass recomputes of each block (`bmojo_jax.model.REMAT_POLICIES`)."""
  NONE = "none"    # keep every activation the backward needs
  FULL = "full"    # keep only the block's input; recompute the block
  DOTS = "dots"    # keep the matmul outputs, recompute the rest (norms, activations, the memory path)
  DOTS_KERNELS = "dots_kernels"  # keep the matmul and attention / scan kernel outputs, recompute the rest
                                 # (thin matmuls too: K <= model.RECOMPUTE_DOTS_UP_TO, Mamba's dt_proj)
  DOTS_ATTENTION = "dots_attention"  # as dots_kernels but keep nothing of the selective scan: its backward
                                     # reruns the scan forward instead of keeping its fp32 state checkpoints
                                     # (hc [B, T/4, E, N], 1.07 GB a Mamba sublayer at 1.4B, 16k tokens),
                                     # which the forward pass then does not write


class LossImpl(enum.StrEnum):
  """How the training loss computes the head and its cross-entropy (`bmojo_jax.losses`)."""
  CHUNKED = "chunked"      # blocks of tokens, gradients in the forward: never the fp32 logits [B, T, V]
  REFERENCE = "reference"  # the full logits [B, T, V] fp32, then the cross-entropy (autodiff backward)


class ScanImpl(enum.StrEnum):
  """Selective-scan implementation (resolved in `bmojo_jax.kernels.get_scan_fn` through `resolve_scan_impl`)."""
  AUTO = "auto"                # by backend: gpu/tpu -> pallas, cpu -> sequential (`resolve_scan_impl`)
  SEQUENTIAL = "sequential"    # lax.scan over tokens: the reference
  ASSOCIATIVE = "associative"  # lax.associative_scan within chunks, lax.scan across chunks
  PALLAS = "pallas"            # fused chunked Pallas kernel (GPU: Triton; TPU: Mosaic; CPU: interpret mode)


class ConvImpl(enum.StrEnum):
  """The Mamba mixer's causal conv + SiLU (resolved in `bmojo_jax.kernels.get_conv_fn` through `resolve_conv_impl`)."""
  AUTO = "auto"                # by backend: gpu -> pallas, cpu and tpu -> reference (`resolve_conv_impl`)
  REFERENCE = "reference"      # jnp (`bmojo_jax.layers.causal_conv`, then SiLU), in the compute dtype
  PALLAS = "pallas"            # one Triton kernel each way, fp32 inside (GPU; CPU: interpret mode; no TPU kernel)


class AttnImpl(enum.StrEnum):
  """Attention implementation (resolved in `bmojo_jax.kernels.get_attention_fn` through `resolve_attn_impl`)."""
  AUTO = "auto"                # by backend: gpu/tpu -> pallas, cpu -> reference (`resolve_attn_impl`)
  REFERENCE = "reference"      # blockwise jnp, O(T·(w + L + M)) memory when a window is set
  PALLAS = "pallas"            # flash-style Pallas kernel (GPU: Triton/Mosaic GPU; TPU: Mosaic; CPU: interpret)
  CUDNN = "cudnn"              # jax.nn.dot_product_attention's cuDNN kernel (GPU; no memory tokens)


class DecodeAttnImpl(enum.StrEnum):
  """A decode step's attention sublayer: its query over the ring cache and the memory tokens, and its cache update
  (resolved in `bmojo_jax.kernels.get_decode_attention_fn` and `get_decode_update_fn`)."""
  AUTO = "auto"                # GPU: the update kernel; the attention kernel for a ring <= 32 MiB or a large batch
  REFERENCE = "reference"      # jnp (`bmojo_jax.decode_cache.decode_attention`, `insert_candidate`); CPU, TPU auto
  PALLAS = "pallas"            # two Triton kernels (GPU; CPU: interpret mode; no TPU kernels)


class KernelLayout(enum.StrEnum):
  """How each projection's kernel is stored (`bmojo_jax.layers.Projection`; `bmojo_jax.kernel_layout.to_kernel_layout`
  converts). At one token a row (M = 1) XLA:GPU reads an [N, D] weight (contracted dims minor) as a row
  reduction near the copy bandwidth, and a [D, N] one as a column reduction, up to 5x slower (docs/inference.md,
  "Kernel layout")."""
  IN_OUT = "in_out"  # contracted dims first, then the output dims: wq [D, H, P], wo [H, P, D] (the training layout)
  OUT_IN = "out_in"  # output dims first, contracted dims last: wq [H, P, D], wo [D, H, P] (as torch's Linear)


class StorePolicy(enum.StrEnum):
  """What the eidetic store keeps (docs/spec.md, "Innovation selection")."""
  FIFO = "fifo"    # the selections of the last n_eidetic // eidetic_per_chunk chunks
  SCORE = "score"  # the n_eidetic highest-scoring selections seen so far (ties: earliest)


class Selection(enum.StrEnum):
  """Which score picks the eidetic tokens of a chunk (`bmojo_jax.memory.scoring.SELECTION_SCORES`; docs/mqar.md,
  "Selection variants"). On the attention input a_t [B, T, D] (keys k_t, values v_t [B, T, K, P]):"""
  INNOVATION = "innovation"  # the paper's test: ‖a_t − (1/4) Σ_{j=1..4} a_{t-j}‖² (the default)
  LEARNED = "learned"        # a_t · w_s, a learned scorer trained through a straight-through gate on the values
  SSM_ERROR = "ssm_error"    # ‖k_t − k^f_{t-1}‖² + ‖v_t − v^f_{t-1}‖²: what the fading token at t-1 lacks
  INPUT_NORM = "input_norm"  # ‖a_t‖²
  LINEAR = "linear"          # ‖a_t − Σ_{j=1..4} a_{t-j} W_j‖²: a learned linear predictor (starts as innovation's)


class ConfigError(ValueError):
  """A model configuration that cannot work; the message names the field(s) and values."""


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
  """How a model is computed, not what its parameters are: implementations, compute dtype, remat, block layout,
  loss blocking. A checkpoint written under one ComputeConfig restores under any other (`scan_layers` by
  converting the parameter layout, `bmojo_jax.model.stack_blocks`; `kernel_layout` by transposing the projection
  kernels, `bmojo_jax.kernel_layout.kernels_to_layout`: `train/setup.py`'s `restore_state`), so checkpoint compatibility
  compares model configs without their `compute` (`train/checkpoint.py`)."""
  scan_impl: ScanImpl = ScanImpl.AUTO         # by backend (`resolve_scan_impl`)
  scan_chunk: int = 128              # tokens per associative-scan chunk
  conv_impl: ConvImpl = ConvImpl.AUTO         # the Mamba conv + SiLU, by backend (`resolve_conv_impl`)
  attn_impl: AttnImpl = AttnImpl.AUTO         # by backend (`resolve_attn_impl`)
  decode_attn_impl: DecodeAttnImpl = DecodeAttnImpl.AUTO  # a decode step's attention and cache update (DecodeAttnImpl)
  dtype: str = "float32"             # compute dtype; the scan state, softmax and scores stay fp32
  remat: RematPolicy = RematPolicy.NONE  # what each block recomputes in the backward pass
  scan_layers: bool = False          # True: the identical blocks run as one lax.scan over stacked parameters:
                                     # compiles in ~20 s at any depth, but steps ran 5-20% slower on the H200
                                     # (docs/train_speed.md); False: a Python loop over the blocks
  scan_unroll: int = 1               # with scan_layers: blocks per scan iteration (lax.scan's unroll), a layout
                                     # between the two: XLA schedules across those blocks, compile grows with it
  loss_impl: LossImpl = LossImpl.CHUNKED  # the training loss's head + cross-entropy (`bmojo_jax.losses`)
  loss_block: int = 4096             # tokens per block of the chunked loss: transient ~ block·V·10 bytes (2 GB
                                     # at V 50280); fewer blocks, fewer fp32 [V, D] gradient accumulations
  kernel_layout: KernelLayout = KernelLayout.IN_OUT  # how projection kernels are stored (`KernelLayout`); the
                                     # decoder converts to its own (`bmojo_jax.inference.Decoder`)

  def __post_init__(self):
    if isinstance(self.remat, bool):  # remat=True / False, as before the policies
      object.__setattr__(self, "remat", RematPolicy.FULL if self.remat else RematPolicy.NONE)
    _coerce_enums(self, (("scan_impl", ScanImpl), ("conv_impl", ConvImpl), ("attn_impl", AttnImpl),
                         ("decode_attn_impl", DecodeAttnImpl), ("remat", RematPolicy),
                         ("loss_impl", LossImpl), ("kernel_layout", KernelLayout)), "compute.")
    for name in ("scan_chunk", "loss_block", "scan_unroll"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"compute.{name}={getattr(self, name)} must be positive")
    try:
      jnp.dtype(self.dtype)
    except TypeError:
      raise ConfigError(f"compute.dtype={self.dtype!r} is not a dtype") from None

  @property
  def jnp_dtype(self):
    """The compute dtype as a jnp.dtype."""
    return jnp.dtype(self.dtype)

  def replace(self, **changes: Any) -> "ComputeConfig":
    return dataclasses.replace(self, **changes)


COMPUTE_FIELDS = tuple(f.name for f in dataclasses.fields(ComputeConfig))


def nest_compute(model: dict[str, Any]) -> dict[str, Any]:
  """A model config dict (config.json's "model", a checkpoint meta's) in the current layout: the compute
  fields of the previous layout, flat beside the architecture, moved under "compute" (a copy; a dict already
  in the current layout comes back equal)."""
  out = {k: v for k, v in model.items() if k not in COMPUTE_FIELDS}
  flat = {k: v for k, v in model.items() if k in COMPUTE_FIELDS}
  if flat:
    out["compute"] = {**flat, **dict(model.get("compute") or {})}
  return out


def _coerce_enums(obj: Any, fields: tuple[tuple[str, type[enum.Enum]], ...], prefix: str = "") -> None:
  """Each named field of the frozen dataclass `obj` as its enum; ConfigError naming an unknown value."""
  for name, enum_cls in fields:
    value = getattr(obj, name)
    try:
      object.__setattr__(obj, name, enum_cls(value))
    except ValueError:
      raise ConfigError(f"{prefix}{name}={value!r} is unknown; choose one of "
                        f"{[e.value for e in enum_cls]}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every field of every family. Defaults are a small B'MOJO for MQAR."""
  family: Family = Family.BMOJO
  vocab_size: int = 8192
  d_model: int = 128
  n_layers: int = 4                  # sublayers, Mamba-paper counting; n_blocks = n_layers // 2
  # Attention.
  n_heads: int = 2
  n_kv_heads: int | None = None      # None: n_heads (no grouping)
  head_dim: int | None = None        # None: d_model // n_heads
  window: int | None = 32            # sliding window w; None: full causal (Transformer)
  rope_theta: float = 10_000.0
  # Memory tokens (B'MOJO-F / B'MOJO).
  chunk_size: int | None = None      # chunk length L; None: window (or 64 without a window)
  n_fading: int = 4                  # M_f fading tokens per chunk
  n_eidetic: int = 8                 # M_e eidetic store capacity
  eidetic_per_chunk: int = 4         # k_e tokens selected per chunk
  store_policy: StorePolicy = StorePolicy.FIFO
  selection: Selection = Selection.INNOVATION  # the score that picks the k_e tokens (`Selection`)
  predictor_loss_weight: float = 1.0  # selection='linear': weight of its predictor's auxiliary loss (scoring.py)
  # Mamba mixer (S6).
  d_state: int = 16                  # N
  d_conv: int = 4                    # W
  expand: int = 2                    # d_inner = expand * d_model
  dt_rank: int | None = None         # None: ceil(d_model / 16)
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  # MLP (Transformer).
  d_ff: int | None = None            # None: 8/3 d_model rounded up to a multiple of 64
  # Numerics.
  param_dtype: str = "float32"       # the parameters' dtype (part of what a checkpoint holds)
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  init_std: float = 0.02
  # How it is computed (implementations, compute dtype, remat, layout): no part of the parameters.
  compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)

  def __post_init__(self):
    if isinstance(self.compute, dict):   # from a config dict (`train/setup.py`)
      object.__setattr__(self, "compute", ComputeConfig(**self.compute))
    if not isinstance(self.compute, ComputeConfig):
      raise ConfigError(f"compute={self.compute!r} must be a ComputeConfig")
    _coerce_enums(self, (("family", Family), ("store_policy", StorePolicy), ("selection", Selection)))
    self.validate()

  # Derived sizes.
  @property
  def n_blocks(self) -> int:
    return self.n_layers // 2

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_size(self) -> int:
    return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

  @property
  def chunk(self) -> int:
    if self.chunk_size is not None:
      return self.chunk_size
    return self.window if self.window is not None else 64

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def rank(self) -> int:
    return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank

  @property
  def ff_size(self) -> int:
    return self.d_ff if self.d_ff is not None else 64 * math.ceil(8 * self.d_model / 3 / 64)

  @property
  def sublayers(self) -> tuple[Sublayer, Sublayer]:
    return FAMILY_SUBLAYERS[self.family]

  @property
  def has_attention(self) -> bool:
    return Sublayer.ATTENTION in self.sublayers

  @property
  def fading_source(self) -> bool:
    """Whether the first sublayer's output (a Mamba mixer's: read-outs of the SSM state) is handed to the
    second (the memory attention) as the source of its fading tokens."""
    return self.fading > 0

  @property
  def fading(self) -> int:
    """M_f, the fading tokens per chunk this family uses (0 unless B'MOJO-F / B'MOJO)."""
    return self.n_fading if self.family in (Family.BMOJO_F, Family.BMOJO) else 0

  @property
  def eidetic(self) -> int:
    """M_e, the eidetic store capacity this family uses (0 unless B'MOJO)."""
    return self.n_eidetic if self.family == Family.BMOJO else 0

  @property
  def learned_selection(self) -> bool:
    """Whether each attention sublayer holds a learned selection scorer (B'MOJO with selection='learned')."""
    return self.eidetic > 0 and self.selection == Selection.LEARNED

  @property
  def linear_selection(self) -> bool:
    """Whether each attention sublayer holds a linear predictor W [4, D, D] (B'MOJO with selection='linear')."""
    return self.eidetic > 0 and self.selection == Selection.LINEAR

  @property
  def scores_read_fading(self) -> bool:
    """Whether the selection scores read the fading projections at every position (`ssm_error`), so the
    parallel pass projects all T read-outs instead of the M_f per chunk that become fading tokens."""
    return self.eidetic > 0 and self.fading > 0 and self.selection == Selection.SSM_ERROR

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def with_compute(self, **changes: Any) -> "ModelConfig":
    """This model computed differently: `compute` with `changes` (ComputeConfig fields)."""
    return dataclasses.replace(self, compute=self.compute.replace(**changes))

  def validate(self) -> None:
    """Raise ConfigError naming the field and values of the first thing that cannot work."""
    def need(cond: bool, msg: str):
      if not cond:
        raise ConfigError(f"{self.family.value}: {msg}")

    for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand"):
      need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
    need(self.n_layers % 2 == 0, f"n_layers={self.n_layers} must be even (each block holds two sublayers)")
    try:
      jnp.dtype(self.param_dtype)
    except TypeError:
      raise ConfigError(f"param_dtype={self.param_dtype!r} is not a dtype") from None
    need(0 < self.dt_min <= self.dt_max, f"need 0 < dt_min ({self.dt_min}) <= dt_max ({self.dt_max})")
    if self.has_attention:
      need(self.n_heads > 0, f"n_heads={self.n_heads} must be positive")
      need(self.head_dim is not None or self.d_model % self.n_heads == 0,
           f"n_heads={self.n_heads} does not divide d_model={self.d_model} (or set head_dim)")
      need(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
           f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
      need(self.head_size % 2 == 0, f"head_dim={self.head_size} must be even for RoPE")
      need(self.chunk > 0, f"chunk_size={self.chunk} must be positive")
      if self.window is not None:
        need(self.window > 0, f"window={self.window} must be positive or None")
        need(self.window % self.chunk == 0,
             f"chunk_size={self.chunk} must divide window={self.window}")
      need(self.compute.attn_impl != AttnImpl.CUDNN or not (self.fading or self.eidetic),
           f"compute.attn_impl='cudnn' has no memory tokens (n_fading={self.fading}, n_eidetic={self.eidetic}); "
           "use compute.attn_impl='pallas' or 'reference'")
    if self.family in (Family.HYBRID, Family.BMOJO_F, Family.BMOJO):
      need(self.window is not None, "window=None: this family uses sliding-window attention; set window")
    if self.family in (Family.BMOJO_F, Family.BMOJO):
      need(self.sublayers == (Sublayer.MAMBA, Sublayer.ATTENTION),
           f"fading tokens are read out of a Mamba mixer into the attention after it; sublayers="
           f"{tuple(k.value for k in self.sublayers)}")
      need(0 < self.n_fading <= self.chunk,
           f"n_fading={self.n_fading} must be in 1..chunk_size={self.chunk}")
    if self.family == Family.BMOJO:
      need(self.n_eidetic > 0 and 0 < self.eidetic_per_chunk <= self.chunk,
           f"need n_eidetic > 0 and 0 < eidetic_per_chunk <= chunk_size; got n_eidetic={self.n_eidetic}, "
           f"eidetic_per_chunk={self.eidetic_per_chunk}, chunk_size={self.chunk}")
      need(self.store_policy == StorePolicy.SCORE or self.n_eidetic % self.eidetic_per_chunk == 0,
           f"n_eidetic={self.n_eidetic} must be a multiple of eidetic_per_chunk={self.eidetic_per_chunk} with "
           "store_policy='fifo' (whole chunks of selections; the score policy keeps any M_e >= k_e)")
      need(math.isfinite(self.predictor_loss_weight) and self.predictor_loss_weight >= 0,
           f"predictor_loss_weight={self.predictor_loss_weight} must be a finite number >= 0")

