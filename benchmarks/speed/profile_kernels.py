"""Runs each kernel of interest exactly once at its issue's target shape, for a profiler to attach to.

    ncu --clock-control none -k regex:'selective_scan|segment|attention' --set full -o $OUT/prof \
        python3 -m benchmarks.speed.profile_kernels scan attention

Targets (bf16, the issues' shapes): `scan`: the Pallas selective scan forward and forward+backward at B2 T4096
E2048 N16 with D and z (segment summaries, main forward, backward); `attention`: the Pallas memory attention
forward at B2 T8192 H16 P128, window 512 (M = 0 and M = 64) and window 2048, and cuDNN's forward at window 512
for comparison. Every function is compiled and then called once, so each kernel is launched once per target.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.speed import selective_scan_inputs as ssb
from benchmarks.speed import window_attention_inputs as wab


def scan():
  args = ssb.make_inputs(2, 4096, 2048, 16, jnp.bfloat16)
  scan_fn = ssb.pallas(None)
  for f in (ssb.fwd_fn(scan_fn), ssb.fwdbwd_fn(scan_fn)):
    c = f.lower(*args).compile()
    jax.block_until_ready(c(*args))


def attention():
  for window, m, impl in ((512, 0, "pallas"), (512, 64, "pallas"), (2048, 0, "pallas"), (512, 0, "cudnn")):
    args, ct = wab.inputs(2, 8192, 16, 16, 128, m, 512)
    attn = wab.pallas_fn(window, 512) if impl == "pallas" else wab.cudnn_fn(window)
    fwd, _ = wab.fwd_and_fwdbwd(attn, 5 if m else 3)
    c = fwd.lower(args, ct).compile()
    jax.block_until_ready(c(args, ct))
    print(f"ran {impl} window={window} M={m}", flush=True)


TARGETS = {"scan": scan, "attention": attention}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("targets", nargs="*", help="of " + ", ".join(TARGETS) + " (default: all)")
  targets = ap.parse_args(argv).targets
  unknown = sorted(set(targets) - set(TARGETS))
  if unknown:
    ap.error(f"unknown targets {unknown}; choose from {list(TARGETS)}")
  for name in targets or list(TARGETS):
    TARGETS[name]()
    print(f"done {name}", flush=True)


if __name__ == "__main__":
  main()
