"""benchmarks/speed/train_step_bench.py on the CPU: one tiny record has the fields the issue's table is read from, and
the best-layout summary picks the fastest layout beside the preset's default."""

from benchmarks.speed import train_step_bench as bench
from benchmarks.step_configs import TINY

FIELDS = {"family", "attn_impl", "scan_impl", "size", "T", "batch", "dtype", "scan_layers", "remat", "default_layout",
          "loss_impl", "loss_block", "step_ms", "tokens_per_s", "compile_s", "peak_bytes", "loss", "devices", "mesh"}


def test_record_schema_and_best_layout():
  rec = bench.run_one("transformer", "reference", TINY, 32, 64, layers=2, scan_impl="associative",
                      loss_impl="chunked", loss_block=16)
  assert FIELDS <= set(rec), FIELDS - set(rec)
  assert rec["scan_layers"] is False and rec["remat"] == "none" and rec["default_layout"] is True
  assert rec["loss_impl"] == "chunked" and rec["loss_block"] == 16 and rec["step_ms"] > 0
  assert rec["peak_bytes"] is None or rec["peak_bytes"] > 0
  faster = {**rec, "scan_layers": True, "remat": "dots_attention", "default_layout": False,
            "step_ms": rec["step_ms"] / 2}
  other_shape = {**rec, "T": 64}          # one layout only: no summary
  best = bench.best_layouts([rec, faster, other_shape, {**rec, "error": "x"}])
  assert len(best) == 1
  b = best[0]
  assert (b["best"], b["default"]) == ("scan/dots_attention", "loop/none") and abs(b["speedup"] - 2) < 1e-9
  assert set(b["layouts"]) == {"loop/none", "scan/dots_attention"}
  assert set(bench.LAYOUTS) >= {"scan/none", "loop/none", "scan/dots_kernels", "scan/dots_attention"}
