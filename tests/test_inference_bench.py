"""benchmarks/speed/inference_bench.py runs end to end at tiny size on CPU and writes the records issue 36 asks for."""

import json
import sys

import pytest

from benchmarks.speed import inference_bench

# main() clears jax's caches after each family (one model's compiled code at a time): the persistent cache gives
# its later calls here (the same tiny bmojo rows in three tests, the budget test's reruns) what an earlier one
# compiled.
pytestmark = pytest.mark.usefixtures("module_compilation_cache")

PREFILL = {"op", "family", "attn_impl", "size", "batch", "T", "ms", "compile_s", "device"}
DECODE = {"op", "family", "attn_impl", "size", "batch", "context", "loop", "tokens_per_s", "floor_tokens_per_s",
          "compile_s", "device"}


def test_tiny_run_writes_the_record_schema(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["inference_bench", "--tiny", "--families", "bmojo", "--prefill_T", "16",
                                    "--contexts", "16,64", "--batches", "1", "--kernel_layout", "out_in",
                                    "--decode_attn_impl", "pallas",
                                    "--out_dir", str(tmp_path)])
  inference_bench.main()
  records = json.loads((tmp_path / "inference_cpu.json").read_text())
  assert (tmp_path / "inference_cpu.png").exists()
  assert {r["kernel_layout"] for r in records} == {"out_in"}     # the flag, not the CPU's default (in_out)
  assert {r["decode_attn_impl"] for r in records} == {"pallas"}  # the kernel (interpret mode), not auto's reference
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


def test_tiny_chunked_prefill_rows_record_their_memory(tmp_path, monkeypatch):
  """--prefill_chunks: a row per chunk size, each with the compiled pieces' largest temporary buffer, which
  chunking bounds: at T 64 pieces of 8 need less than one pass of 64. --compiler_options reach the decoder and
  the records. --step_batches names the batches timed from Python too: none of these."""
  monkeypatch.setattr(sys, "argv", ["inference_bench", "--tiny", "--families", "hybrid", "--prefill_T", "64",
                                    "--prefill_chunks", "0,8", "--contexts", "16", "--batches", "1",
                                    "--step_batches", "2",
                                    "--compiler_options", '{"xla_cpu_enable_fast_math": false}',
                                    "--out_dir", str(tmp_path)])
  inference_bench.main()
  records = json.loads((tmp_path / "inference_cpu.json").read_text())
  prefill = {r["chunk"]: r for r in records if r["op"] == "prefill"}
  assert set(prefill) == {None, 8} and all(PREFILL <= set(r) and r["ms"] > 0 for r in prefill.values())
  assert 0 < prefill[8]["temp_bytes"] < prefill[None]["temp_bytes"]
  assert {r["compiler_options"] for r in records} == {'{"xla_cpu_enable_fast_math": false}'}
  assert [(r["batch"], r["loop"]) for r in records if r["op"] == "decode"] == [(1, True)]


def test_budget_leaves_rows_out_and_resume_goes_on(tmp_path, monkeypatch, capsys):
  """--budget_s: no row starts once it has passed (nothing is written, the rows left out are listed); --resume:
  a rerun measures only the rows the file lacks, and the file then holds both runs' rows."""
  common = ["inference_bench", "--tiny", "--families", "bmojo", "--prefill_T", "16", "--batches", "1",
            "--out_dir", str(tmp_path)]
  monkeypatch.setattr(sys, "argv", common + ["--contexts", "16", "--budget_s", "0"])
  inference_bench.main()
  out = capsys.readouterr().out
  assert not (tmp_path / "inference_cpu.json").exists() and out.count("left out (--budget_s 0)") == 3, out
  monkeypatch.setattr(sys, "argv", common + ["--contexts", "16"])
  inference_bench.main()
  first = json.loads((tmp_path / "inference_cpu.json").read_text())
  assert len(first) == 3
  monkeypatch.setattr(sys, "argv", common + ["--contexts", "16,64", "--resume"])
  inference_bench.main()
  assert "2 records in" in capsys.readouterr().out
  records = json.loads((tmp_path / "inference_cpu.json").read_text())
  assert sorted((r["op"], r.get("context"), r.get("loop")) for r in records) == [
      ("decode", 16, False), ("decode", 16, True), ("decode", 64, False), ("decode", 64, True),
      ("prefill", None, None)]
  assert [r for r in records if r.get("context") == 16 or r["op"] == "prefill"] == [
      r for r in first]                                    # the first run's rows kept as they were


def test_prefill_rows_leave_out_chunks_that_hold_the_whole_prompt():
  import argparse
  args = argparse.Namespace(prefill_T=[1024, 16384], prefill_chunks=[0, 4096])
  assert inference_bench.prefill_rows(args) == [(1024, None), (16384, None), (16384, 4096)]


@pytest.mark.parametrize("flag, value", [("--budget_s", "-1"), ("--budget_s", "nan"), ("--prefill_chunks", "0,-8")])
def test_bad_budget_or_chunk_is_refused_in_one_line(flag, value, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["inference_bench", "--tiny", flag, value])
  with pytest.raises(SystemExit):
    inference_bench.main()
  assert flag in capsys.readouterr().err


def test_gemv_bench_tiny_times_both_layouts(tmp_path):
  """benchmarks/speed/gemv_bench.py: each shape and row count timed in both kernel layouts, each product right."""
  from benchmarks.speed import gemv_bench
  gemv_bench.main(["--tiny", "--rows", "1,2", "--out_dir", str(tmp_path)])
  records = json.loads((tmp_path / "gemv_tiny_cpu.json").read_text())
  assert sorted((r["D"], r["N"], r["M"]) for r in records) == [(32, 64, 1), (32, 64, 2), (64, 32, 1), (64, 32, 2)]
  for r in records:
    for layout in ("in_out", "out_in"):
      assert r[f"{layout}_max_err"] < 1e-5 and r[f"{layout}_us"] > 0 and r[f"{layout}_TBps"] > 0


def test_decode_profile_tiny_attributes_the_loop_to_source_lines(tmp_path):
  """benchmarks/speed/decode_profile.py traces the on-device loop and sums its ops per token and source line: the
  attention sublayer's, the Mamba sublayer's and the selection's lines each appear; an op without a line of ours
  goes under its kind in parentheses, never under an empty label; the top ops name their source."""
  from benchmarks.speed import decode_profile
  decode_profile.main(["--tiny", "--families", "bmojo", "--top", "1000", "--out_dir", str(tmp_path)])
  (rec,) = json.loads((tmp_path / "decode_loop_profile_tiny_cpu.json").read_text())
  assert rec["family"] == "bmojo" and rec["tokens"] == 4 and rec["gpu_ms_per_token"] > 0
  assert rec["launches_per_token"] > 0 and rec["wall_ms_per_token"] > 0
  sources = [row["source"] for row in rec["by_source"]]
  for part in ("bmojo_jax/decode_cache.py", "bmojo_jax/mamba.py", "bmojo_jax/memory/selection.py"):
    assert any(s.startswith(part) for s in sources), (part, sources)
  assert all(s and s != "[]" for s in sources) and any(s.startswith("(") and s.endswith(")") for s in sources)
  assert rec["by_op"] and any(row["source"].startswith("bmojo_jax/") for row in rec["by_op"])
  assert sum(row["ms"] for row in rec["by_source"]) == pytest.approx(rec["gpu_ms_per_token"], rel=1e-9)
  assert sum(row["launches"] for row in rec["by_source"]) == rec["launches_per_token"]


def test_prefill_profile_tiny_attributes_the_prompt_to_source_lines(tmp_path):
  """decode_profile --prefill T traces one batch-1 prefill instead: its ops sum per source line to the call's GPU
  time, and the Mamba sublayer's and the memory selection's lines appear."""
  from benchmarks.speed import decode_profile
  decode_profile.main(["--tiny", "--families", "bmojo", "--prefill", "32", "--top", "1000", "--out_dir",
                       str(tmp_path)])
  (rec,) = json.loads((tmp_path / "prefill_profile_tiny_cpu.json").read_text())
  assert rec["op"] == "prefill_profile" and rec["T"] == 32 and rec["gpu_ms"] > 0 and rec["launches"] > 0
  sources = [row["source"] for row in rec["by_source"]]
  for part in ("bmojo_jax/mamba.py", "bmojo_jax/memory/selection.py"):
    assert any(s.startswith(part) for s in sources), (part, sources)
  assert sum(row["ms"] for row in rec["by_source"]) == pytest.approx(rec["gpu_ms"], rel=1e-9)
  assert sum(row["launches"] for row in rec["by_source"]) == rec["launches"]
  assert all(row["kernel"] for row in rec["by_op"])        # each op's longest kernel, named
