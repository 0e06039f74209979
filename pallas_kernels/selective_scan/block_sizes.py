"""Tile sizes of the chunked selective scan.

Each program owns `block_e` channels of one batch row and walks one time segment of `segment_len` tokens
(`segments.py` finds each segment's entering state); its state tile is [block_e, N] fp32 in registers. Time
is cut into chunks of `chunk` tokens whose steps are unrolled, so the loads of one chunk are all in flight
together (and the next chunk's are prefetched while this one computes).
The forward saves the state every `chunk_bwd` tokens; the backward recomputes each such sub-chunk's states from
that checkpoint, keeps them in registers, and walks them in reverse.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_e: int = 32         # channels per forward program (power of 2)
  chunk: int = 8            # tokens per unrolled forward step group
  num_warps: int = 1        # warps per forward program
  block_e_bwd: int = 32     # channels per backward program (power of 2)
  chunk_bwd: int = 4        # tokens between saved states; unrolled backward group (divides `chunk`)
  num_warps_bwd: int = 1    # warps per backward program
  num_stages: int = 1       # Triton software-pipelining depth (the kernels prefetch by hand)
  prefetch: bool = False    # forward: load chunk c+1's rows during chunk c (carried through the loop); else
                            # load each chunk's rows at its start
  prefetch_bwd: bool = False  # the same for the backward's sub-chunks
  channels_on_lanes: bool = True  # forward and segment passes: [N, block_e] tiles with the channels on lanes
                                  # (kernel.Tile), block_e = 32 x num_warps; else [block_e, N], N on lanes
  channels_on_lanes_bwd: bool = True  # the same for the backward kernel
  fast_math: bool = True    # compiled kernels: PTX ex2.approx.ftz and fma.rn for the per-state math
                            # (pallas_kernels/fast_math.py); interpret mode always uses plain jnp
  segment_len: int = 256    # tokens per time segment walked by one program (segments.py), rounded up to a
                            # multiple of `chunk`; 0 = the whole sequence in one program (no segment pass)
  segment_below_programs: int = 1024  # cut time into segments only while the forward has fewer programs than
                            # this (batch x E / block_e): enough rows fill the GPU already, and the segment passes
                            # only add work (H100, fwd+bwd: B8 E4096, 1,024 programs, 4.45 ms whole vs 4.89 cut;
                            # B16 E1536, 768 programs, 2.01 vs 1.86; selective_scan_time_segments_h100.json);
                            # 0 = always cut

  def __post_init__(self):
    for name in ("block_e", "chunk", "num_warps", "block_e_bwd", "chunk_bwd", "num_warps_bwd", "num_stages"):
      if getattr(self, name) < 1:
        raise ValueError(f"BlockSizes.{name} must be >= 1, got {self}")
    if self.segment_len < 0 or self.segment_below_programs < 0:
      raise ValueError(f"BlockSizes.segment_len and segment_below_programs must be >= 0, got {self}")
    if self.chunk % self.chunk_bwd:
      raise ValueError(f"BlockSizes: chunk={self.chunk} must be a multiple of chunk_bwd={self.chunk_bwd}")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    """The fastest measured on an H100 (B2 T4096 E2048 N16 bf16; timings in docs/selective_scan_notes.md, v4):
    channels on lanes with 32 channels per one-warp program in both directions, 256-token time segments,
    forward chunks of 8 tokens and backward sub-chunks of 4 (at the 1.4B and 130M training shapes the forward
    0.80 vs 0.90 ms and 0.40 vs 0.43 against chunks of 4), without hand prefetch, fast-math PTX."""
    return cls()


def largest_pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two that divides `n` and is <= `cap`."""
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b
