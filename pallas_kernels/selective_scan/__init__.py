"""Chunked selective scan (Mamba-1 / S6) in Pallas: `selective_scan`, the one public entry, and the plain-jnp
`selective_scan_reference` that fixes its semantics, both with an optional `reset` [B, T] for packed documents
(the state restarts from zero at each document's first token).

Files: `block_sizes.py` (tiling), `kernel.py` (forward kernel, tile orientation), `backward.py` (backward
kernel), `segments.py` (time segments: per-segment summaries and the carry between segments), `ops.py`
(`selective_scan_gpu`: the GPU kernels' custom VJP), `tpu.py` (`selective_scan_tpu`: the Mosaic-TPU layout
and custom VJP) with `tpu_kernels.py` (its forward and backward kernels), `reference.py` (shape checks, the
sequential `lax.scan`).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from bmojo_jax.pallas_kernels.backend import resolve_backend
from bmojo_jax.pallas_kernels.selective_scan import ops, tpu
from bmojo_jax.pallas_kernels.selective_scan.block_sizes import BlockSizes
from bmojo_jax.pallas_kernels.selective_scan.reference import check_shapes
from bmojo_jax.pallas_kernels.sharding import per_shard


def selective_scan(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, *, delta_softplus: bool = True,
                   h0=None, reset=None, backend: str | None = None, block_sizes: BlockSizes | None = None,
                   tpu_chunk: int = 16, tpu_block_e: int = 128, interpret: bool | None = None):
  """The Pallas selective scan. Returns (y [B, T, E] in u.dtype, h_T [B, E, N] fp32).

  Same semantics as `selective_scan_reference` (shapes in its docstring); differentiable in every array
  argument but reset through Pallas backward kernels. backend "gpu" (Triton; `block_sizes`) or "tpu" (Mosaic
  TPU; tpu_chunk tokens per grid step, tpu_block_e channels per program), None: by `jax.default_backend()`;
  interpret None: Pallas' interpreter on a CPU backend (`pallas_kernels.backend`). Under a context mesh each
  device scans its own rows and channels.
  """
  check_shapes(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset)
  backend, interpret = resolve_backend(backend, interpret)
  reset = None if reset is None else (reset != 0).astype(jnp.float32)                       # 1.0 = reset
  if backend == "tpu":
    scan = functools.partial(tpu.selective_scan_tpu, delta_softplus=delta_softplus, chunk=tpu_chunk,
                             block_e=tpu_block_e, interpret=interpret)
  else:
    scan = functools.partial(ops.selective_scan_gpu, delta_softplus=delta_softplus, block_sizes=block_sizes,
                             interpret=interpret)
  return _on_mesh(scan, u, Bm)(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset)


def _on_mesh(scan, u, Bm):
  """scan(u, delta, A, Bm, Cm, D, z, delta_bias, h0, reset) run on each device's rows and channels under the
  context mesh (`pallas_kernels.sharding`): B over the batch axes, E over the "inner" axis (the scan is
  independent per row and per channel), the rest replicated. Grouped B/C ([B, T, G, N], G > 1) split E only
  with G."""
  batch, _, d_inner = u.shape
  groups = Bm.shape[2] if Bm.ndim == 4 else 1
  bc = ("batch", None, None) if Bm.ndim == 3 else ("batch", None, None if groups == 1 else "inner", None)
  bte = ("batch", None, "inner")
  in_logical = (bte, bte, ("inner", None), bc, bc, ("inner",), bte, ("inner",), ("batch", "inner", None),
                ("batch", None))
  sizes = {"batch": batch, "inner": d_inner if groups == 1 else groups}
  return per_shard(scan, sizes, in_logical, (bte, ("batch", "inner", None)))
