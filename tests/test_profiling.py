"""benchmarks/profiling.py reads a GPU trace: kernels on the device's Stream lines summed per HLO op, host events
left out, and each op's longest kernel named (a synthetic perfetto trace; no GPU needed)."""

import gzip
import json

import pytest

from benchmarks.profiling import op_times


def test_op_times_sums_stream_kernels_per_op_and_names_the_longest(tmp_path):
  meta = lambda pid, tid, kind, name: dict(ph="M", pid=pid, tid=tid, name=kind, args=dict(name=name))
  kernel = lambda name, op, dur, tid=1, pid=1: dict(ph="X", pid=pid, tid=tid, name=name, dur=dur,
                                                     args=dict(hlo_op=op))
  events = [meta(1, 0, "process_name", "/device:GPU:0"), meta(1, 1, "thread_name", "Stream #13(compute)"),
            meta(1, 2, "thread_name", "MemcpyD2H"), meta(2, 0, "process_name", "/host:CPU"),
            # two steps of: the scan's backward kernel with a small helper kernel under one op, a GEMM
            *[kernel("selective_scan_bwd", "pallas_call.3", 900.0), kernel("reduce_partials", "pallas_call.3", 100.0),
              kernel("sm90_gemm", "custom-call.1", 500.0)] * 2,
            kernel("selective_scan_bwd", "pallas_call.3", 1e6, tid=2),      # not a Stream line
            kernel("host work", "pallas_call.3", 1e6, pid=2, tid=0)]       # the host
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  kernels = {}
  ops = op_times(str(path), steps=2, kernels=kernels)
  assert ops == {"pallas_call.3": (pytest.approx(1.0), 2), "custom-call.1": (pytest.approx(0.5), 1)}
  assert kernels == {"pallas_call.3": "selective_scan_bwd", "custom-call.1": "sm90_gemm"}
