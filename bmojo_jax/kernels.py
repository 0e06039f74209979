"""Which implementation runs each kernel of the model: the tables by backend, the resolvers of `auto`, and the
one function per kernel that the model calls (`get_scan_fn`, `get_conv_fn`, `get_attention_fn`,
`get_decode_attention_fn`, `get_decode_update_fn`; the only place a choice is made).

    scan_impl  sequential   `selective_scan_reference`, a `lax.scan` over tokens
               associative  `bmojo_jax.scan.selective_scan_associative`
               pallas       `pallas_kernels.selective_scan.selective_scan` (it picks the GPU or TPU kernels)
    conv_impl  reference    `causal_conv_silu_reference` (`bmojo_jax.layers.causal_conv`, then SiLU), jnp
               pallas       `pallas_kernels.causal_conv.causal_conv_silu`, Triton (GPU; CPU: interpret mode)
    attn_impl  reference    `memory_attention_reference`, blockwise jnp
               pallas       `pallas_kernels.window_attention.memory_attention` (it picks the GPU or TPU kernels)
               cudnn        `dot_product_attention`, jax.nn's fused cuDNN kernel (GPU; no memory tokens)
    decode_attn_impl  (a decode step's attention sublayer: its query over the ring cache + memory tokens, cuDNN
                      having no one-query kernel, and its cache update: k, v into the ring, the candidate insertion,
                      the shifts of the fading buffer and of the innovation history)
               reference    `decode_step_attention_reference` (`bmojo_jax.decode_cache.decode_attention`) and
                            `decode_token_update_reference` (two dynamic_update_slices + `insert_candidate` +
                            the shifts), jnp;
                            `auto` on CPU and TPU
               pallas       `pallas_kernels.decode_attention.decode_step_attention` and
                            `pallas_kernels.decode_update.decode_token_update`, one Triton kernel each (GPU; CPU:
                            interpret mode; no TPU kernels)
               auto (GPU)   the attention per call by the ring cache's shape (`decode_step_attention_by_shape`): the
                            kernel for a small ring (batch 1 at short contexts) or a launch of one program per row
                            and kv head (a large batch), the reference for a large ring split over programs (long
                            contexts at a small batch); the update's kernel
"""

from __future__ import annotations

import functools

import jax

from bmojo_jax.config import AttnImpl, ConfigError, ConvImpl, DecodeAttnImpl, ScanImpl
from bmojo_jax.scan import selective_scan_associative
from bmojo_jax.pallas_kernels.causal_conv import causal_conv_silu, causal_conv_silu_reference
from bmojo_jax.pallas_kernels.decode_attention import BlockSizes as DecodeBlockSizes
from bmojo_jax.pallas_kernels.decode_attention import decode_step_attention, decode_step_attention_reference
from bmojo_jax.pallas_kernels.decode_attention.kernel import Layout as DecodeLayout, next_pow2
from bmojo_jax.pallas_kernels.decode_update import decode_token_update, decode_token_update_reference
from bmojo_jax.pallas_kernels.selective_scan import selective_scan
from bmojo_jax.pallas_kernels.selective_scan.reference import selective_scan_reference
from bmojo_jax.pallas_kernels.window_attention import memory_attention
from bmojo_jax.pallas_kernels.window_attention.reference import memory_attention_reference

# What each backend runs: (the `auto` choice, every choice that works). On CPU the Pallas kernels run in
# interpret mode (tests); `auto` takes the references there: the sequential scan's forward + backward ran 3-4x
# faster than the associative one's on a 2-core CPU at (B, T, E, N) = (8, 256, 256, 16), (32, 64, 128, 8) and
# (8, 1024, 256, 16) (docs/tpu.md). Any other backend gets the CPU table.
SCAN_IMPLS: dict[str, tuple[ScanImpl, tuple[ScanImpl, ...]]] = {
    "gpu": (ScanImpl.PALLAS, (ScanImpl.SEQUENTIAL, ScanImpl.ASSOCIATIVE, ScanImpl.PALLAS)),
    "tpu": (ScanImpl.PALLAS, (ScanImpl.SEQUENTIAL, ScanImpl.ASSOCIATIVE, ScanImpl.PALLAS)),
    "cpu": (ScanImpl.SEQUENTIAL, (ScanImpl.SEQUENTIAL, ScanImpl.ASSOCIATIVE, ScanImpl.PALLAS)),
}
CONV_IMPLS: dict[str, tuple[ConvImpl, tuple[ConvImpl, ...]]] = {
    "gpu": (ConvImpl.PALLAS, (ConvImpl.REFERENCE, ConvImpl.PALLAS)),
    "tpu": (ConvImpl.REFERENCE, (ConvImpl.REFERENCE,)),
    "cpu": (ConvImpl.REFERENCE, (ConvImpl.REFERENCE, ConvImpl.PALLAS)),
}
ATTN_IMPLS: dict[str, tuple[AttnImpl, tuple[AttnImpl, ...]]] = {
    "gpu": (AttnImpl.PALLAS, (AttnImpl.REFERENCE, AttnImpl.PALLAS, AttnImpl.CUDNN)),
    "tpu": (AttnImpl.PALLAS, (AttnImpl.REFERENCE, AttnImpl.PALLAS)),
    "cpu": (AttnImpl.REFERENCE, (AttnImpl.REFERENCE, AttnImpl.PALLAS)),
}


# On a GPU `auto` stays AUTO here and `get_decode_attention_fn` decides per call by the ring's size (below).
DECODE_ATTN_IMPLS: dict[str, tuple[DecodeAttnImpl, tuple[DecodeAttnImpl, ...]]] = {
    "gpu": (DecodeAttnImpl.AUTO, (DecodeAttnImpl.REFERENCE, DecodeAttnImpl.PALLAS)),
    "tpu": (DecodeAttnImpl.REFERENCE, (DecodeAttnImpl.REFERENCE,)),
    "cpu": (DecodeAttnImpl.REFERENCE, (DecodeAttnImpl.REFERENCE, DecodeAttnImpl.PALLAS)),
}


def _resolve(field: str, impl, enum_cls, table, backend: str | None):
  backend = backend or jax.default_backend()
  auto, works = table.get(backend, table["cpu"])
  impl = enum_cls(impl)
  if impl == enum_cls.AUTO:
    return auto
  if impl not in works:
    needs = " or ".join(b.upper() for b, (_, ok) in table.items() if impl in ok)
    raise ConfigError(f"{field}={impl.value!r} needs a {needs}, but the backend is {backend!r}; on it choose one "
                      f"of {[enum_cls.AUTO.value] + [w.value for w in works]}")
  return impl


def resolve_scan_impl(impl: ScanImpl | str, backend: str | None = None) -> ScanImpl:
  """The concrete scan implementation for `impl` on `backend` (default `jax.default_backend()`): `auto` by
  `SCAN_IMPLS`; an explicit choice the backend cannot run raises ConfigError naming the ones that work."""
  return _resolve("scan_impl", impl, ScanImpl, SCAN_IMPLS, backend)


def resolve_conv_impl(impl: ConvImpl | str, backend: str | None = None) -> ConvImpl:
  """The concrete conv + SiLU implementation for `impl` on `backend`, as `resolve_scan_impl`."""
  return _resolve("conv_impl", impl, ConvImpl, CONV_IMPLS, backend)


def resolve_attn_impl(impl: AttnImpl | str, backend: str | None = None) -> AttnImpl:
  """The concrete attention implementation for `impl` on `backend`, as `resolve_scan_impl`."""
  return _resolve("attn_impl", impl, AttnImpl, ATTN_IMPLS, backend)


def resolve_decode_attn_impl(impl: DecodeAttnImpl | str, backend: str | None = None) -> DecodeAttnImpl:
  """The concrete decode-attention implementation for `impl` on `backend`, as `resolve_scan_impl`."""
  return _resolve("decode_attn_impl", impl, DecodeAttnImpl, DECODE_ATTN_IMPLS, backend)


def dot_product_attention(q, k, v, mem_k=None, mem_v=None, mem_valid=None, *, window: int | None, chunk: int,
                          segment_ids=None, mem_span=None, implementation: str | None = "cudnn"):
  """Causal (window None) or sliding-window attention without memory through `jax.nn.dot_product_attention`.

  q [B, T, H, P]; k, v [B, T, K, P] -> o [B, T, H, P]. Query t sees keys t - window < t' <= t, and with
  segment_ids [B, T] only those of its segment (a dense [B, 1, T, T] mask: cuDNN has no segment ids; the
  Pallas kernel masks by segment without one).
  implementation "cudnn" is the fused cuDNN kernel (GPU only); "xla" (or None) is XLA's, for tests on CPU.
  """
  del chunk  # no memory: the chunking only matters for memory tokens
  if mem_k is not None or mem_span is not None:
    raise ValueError("dot_product_attention has no memory tokens; use attn_impl='pallas' or 'reference'")
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"attn_impl='cudnn' needs a GPU, but the backend is {jax.default_backend()!r}; use "
                     "attn_impl='reference' (or 'pallas' in interpret mode)")
  local = None if window is None else (window - 1, 0)
  mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local,
                                      implementation=implementation)


def get_scan_fn(impl: ScanImpl | str, *, chunk: int = 128):
  """fn(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, *, delta_softplus=True, h0=None, reset=None) ->
  (y [B, T, E], h_T [B, E, N] fp32), the scan `impl` resolves to on this backend (`resolve_scan_impl`); chunk:
  the associative scan's tokens per chunk."""
  impl = resolve_scan_impl(impl)
  if impl == ScanImpl.SEQUENTIAL:
    return selective_scan_reference
  if impl == ScanImpl.ASSOCIATIVE:
    return functools.partial(selective_scan_associative, chunk=chunk)
  return selective_scan


def get_conv_fn(impl: ConvImpl | str):
  """fn(x, weight, bias, state, reach=None) -> (SiLU(causal conv) [B, T, E], the last W-1 inputs [B, W-1, E]), the
  Mamba mixer's conv + SiLU that `impl` resolves to on this backend (`resolve_conv_impl`)."""
  return causal_conv_silu if resolve_conv_impl(impl) == ConvImpl.PALLAS else causal_conv_silu_reference


def get_attention_fn(impl: AttnImpl | str):
  """fn(q, k, v, mem_k, mem_v, mem_valid, *, window, chunk, segment_ids=None, mem_span=None) -> o, the attention
  `impl` resolves to on this backend (`resolve_attn_impl`)."""
  return {AttnImpl.REFERENCE: memory_attention_reference, AttnImpl.PALLAS: memory_attention,
          AttnImpl.CUDNN: dot_product_attention}[resolve_attn_impl(impl)]


# Where the Triton decode kernel beats the jnp reference, measured on one H100 (bf16, 24 layers' caches per program,
# us a layer, kernel vs reference; benchmarks/results/decode_attention_h100.json): a ring of up to 32 MiB of K and V
# (B'MOJO's S 512 with its memory tokens at batch 1: 27 vs 39, batch 8: 31 vs 52; the Transformer's at batch 1,
# S 1024: 11 vs 23, S 4096: 25 vs 65), not a larger one, which XLA's fusions of the reference stream near
# bandwidth (S 8192: 44 vs 41, 64 MiB; S 32768: 161 vs 124; batch 64 x S 512: 203 vs 180). The limit is on the
# ring's K and V bytes (the whole arrays: all rows and kv heads). Those kernel figures are of its products as
# multiplies and sums. With them as tensor-core dots (`BlockSizes.dot`, the default since) the kernel also wins where
# each (row, kv head) is one program and the ring is not split (batch · kv heads >= BlockSizes().min_programs), in
# the dot form:
# B'MOJO's 1.4B decode loop at batch 64 (S 512, 256 MiB of ring a layer) ran 10,587 tok/s through it against 8,726
# through the reference (one H100, one call, benchmarks/results/decode_attention_dot_h100.json). Untimed, so left
# to the reference: a large ring split over programs (the Transformer's 8k-32k at batch 1), and an unsplit launch
# in the multiply-and-sum form (G > 1, P < 16), which lost at batch 64 (203 vs 180 us). Under a mesh the choice is
# made on the global shapes.
DECODE_KERNEL_MAX_RING_BYTES = 32 << 20


def decode_step_attention_by_shape(q, ring_k, ring_v, t, **kw):
  """`auto` on a GPU: `decode_step_attention` (the kernel) where the ring's K and V take at most
  DECODE_KERNEL_MAX_RING_BYTES, or where the launch gives each (row, kv head) one program (no split of the ring)
  and takes the dot form (`pallas_kernels.decode_attention.kernel.Layout`); else `decode_step_attention_reference`
  (a static choice: shapes are known when the step is traced)."""
  b, size, kh, p = ring_k.shape
  small = ring_k.size * ring_k.dtype.itemsize + ring_v.size * ring_v.dtype.itemsize <= DECODE_KERNEL_MAX_RING_BYTES
  layout = DecodeLayout.of(DecodeBlockSizes(), b, kh, size, next_pow2(q.shape[1] // kh), p, interpret=False)
  unsplit_dot = layout.n_splits == 1 and layout.dot_rows > 0 and p & (p - 1) == 0
  return (decode_step_attention if small or unsplit_dot else decode_step_attention_reference)(q, ring_k, ring_v, t,
                                                                                                **kw)


def get_decode_attention_fn(impl: DecodeAttnImpl | str):
  """fn(q, ring_k, ring_v, t, *, window, chunk, fading=None, store=None) -> o [B, H, P], a decode step's attention
  (`pallas_kernels.decode_attention`) that `impl` (`compute.decode_attn_impl`) resolves to on this backend
  (`resolve_decode_attn_impl`; `auto` on a GPU: `decode_step_attention_by_shape`)."""
  return {DecodeAttnImpl.REFERENCE: decode_step_attention_reference, DecodeAttnImpl.PALLAS: decode_step_attention,
          DecodeAttnImpl.AUTO: decode_step_attention_by_shape}[resolve_decode_attn_impl(impl)]


def get_decode_update_fn(impl: DecodeAttnImpl | str):
  """fn(ring_k, ring_v, cand, k, v, k_raw, score, t, fading=None, history=None) -> (ring_k, ring_v, cand,
  next_fading or None, history or None), a decode token's cache update
  (`pallas_kernels.decode_update`) that `impl` (`compute.decode_attn_impl`, which names the decode step's attention
  sublayer: its attention and this update together) resolves to on this backend (`resolve_decode_attn_impl`): the
  kernel for "pallas" and for `auto` on a GPU (one launch in place of ~9 small XLA kernels a layer, at any batch,
  and of the shifts' fusions and copies back into the loop carry), the reference otherwise."""
  impl = resolve_decode_attn_impl(impl)
  return decode_token_update if impl in (DecodeAttnImpl.PALLAS, DecodeAttnImpl.AUTO) else decode_token_update_reference
