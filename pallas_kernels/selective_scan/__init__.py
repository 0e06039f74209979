"""Chunked selective scan (Mamba-1 / S6) in Pallas: `selective_scan` (forward and backward kernels behind a
`jax.custom_vjp`) and the plain-jnp `selective_scan_reference` that fixes its semantics, both with an optional
`reset` [B, T] for packed documents (the state restarts from zero at each document's first token).

Files: `block_sizes.py` (tiling), `kernel.py` (forward kernel, tile orientation), `backward.py` (backward
kernel), `segments.py` (time segments: per-segment summaries and the carry between segments), `ops.py` (shape
checks and the custom VJP), `reference.py` (sequential `lax.scan`), `tpu.py` (`selective_scan_tpu`: the
Mosaic-TPU forward and backward kernels and their custom VJP).
"""

from pallas_kernels.selective_scan.block_sizes import BlockSizes
from pallas_kernels.selective_scan.ops import check_shapes, selective_scan
from pallas_kernels.selective_scan.reference import selective_scan_reference
from pallas_kernels.selective_scan.tpu import selective_scan_tpu

__all__ = ["BlockSizes", "check_shapes", "selective_scan", "selective_scan_reference", "selective_scan_tpu"]
