"""Memory attention: sliding window + per-chunk memory tokens.

`memory_attention` is the Pallas kernel (GPU through Triton or Mosaic GPU, CPU with interpret=True) behind a
custom VJP; `memory_attention_reference` in `reference.py` is the plain-jnp reference that fixes the semantics.
Files:
  `ops.py`            public op; the one place that picks the kernels (`resolve_impls`) and launches them
                      from its custom VJP's forward and backward.
  `blocks.py`         tile sizes (`BlockSizes`), `KernelImpl` ("auto" / "triton" / "mosaic"), block ranges.
  `forward.py`        Triton forward.
  `backward.py`       Triton dq, dk/dv and memory dk/dv kernels.
  `forward_mosaic.py` Hopper forward, Mosaic GPU, warp-specialized (`BlockSizes.forward_impl`).
  `dq_mosaic.py`, `dkdv_mosaic.py`  Hopper dq and dk/dv, Mosaic GPU (`BlockSizes.dq_impl` / `dkdv_impl`).
  `mosaic_common.py`  what the three Mosaic kernels share (CTA layout, limits, SMEM layouts, producer, wgmmas).
  `reference.py`      the plain-jnp reference and the shape checks.
  `tpu.py`            `memory_attention_tpu`: the Mosaic-TPU forward and backward kernels and their custom VJP.
  `cases.py`          the correctness cases and checks shared by tests/test_window_attention.py and
                      benchmarks/window_attention_bench.py.
Packed rows: `segment_ids` [B, T] keeps documents apart and `mem_span` [B, C, 2, M] limits each memory slot
to a range of its chunk's queries; `ops.py` says what the kernels receive.
"""

from pallas_kernels.window_attention.blocks import BlockSizes, KernelImpl
from pallas_kernels.window_attention.ops import memory_attention
from pallas_kernels.window_attention.reference import memory_attention_reference
from pallas_kernels.window_attention.tpu import memory_attention_tpu

__all__ = ["BlockSizes", "KernelImpl", "memory_attention", "memory_attention_reference", "memory_attention_tpu"]
