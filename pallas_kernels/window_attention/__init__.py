"""Memory attention: sliding window + per-chunk memory tokens.

`memory_attention` is the one public entry: it checks the inputs, runs per shard under a context mesh and
picks the backend's kernels, the GPU ones (Triton or Mosaic GPU; Pallas' interpreter on CPU) or the TPU ones
(Mosaic TPU); `memory_attention_reference` in `reference.py` is the plain-jnp reference that fixes the
semantics. Files:
  `ops.py`            `memory_attention_gpu`: the one place that picks the GPU kernels (`resolve_impls`) and
                      launches them from its custom VJP's forward and backward.
  `blocks.py`         tile sizes (`BlockSizes`), `KernelImpl` ("auto" / "triton" / "mosaic"), block ranges.
  `forward.py`        Triton forward.
  `backward.py`       Triton dq, dk/dv and memory dk/dv kernels.
  `forward_mosaic.py` Hopper forward, Mosaic GPU, warp-specialized (`BlockSizes.forward_impl`).
  `dq_mosaic.py`, `dkdv_mosaic.py`  Hopper dq and dk/dv, Mosaic GPU (`BlockSizes.dq_impl` / `dkdv_impl`).
  `mosaic_common.py`  what the three Mosaic kernels share (CTA layout, limits, SMEM layouts, producer, wgmmas).
  `reference.py`      the plain-jnp reference and the shape checks.
  `tpu.py`            `memory_attention_tpu`: the Mosaic-TPU layout, grids and custom VJP.
  `tpu_kernels.py`    its forward, dq, dk/dv and d(memory) kernels and their masks.
  `cases.py`          the correctness cases and checks shared by tests/test_window_attention.py and
                      benchmarks/speed/window_attention_bench.py.
Packed rows: `segment_ids` [B, T] keeps documents apart and `mem_span` [B, C, 2, M] limits each memory slot
to a range of its chunk's queries; `ops.py` says what the kernels receive.
"""

from __future__ import annotations

import functools
import math

from bmojo_jax.pallas_kernels.backend import resolve_backend
from bmojo_jax.pallas_kernels.sharding import per_shard
from bmojo_jax.pallas_kernels.window_attention import ops, tpu
from bmojo_jax.pallas_kernels.window_attention.blocks import BlockSizes
from bmojo_jax.pallas_kernels.window_attention.reference import check_shapes


def memory_attention(q, k, v, mem_k=None, mem_v=None, mem_valid=None, *, window: int | None, chunk: int,
                     segment_ids=None, mem_span=None, scale: float | None = None, backend: str | None = None,
                     block_sizes: BlockSizes | None = None, tpu_block: int = 128, interpret: bool | None = None):
  """Sliding-window (window None: full causal) attention plus per-chunk memory; o [B, T, H, P] in q.dtype.

  Query t in chunk c = t // chunk sees keys t - window < t' <= t (of its own segment, given segment_ids
  [B, T] int: each segment one contiguous run) and the valid memory slots m of its chunk (given mem_span
  [B, C, 2, M] int, only those with mem_span[b, c, 0, m] <= t - c·chunk < mem_span[b, c, 1, m]); shapes in
  `ops.py`. Gradients flow to q, k, v, mem_k and mem_v. backend "gpu" (`block_sizes`) or "tpu" (a chunk that is
  a multiple of 8; tpu_block caps the rows of a block), None: by `jax.default_backend()`; interpret None:
  Pallas' interpreter on a CPU backend (`pallas_kernels.backend`). Under a context mesh
  (`pallas_kernels.sharding`) each device attends for its own rows and heads.
  """
  if (mem_k is None) != (mem_v is None) or (mem_k is None) != (mem_valid is None):
    raise ValueError("mem_k, mem_v and mem_valid must be given together; got "
                     f"{None if mem_k is None else mem_k.shape}, {None if mem_v is None else mem_v.shape}, "
                     f"{None if mem_valid is None else mem_valid.shape}")
  _, n_mem = check_shapes(q, k, v, mem_k, mem_v, mem_valid, window, chunk, segment_ids, mem_span)
  if k.dtype != q.dtype or v.dtype != q.dtype or (n_mem and (mem_k.dtype != q.dtype or mem_v.dtype != q.dtype)):
    raise ValueError(f"q, k, v, mem_k, mem_v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
                     + (f", {mem_k.dtype}, {mem_v.dtype}" if n_mem else ""))
  scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
  backend, interpret = resolve_backend(backend, interpret)
  if backend == "tpu":
    attend = functools.partial(tpu.memory_attention_tpu, window=window, chunk=chunk, scale=scale, block=tpu_block,
                               interpret=interpret)
  else:
    attend = functools.partial(ops.memory_attention_gpu, window=window, chunk=chunk, scale=scale,
                               block_sizes=block_sizes, interpret=interpret)
  return _on_mesh(attend, q, k)(q, k, v, mem_k, mem_v, mem_valid, segment_ids, mem_span)


def _on_mesh(attend, q, k):
  """attend(q, k, v, mem_k, mem_v, mem_valid, segment_ids, mem_span) run on each device's rows and heads under
  the context mesh (`pallas_kernels.sharding`): B over the batch axes, the kv heads over the "heads" axis, each
  with its query heads (a device holds whole groups: split by H alone, a query head could land away from its
  kv head)."""
  bthp, mem = ("batch", None, "heads", None), ("batch", None, None, "heads", None)
  in_logical = (bthp, bthp, bthp, mem, mem, ("batch", None, None), ("batch", None), ("batch", None, None, None))
  return per_shard(attend, {"batch": q.shape[0], "heads": k.shape[2]}, in_logical, bthp)
