"""Memory attention: sliding window + per-chunk memory tokens.

`memory_attention` is the Pallas kernel (GPU through Triton, CPU with interpret=True) behind a custom VJP;
`memory_attention_reference` in `reference.py` is the plain-jnp reference that fixes the semantics.
Files: `blocks.py` (tile sizes, block ranges), `forward.py` (Triton), `forward_mosaic.py` (Hopper, Mosaic GPU,
warp-specialized; `BlockSizes.forward_impl`), `backward.py` (Triton dq, dk/dv and memory dk/dv),
`dq_mosaic.py` and `dkdv_mosaic.py` (Hopper, Mosaic GPU; `BlockSizes.dq_impl` / `dkdv_impl`), `ops.py` (public
op; `resolve_impls` picks the kernels), `tpu.py` (`memory_attention_tpu`: the Mosaic-TPU forward and backward
kernels and their custom VJP).
Packed rows: `segment_ids` [B, T] keeps documents apart and `mem_span` [B, C, 2, M] limits each memory slot
to a range of its chunk's queries; `ops.py` says what the kernels receive.
"""

from pallas_kernels.window_attention.blocks import BlockSizes
from pallas_kernels.window_attention.ops import memory_attention
from pallas_kernels.window_attention.reference import memory_attention_reference
from pallas_kernels.window_attention.tpu import memory_attention_tpu

__all__ = ["BlockSizes", "memory_attention", "memory_attention_reference", "memory_attention_tpu"]
