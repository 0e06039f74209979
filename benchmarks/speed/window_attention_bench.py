"""Memory attention on a GPU: correctness of the compiled Pallas kernels, then timings against cuDNN.

  PYTHONUNBUFFERED=1 python3 -m benchmarks.speed.window_attention_bench --out $OUT [--budget 380] [--sweep] [--segments]

1. The test cases (`pallas_kernels/window_attention/cases.py`, which tests/test_window_attention.py runs)
   compiled (the packed-row ones, and on Hopper the Mosaic ones, included), plus model-sized checks (bf16
   and fp32, window 512 with 64 memory tokens, unpacked and packed with spans) against the fp32 reference.
2. Timings (bf16, B=2 H=16 P=128, median of >= 20 samples, each the mean of a few back-to-back calls
   after warm-up): pallas vs cuDNN (`jax.nn.dot_product_attention(implementation="cudnn",
   local_window_size=(w - 1, 0))`) at T=8192 for window 512 and 2048, window 512 with M=64 memory slots
   per 512-token chunk (pallas only: cuDNN has no memory keys), full causal, and T = 2k … 64k at window 512.
3. Optional block-size sweep at window 512 (--sweep), time-boxed by --budget seconds overall.
--correctness-only stops after 1; --segments replaces 2 and 3: packed rows (`packed_layout`: documents of random lengths, mean ~T/8, and with
memory the model's spans) against the same shapes unpacked, at window 512 with M=0 and M=64 and full causal,
T=8192, for the default kernels ("auto": Mosaic on Hopper), the Triton backward and all-Triton.
Writes `window_attention_<device>.json` (a list of records, one per implementation and shape; "segments"
says whether the rows were packed) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.speed.window_attention_inputs import cudnn_fn, fwd_and_fwdbwd, inputs, packed_layout, pallas_fn
from bmojo_jax.pallas_kernels.window_attention import BlockSizes
from bmojo_jax.pallas_kernels.window_attention import cases as attn_cases
from bmojo_jax.pallas_kernels.window_attention.ops import _on_hopper, resolve_impls

SMOKE = False   # --smoke: interpret mode, tiny shapes, no cuDNN; checks this script on a CPU

T0 = time.time()


def elapsed() -> float:
  return time.time() - T0


# Median of 25 samples, each the mean of >= 4 back-to-back calls lasting >= 20 ms together.
median_ms = functools.partial(common.median_ms, warmup=2, iters=25, inner=4, min_sample_ms=20.0)


def check_case(case, seed: int, exact_mask: bool) -> list[str]:
  """PASS / FAIL / ERROR lines of one test case run compiled (interpreted with --smoke)."""
  try:
    errs = attn_cases.run_case(case, interpret=SMOKE, seed=seed)
  except Exception as e:  # noqa: BLE001 -- record and go on: one failing case must not lose the run
    return [f"ERROR {case.name}: {type(e).__name__}: {str(e)[:300]}"]
  ok = all(e <= attn_cases.TOL[case.dtype] for e in errs.values())
  lines = [f"{'PASS' if ok else 'FAIL'} {case.name}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())]
  if exact_mask:
    try:
      attn_cases.exact_mask_check(case, interpret=SMOKE)
      lines.append(f"PASS exact-mask {case.name}")
    except AssertionError as e:
      lines.append(f"FAIL exact-mask {case.name} {e!r}")
  return lines


def correctness() -> list[str]:
  lines = []
  if SMOKE:
    cases = attn_cases.CASES[:1] + attn_cases.PACKED_CASES[:1]
  else:
    cases = attn_cases.CASES + attn_cases.PACKED_CASES
  if not SMOKE and _on_hopper():
    cases += attn_cases.MOSAIC_CASES + attn_cases.MOSAIC_PACKED_CASES
  for case in cases:
    lines += check_case(case, seed=1, exact_mask=True)
    print("\n".join(lines[-2:]), flush=True)
  big = (attn_cases.Case("model_bf16_w512_m64", 1, 3000, 4, 2, 128, 512, 512, 64, jnp.bfloat16,
                  BlockSizes.get_default(128, True)),
         attn_cases.Case("model_fp32_w512_m64", 1, 1100, 2, 1, 64, 512, 512, 64, jnp.float32,
                  BlockSizes.get_default(64, True)),
         attn_cases.Case("model_bf16_w512_m64_packed", 1, 3000, 4, 2, 128, 512, 512, 64, jnp.bfloat16,
                  BlockSizes.get_default(128, True), segments=True, span=True),
         attn_cases.Case("model_fp32_w512_m64_packed", 1, 1100, 2, 1, 64, 512, 512, 64, jnp.float32,
                  BlockSizes.get_default(64, True), segments=True, span=True))
  for case in () if SMOKE else big:
    lines += check_case(case, seed=2, exact_mask=False)
    print(lines[-1], flush=True)
  return lines


def time_shape(records, impl, window, m, t, blocks=None, b=2, h=16, p=128, chunk=512, segments=False):
  """Times fwd and fwd+bwd of one shape; segments: packed rows (`packed_layout`; pallas only)."""
  if SMOKE:
    if impl == "cudnn":
      return None
    window, t, b, h, p, chunk, m = (None if window is None else 64), 256, 1, 2, 64, 64, min(m, 16)
  if segments and impl == "cudnn":
    return None
  args, ct = inputs(b, t, h, h, p, m, chunk)
  if segments:
    seg, span = packed_layout(b, t, chunk, m)
    args = args + ((None, None, None) if not m else ()) + (seg, span)
  if impl.startswith("pallas"):
    attn, n_diff = pallas_fn(window, chunk, blocks, interpret=SMOKE), (5 if m else 3)
  else:
    attn, n_diff = cudnn_fn(window), 3
  fwd, fwdbwd = fwd_and_fwdbwd(attn, n_diff)
  try:
    f = median_ms(fwd, args, ct)
    fb = median_ms(fwdbwd, args, ct)
  except Exception as e:  # noqa: BLE001 -- record and go on: one failing peer must not lose the run
    print(f"ERROR {impl} w={window} m={m} t={t}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return None
  rec = dict(op="memory_attention", impl=impl,
             shape=dict(B=b, T=t, H=h, K=h, P=p, window=window, chunk=chunk, M=m), segments=segments,
             dtype="bfloat16", fwd_ms=round(f, 4), fwdbwd_ms=round(fb, 4),
             device=jax.devices()[0].device_kind, jax=jax.__version__)
  if impl.startswith("pallas"):
    chosen = resolve_impls(blocks or BlockSizes.get_default(p, bool(m)), jnp.bfloat16, p, chunk, m, SMOKE,
                           segments=segments, span=segments and bool(m))
    rec["forward_impl"], rec["dq_impl"], rec["dkdv_impl"] = chosen.forward_impl, chosen.dq_impl, chosen.dkdv_impl
  if blocks is not None:
    rec["blocks"] = dataclasses.asdict(blocks)
  else:
    rec["blocks"] = "default" if impl.startswith("pallas") else None
  records.append(rec)
  fwd_impl = "/".join(rec.get(f, "") for f in ("forward_impl", "dq_impl", "dkdv_impl")).strip("/")
  print(f"{impl:7s} {fwd_impl:20s} w={str(window):5s} M={m:3d} T={t:6d} {'packed' if segments else '      '}  "
        f"fwd {f:7.3f} ms  fwd+bwd {fb:7.3f} ms  [{elapsed():.0f}s]", flush=True)
  return rec


def time_segments(records, save, all_kernels: bool):
  """Packed rows against the same shapes unpacked (T=8192: window 512 with M=0 and 64, full causal) for the
  default kernels and, with all_kernels, the Triton backward and all-Triton; prints packed / unpacked per pair."""
  kernels = (("pallas", None), ("pallas-triton", dict(dq_impl="triton", dkdv_impl="triton")),
             ("pallas-triton", dict(forward_impl="triton", dq_impl="triton", dkdv_impl="triton")))
  kernels = kernels if all_kernels else kernels[:1]
  pairs = []
  for window, m in ((512, 0), (512, 64), (None, 0)):
    for impl, cfg in kernels:
      blocks = None if cfg is None else dataclasses.replace(BlockSizes.get_default(128, bool(m)), **cfg)
      pair = [time_shape(records, impl, window, m, 8192, blocks, segments=packed) for packed in (False, True)]
      pairs.append(pair)
      save()
  print(f"\n{'kernels (fwd/dq/dkdv)':22s} {'window':>6s} {'M':>3s}  packed / unpacked: {'fwd':>6s} {'fwd+bwd':>8s}")
  for plain, packed in pairs:
    if plain and packed:
      kernels_used = "/".join(plain.get(f, "") for f in ("forward_impl", "dq_impl", "dkdv_impl"))
      s = plain["shape"]
      print(f"{kernels_used:22s} {str(s['window']):>6s} {s['M']:3d}  {'':19s}{packed['fwd_ms'] / plain['fwd_ms']:6.3f} "
            f"{packed['fwdbwd_ms'] / plain['fwdbwd_ms']:8.3f}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  parser.add_argument("--budget", type=float, default=380.0)
  parser.add_argument("--sweep", action="store_true")
  parser.add_argument("--skip-correctness", action="store_true")
  parser.add_argument("--correctness-only", action="store_true", help="only section 1 (the compiled test cases)")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--exact-math", action="store_true",
                      help="also time windows 512 and 2048 with fast_math=False (libdevice exp2) for comparison")
  parser.add_argument("--compare-triton", action="store_true",
                      help="also time the main shapes with the backward's kernels in Triton and with every kernel in "
                           "Triton (the default 'auto' takes the Mosaic kernels on Hopper)")
  parser.add_argument("--mosaic-sweep", action="store_true",
                      help="also time the Mosaic forward with 64-key tiles and 2-4 slots")
  parser.add_argument("--mem-sweep", action="store_true",
                      help="only W512 at T=8192: M=0 and M=64 with the default and larger query tiles")
  parser.add_argument("--segments", action="store_true",
                      help="only packed rows against unpacked (W512 M=0 and M=64, full causal, T=8192; the default, "
                           "Triton-backward and all-Triton kernels) after the correctness checks")
  parser.add_argument("--segments-all-kernels", action="store_true",
                      help="with --segments, also the Triton-backward and all-Triton kernels (default: 'auto' only)")
  args = parser.parse_args()
  global SMOKE
  SMOKE = args.smoke
  print("jax", jax.__version__, jax.devices(), flush=True)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"window_attention_{common.device_tag()}.json")
  records: list[dict] = []

  def save():
    with open(path, "w") as f:
      json.dump(records, f, indent=1)

  check = [] if args.skip_correctness else correctness()
  if args.correctness_only:
    print("\n".join(check))
    return
  if args.segments:
    time_segments(records, save, args.segments_all_kernels)
    print("\n".join(check))
    print(f"wrote {path}  total {elapsed():.0f}s")
    return

  main_shapes = [(512, 0), (2048, 0), (512, 64), (None, 0)][:1 if args.mem_sweep else 2 if args.sweep else 4]
  for window, m in main_shapes:
    time_shape(records, "pallas", window, m, 8192)
    if args.compare_triton:
      for triton in (dict(dq_impl="triton", dkdv_impl="triton"),
                     dict(forward_impl="triton", dq_impl="triton", dkdv_impl="triton")):
        time_shape(records, "pallas-triton", window, m, 8192,
                   dataclasses.replace(BlockSizes.get_default(128, bool(m)), **triton))
    if not m:
      time_shape(records, "cudnn", window, m, 8192)
    save()
  if args.exact_math:
    for window in (512, 2048):
      time_shape(records, "pallas-sweep", window, 0, 8192,
                 dataclasses.replace(BlockSizes.get_default(), fast_math=False))
    save()
  if args.mosaic_sweep:  # the Mosaic forward's key tile and shared-memory slots (P=128: 128 x 3 does not fit)
    for cfg in (dict(block_k_mosaic=64), dict(block_k_mosaic=64, num_stages_mosaic=3),
                dict(block_k_mosaic=64, num_stages_mosaic=4)):
      for window, m in ((512, 0), (2048, 0), (512, 64)):
        if elapsed() < args.budget - 15:
          time_shape(records, "pallas-sweep", window, m, 8192,
                     dataclasses.replace(BlockSizes.get_default(128, bool(m)), forward_impl="mosaic", **cfg))
    save()
  if args.mem_sweep:  # the memory prologue's cost per query row falls with the query tile
    base = BlockSizes.get_default()
    for cfg, ms in ((dict(), (64,)), (dict(block_q=128, num_warps_fwd=8), (0, 64)),
                    (dict(block_q=128, num_warps_fwd=8, block_q_dq=128), (64,)),
                    (dict(block_q=128, num_warps_fwd=8, block_q_dq=128, num_warps_bwd=8), (0, 64)),
                    (dict(block_q_dq=128, block_k_dq=64, num_warps_bwd=8), (0, 64)),
                    (dict(num_stages_fwd=2), (0, 64)), (dict(block_q=128, num_warps_fwd=8, num_stages_fwd=2), (0, 64)),
                    (dict(block_q=128, num_warps_fwd=8, num_stages_bwd=1), (64,))):
      for m in ms:
        if elapsed() < args.budget - 15:
          time_shape(records, "pallas-sweep", 512, m, 8192, dataclasses.replace(base, **cfg))
      save()
  for t in () if args.sweep or args.mem_sweep else (2048, 4096, 16384, 32768, 65536)[:1 if SMOKE else 5]:
    if elapsed() > args.budget - 40:
      print("budget: skipping the rest of the T sweep", flush=True)
      break
    time_shape(records, "pallas", 512, 0, t)
    time_shape(records, "cudnn", 512, 0, t)
    save()

  if args.sweep:
    base = BlockSizes.get_default()
    fwd_cfgs = [dict(split_masked=False), dict(num_stages_fwd=4), dict(num_stages_fwd=2),
                dict(block_k=32), dict(block_k=128), dict(block_q=128, num_warps_fwd=8),
                dict(block_q=128, num_warps_fwd=8, split_masked=False), dict(block_q=128, block_k=128,
                num_warps_fwd=8, split_masked=False), dict(num_stages_fwd=4, split_masked=False)]
    bwd_cfgs = [dict(num_stages_bwd=3), dict(block_k_dkv=128), dict(block_q_dkv=64), dict(block_q_dq=128),
                dict(block_k_dq=64), dict(block_q_dkv=16, block_k_dq=16), dict(num_warps_bwd=8),
                dict(block_k_dkv=128, block_q_dq=128, num_warps_bwd=8, num_stages_bwd=3)]
    for cfg in fwd_cfgs + bwd_cfgs:
      if elapsed() > args.budget - 15:
        print("budget: sweep cut short", flush=True)
        break
      time_shape(records, "pallas-sweep", 512, 0, 8192, dataclasses.replace(base, **cfg))
    for cfg in (dict(split_masked=False), dict(block_q=128, num_warps_fwd=8)):
      if elapsed() < args.budget - 15:
        time_shape(records, "pallas-sweep", 2048, 0, 8192, dataclasses.replace(base, **cfg))
    save()

  print("\n".join(check))
  print(f"\n{'impl':13s} {'fwd/dq/dkdv':20s} {'window':>6s} {'M':>3s} {'T':>6s} {'fwd ms':>8s} {'fwd+bwd':>8s}  blocks")
  for r in records:
    s = r["shape"]
    blk = "" if not isinstance(r.get("blocks"), dict) else \
        "{block_q},{block_k},w{num_warps_fwd}s{num_stages_fwd} | {block_q_dkv},{block_k_dkv},{block_q_dq}," \
        "{block_k_dq},w{num_warps_bwd}s{num_stages_bwd} split={split_masked} fast={fast_math} " \
        "mosaic {block_k_mosaic}x{num_stages_mosaic} dq {block_k_dq_mosaic} dkdv {block_q_dkv_mosaic}" \
        .format(**r["blocks"])
    kernels = "/".join(r.get(f, "") for f in ("forward_impl", "dq_impl", "dkdv_impl")).strip("/")
    print(f"{r['impl']:13s} {kernels:20s} {str(s['window']):>6s} {s['M']:3d} {s['T']:6d} "
          f"{r['fwd_ms']:8.3f} {r['fwdbwd_ms']:8.3f}  {blk}")
  print(f"wrote {path}  total {elapsed():.0f}s")


if __name__ == "__main__":
  main()
