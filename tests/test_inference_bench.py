"""benchmarks/speed/inference_bench.py runs end to end at tiny size on CPU and writes the records issue 36 asks for."""

import json
import sys

from benchmarks.speed import inference_bench

PREFILL = {"op", "family", "attn_impl", "size", "batch", "T", "ms", "compile_s", "device"}
DECODE = {"op", "family", "attn_impl", "size", "batch", "context", "loop", "tokens_per_s", "floor_tokens_per_s",
          "compile_s", "device"}


def test_tiny_run_writes_the_record_schema(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["inference_bench", "--tiny", "--families", "bmojo", "--prefill_T", "16",
                                    "--contexts", "16,64", "--batches", "1", "--out_dir", str(tmp_path)])
  inference_bench.main()
  records = json.loads((tmp_path / "inference_cpu.json").read_text())
  assert (tmp_path / "inference_cpu.png").exists()
  prefill = [r for r in records if r["op"] == "prefill"]
  decode = [r for r in records if r["op"] == "decode"]
  assert [r["T"] for r in prefill] == [16] and PREFILL <= set(prefill[0])
  assert sorted((r["context"], r["loop"]) for r in decode) == [(16, False), (16, True), (64, False), (64, True)]
  for r in prefill + decode:
    assert r["family"] == "bmojo" and r["size"] == "tiny" and r["batch"] == 1 and "skipped" not in r
    assert (PREFILL if r["op"] == "prefill" else DECODE) <= set(r)
    assert r["compile_s"] >= 0 and (r["ms"] if r["op"] == "prefill" else r["tokens_per_s"]) > 0
  for r in decode:
    assert isinstance(r["loop"], bool) and r["floor_tokens_per_s"] > 0
