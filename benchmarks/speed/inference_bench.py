"""Inference per family against the bandwidth floor (issue 36), written to inference_<device>.json and a figure.

    python -m benchmarks.speed.inference_bench [--sizes 130m,1.4b] [--families bmojo,transformer] [--prefill_T 1024,...]
        [--contexts 1024,8192,32768] [--batches 1,8,64] [--step_batches 1,64] [--steps 32] [--prefill_chunks 0,4096]
        [--compiler_options '{"xla_gpu_enable_command_buffer": "FUSION,WHILE"}'] [--kernel_layout out_in]
        [--decode_attn_impl pallas] [--budget_s 450] [--resume] [--tiny]

Records (bf16 weights and compute; the Transformer with cuDNN attention on GPU, the others with the Pallas
kernels; `--tiny` runs a tiny config on CPU with the reference implementations):
  {"op": "prefill", "family", "attn_impl", "size", "batch": 1, "T", "ms", "compile_s", "device"}
      the prompt's forward with its decode cache and the last position's logits (`Decoder.prefill`, blocks in
      one lax.scan: `scan_prefill`), median of --iters jitted calls; compile_s = first call - median.
      "chunk": null for one parallel pass, C for a chunked prefill in pieces of C tokens (`prefill_chunk`;
      --prefill_chunks, 0 naming the whole prompt; a C >= T gives no row, its one piece being the whole). When
      --prefill_chunks names a chunk, every prefill row also has "temp_bytes": the largest temporary
      (activation) buffer XLA assigns to a compiled piece (the executable's memory_analysis; the parameters and
      the cache come on top), what bounded memory bounds.
  {"op": "decode", "family", "attn_impl", "size", "batch", "context", "loop", "tokens_per_s",
   "floor_tokens_per_s", "compile_s", "device"}
      --steps greedy tokens after `context` tokens: loop true through `Decoder.decode` (a lax.scan on device,
      sampling included), loop false one compiled `Decoder.step` per token called from Python (the batches of
      --step_batches, default 1).
      A step's cost does not depend on what the cache holds, so the cache starts from `init_cache` with its
      position set to the context. Constant-cache families reuse one compiled function for every context.
      floor = batch / ((weight bytes + cache bytes) / copy bandwidth): every step reads the weights and the
      whole cache once; the bandwidth is that of a large device-to-device copy (bytes read + written / s).
      compile_s: the first call's time beyond a timed one (for a context that reuses a compiled function,
      that function's). Rows also carry cache_bytes, weight_bytes and copy_bandwidth.
A row that cannot run (the Transformer's KV cache beyond --cache_fraction of device memory, or out of
memory) is written with "skipped": the reason and null measurements. --compiler_options (a JSON object of XLA
options) compiles the decode step and loop with them (`Decoder`'s compiler_options); every record names them
("compiler_options": the JSON, null for none). --kernel_layout (in_out | out_in; default the decoder's,
`default_kernel_layout`: out_in on a GPU) is how the decoder stores the projection kernels; every record names
it ("kernel_layout"; records written before the field were in_out), and the figure plots this run's.
--decode_attn_impl (auto | reference | pallas) picks a decode step's attention (`compute.decode_attn_impl`; auto
on a GPU: the kernel for a small ring cache or a large batch, else the reference,
`bmojo_jax.kernels.decode_step_attention_by_shape`),
named in every record ("decode_attn_impl"; earlier records: reference). Records
of an earlier run of the same file that this run does not measure are kept (run sizes or families in separate
calls).

The file is rewritten after every row, so a run cut short keeps what it measured. --budget_s S: no row starts
after S seconds (from the start of main; a row already running finishes); the rows left out are listed at the
end and not written. --resume: rows the file already holds measured (not skipped) are not measured again, and a
family none of whose rows is left is not built: the same command rerun after a budget ran out goes on where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import RowSchedule, device_tag, ints, median_ms, save_figure, write_results
from benchmarks.speed.decoding import at_position, greedy
from bmojo_jax import ComputeConfig, DecodeAttnImpl, Family, KernelLayout, LanguageModel, ModelConfig, preset
from bmojo_jax import inference
from bmojo_jax.inference import Decoder, cache_bytes, prefill_pieces
from bmojo_jax.kernels import resolve_decode_attn_impl

KEY_FIELDS = ("op", "family", "size", "batch", "T", "chunk", "context", "loop", "compiler_options", "kernel_layout",
              "decode_attn_impl")


def model_config(family: Family, size: str, decode_attn_impl: str = "auto") -> ModelConfig:
  """bf16 `<family>-<size>` preset on GPU; `tiny`: a CPU-sized model with the reference implementations (the
  decode attention as asked: "pallas" runs the kernel in interpret mode there)."""
  if size == "tiny":
    kw = dict(family=family, vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, window=16,
              chunk_size=8, n_fading=2, n_eidetic=8, eidetic_per_chunk=4, d_state=4, param_dtype="bfloat16",
              compute=ComputeConfig(scan_chunk=16, attn_impl="reference", scan_impl="sequential", dtype="bfloat16",
                                    decode_attn_impl=decode_attn_impl))
    if family == Family.TRANSFORMER:
      kw.update(window=None)
    return ModelConfig(**kw)
  attn = "cudnn" if family == Family.TRANSFORMER else "pallas"
  return preset(f"{family.value}-{size}", param_dtype="bfloat16",
                compute=ComputeConfig(dtype="bfloat16", attn_impl=attn, decode_attn_impl=decode_attn_impl))


def copy_bandwidth() -> float:
  """Bytes read + written per second by a large device-to-device copy (1 GiB on GPU, 64 MiB on CPU).

  Each sample is >= 50 ms of back-to-back copies: a sample of one ~0.8 ms copy also timed its synchronization
  and the clocks still rising from idle, and read 1.8-2.6 TB/s on H100s where the copy runs at 3.0."""
  n = (2**28 if jax.default_backend() == "gpu" else 2**24)
  x = jnp.ones((n,), jnp.float32)
  copy = jax.jit(lambda x: x + 1)      # one read and one write of every element
  ms = median_ms(copy, x, warmup=5, iters=10, min_sample_ms=50.0)
  return 2 * x.nbytes / (ms / 1e3)


def memory_limit() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def prefill_ms(decoder: Decoder, t: int, iters: int, chunk: int | None = None) -> tuple[float, float]:
  """(median ms, compile s) of the batch-1 prefill of t tokens (cache sized for t + 1), in pieces of chunk
  tokens if given."""
  tokens = jnp.zeros((1, t), jnp.int32)
  fn = lambda: decoder.prefill(tokens, t + 1, last_only=True, chunk=chunk)
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  ms = median_ms(fn, warmup=1, iters=iters)
  return ms, max(0.0, first - ms / 1e3)


def prefill_temp_bytes(decoder: Decoder, t: int, chunk: int | None = None) -> int:
  """The largest temporary buffer (bytes) of the compiled pieces of a batch-1 prefill of t tokens (cache sized
  for t + 1; `prefill_pieces`): XLA's buffer assignment for the activations, compiled ahead of time here."""
  tokens = jnp.zeros((1, t), jnp.int32)
  pieces = prefill_pieces(t, chunk)
  lo, hi = pieces[0]
  args = (decoder.prefill_graphdef, decoder.prefill_state, tokens[:, lo:hi], t + 1, True, decoder.n_unstack)
  compiled = [inference._prefill.lower(*args).compile()]
  if len(pieces) > 1:
    cache = jax.eval_shape(lambda: inference._prefill(*args)[1])
    lo, hi = pieces[1]
    compiled.append(inference._continue.lower(decoder.graphdef, decoder.state, tokens[:, lo:hi], cache,
                                              True).compile())
  return max(c.memory_analysis().temp_size_in_bytes for c in compiled)


def decode_tokens_per_s(decoder: Decoder, model: LanguageModel, batch: int, context: int, steps: int,
                        loop: bool) -> tuple[float, float]:
  """(tokens/s, first call s - timed call s) of `steps` greedy tokens after `context`: the median of 3 timed
  calls of `Decoder.decode` (loop) or of `steps` calls of `Decoder.step` from Python."""
  cache = at_position(model.init_cache(batch, context + 8 * steps), context)
  logits = jnp.zeros((batch, model.cfg.vocab_size), jnp.float32)

  def run(cache, logits):
    if loop:
      _, logits, cache = decoder.decode(logits, cache, steps)
    else:
      for _ in range(steps):
        logits, cache = decoder.step(greedy(logits), cache)
    return cache, logits

  times = []
  for _ in range(4):                                   # the first call compiles
    jax.block_until_ready((cache, logits))
    t0 = time.perf_counter()
    cache, logits = run(cache, logits)
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - t0)
  timed = float(np.median(times[1:]))
  return batch * steps / timed, max(0.0, times[0] - timed)


def figure(records: list[dict], path: str, kernel_layout: str, decode_attn_impl: str = "reference") -> str:
  """tokens/s against context per family (on-device loop), a panel per size and batch (1 and 64), of the rows
  decoded with kernel_layout and decode_attn_impl (rows without the fields were in_out and reference)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in records if r["op"] == "decode" and r.get("loop") and r.get("tokens_per_s")
          and r.get("kernel_layout", "in_out") == kernel_layout
          and r.get("decode_attn_impl", "reference") == decode_attn_impl]
  sizes = sorted({r["size"] for r in rows})
  batches = sorted({r["batch"] for r in rows} & {1, 64}) or sorted({r["batch"] for r in rows})[:2]
  fig, axes = plt.subplots(len(sizes), len(batches), figsize=(5 * len(batches), 3.6 * len(sizes)),
                           squeeze=False)
  for ax_row, size in zip(axes, sizes):
    for ax, batch in zip(ax_row, batches):
      for family in Family:
        pts = sorted((r["context"], r["tokens_per_s"], r["floor_tokens_per_s"]) for r in rows
                     if r["size"] == size and r["batch"] == batch and r["family"] == family.value)
        if pts:
          line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=family.value)
          ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=line.get_color(), alpha=0.6)
      ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="tokens/s",
             title=f"{size}, batch {batch} (dotted: floor)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  return save_figure(fig, path)


def prefill_rows(args) -> list[tuple[int, int | None]]:
  """(T, chunk) of the prefill rows: every T with every chunk of --prefill_chunks (0: None, one pass), less
  the chunks >= T, whose one piece is the whole prompt (the chunk None row)."""
  return [(t, c or None) for t in args.prefill_T for c in args.prefill_chunks if not c or c < t]


def planned_rows(family: Family, size: str, args, compiler_options: str | None) -> list[dict]:
  """The key fields of every row of one family and size, in the order they are measured."""
  base = dict(family=family.value, size=size, compiler_options=compiler_options, kernel_layout=args.kernel_layout,
              decode_attn_impl=args.decode_attn_impl)
  rows = [dict(op="prefill", **base, batch=1, T=t, chunk=c) for t, c in prefill_rows(args)]
  return rows + [dict(op="decode", **base, batch=b, context=ctx, loop=loop) for b, loop, ctx in decode_rows(args)]


def decode_rows(args) -> list[tuple[int, bool, int]]:
  """(batch, loop, context) of every decode row in measuring order: the on-device loop at every batch, one step
  per token called from Python too at the batches of --step_batches."""
  return [(batch, loop, context) for batch in args.batches
          for loop in ((True, False) if batch in args.step_batches else (True,)) for context in args.contexts]


def bench_family(family: Family, size: str, args, bandwidth: float, limit: float | None, emit,
                 schedule: RowSchedule) -> None:
  options = json.loads(args.compiler_options) if args.compiler_options else None
  named = json.dumps(dict(inference.check_compiler_options(options))) if options else None
  planned = planned_rows(family, size, args, named)
  if not any(map(schedule.wanted, planned)) or schedule.over():   # nothing to do: the model is not built
    for rec in planned:
      schedule.runs(rec)                               # lists the rows the budget leaves out
    return
  cfg = model_config(family, size, args.decode_attn_impl)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  decoder = Decoder(model, scan_prefill=True, compiler_options=options, kernel_layout=args.kernel_layout)
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(decoder.state))
  base = dict(family=family.value, attn_impl=str(cfg.compute.attn_impl), size=size, compiler_options=named,
              kernel_layout=str(decoder.kernel_layout), decode_attn_impl=args.decode_attn_impl)
  cap = None if limit is None else args.cache_fraction * limit

  memory = any(args.prefill_chunks)
  for t, chunk in prefill_rows(args):
    rec = dict(op="prefill", **base, batch=1, T=t, chunk=chunk, ms=None, compile_s=None)
    if not schedule.runs(rec):
      continue
    try:
      rec["ms"], rec["compile_s"] = prefill_ms(decoder, t, args.iters, chunk)
      if memory:
        rec["temp_bytes"] = prefill_temp_bytes(decoder, t, chunk)
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      rec["skipped"] = f"out of memory: {str(e)[:200]}"
    emit(rec)

  compile_s = {}          # (loop, batch, cache bytes): one compiled function per cache shape
  for batch, loop, context in decode_rows(args):
    room = context + 8 * args.steps
    c_bytes = cache_bytes(model, batch, room)
    rec = dict(op="decode", **base, batch=batch, context=context, loop=loop, tokens_per_s=None,
               floor_tokens_per_s=batch * bandwidth / (weights + c_bytes), compile_s=None,
               cache_bytes=c_bytes, weight_bytes=weights)
    if not schedule.runs(rec):
      continue
    if cap is not None and c_bytes > cap:
      rec["skipped"] = f"cache {c_bytes / 2**30:.1f} GiB > {args.cache_fraction} of device memory"
    else:
      try:
        rec["tokens_per_s"], first = decode_tokens_per_s(decoder, model, batch, context, args.steps, loop)
        rec["compile_s"] = compile_s.setdefault((loop, batch, c_bytes), first)   # a reused one's own
      except Exception as e:  # pylint: disable=broad-except
        if not is_oom(e):
          raise
        rec["skipped"] = f"out of memory: {str(e)[:200]}"
    emit(rec)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="130m,1.4b")
  parser.add_argument("--families", default=",".join(f.value for f in Family))
  parser.add_argument("--prefill_T", type=ints, help="default 1024,2048,4096,16384,32768 (--tiny: 16,32)")
  parser.add_argument("--contexts", type=ints, help="default 1024,8192,32768 (--tiny: 16,64)")
  parser.add_argument("--batches", type=ints, help="default 1,8,64 (--tiny: 1,2)")
  parser.add_argument("--step_batches", type=ints, default=[1],
                      help="batches whose decode is also timed one Decoder.step per token from Python; default 1")
  parser.add_argument("--steps", type=int, help="tokens per decode timing; default 32 (--tiny: 4)")
  parser.add_argument("--iters", type=int, help="prefill calls per median; default 10 (--tiny: 2)")
  parser.add_argument("--prefill_chunks", "--prefill-chunks", "--prefill-chunk", dest="prefill_chunks", type=ints,
                      default=[0],
                      help="prefill rows per chunk size: 0 the whole prompt, C in pieces of C tokens; default 0")
  parser.add_argument("--compiler_options", default=None,
                      help="a JSON object of XLA options for the decode step and loop")
  parser.add_argument("--kernel_layout", choices=[k.value for k in KernelLayout], default=None,
                      help="how the decoder stores the projection kernels; default the decoder's (out_in on GPU)")
  parser.add_argument("--decode_attn_impl", choices=[k.value for k in DecodeAttnImpl], default="auto",
                      help="a decode step's attention: the jnp reference or the Pallas kernel (default auto: the "
                           "reference)")
  parser.add_argument("--cache_fraction", type=float, default=0.75,
                      help="skip decode rows whose cache exceeds this fraction of device memory")
  parser.add_argument("--budget_s", "--budget-s", dest="budget_s", type=float, default=None,
                      help="start no row after this many seconds (the rows left out are listed, not written)")
  parser.add_argument("--resume", action="store_true",
                      help="skip the rows the output file already holds measured")
  parser.add_argument("--tiny", action="store_true", help="a tiny config on CPU (tests)")
  parser.add_argument("--out_dir", default=None)
  args = parser.parse_args()
  if args.budget_s is not None and not 0 <= args.budget_s < float("inf"):
    parser.error(f"--budget_s {args.budget_s}: must be a finite number of seconds >= 0")
  if any(c < 0 for c in args.prefill_chunks):
    parser.error(f"--prefill_chunks {args.prefill_chunks}: chunk sizes are >= 0 (0: the whole prompt)")
  args.kernel_layout = args.kernel_layout or str(inference.default_kernel_layout())
  args.decode_attn_impl = str(resolve_decode_attn_impl(args.decode_attn_impl))
  t0 = time.perf_counter()
  sizes = ["tiny"] if args.tiny else args.sizes.split(",")
  defaults = (dict(prefill_T=[16, 32], contexts=[16, 64], batches=[1, 2], steps=4, iters=2) if args.tiny else
              dict(prefill_T=[1_024, 2_048, 4_096, 16_384, 32_768], contexts=[1_024, 8_192, 32_768],
                   batches=[1, 8, 64], steps=32, iters=10))
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)

  bandwidth = copy_bandwidth()
  limit = memory_limit()
  print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); memory limit "
        f"{None if limit is None else round(limit / 2**30, 1)} GiB", flush=True)
  records: list[dict] = []
  out_dir = args.out_dir or os.environ.get("OUT") or "benchmarks/results"
  path = os.path.join(out_dir, f"inference_{device_tag()}.json")

  def emit(rec: dict) -> None:
    rec["copy_bandwidth"] = bandwidth
    records.append(rec)
    what = f"T {rec['T']:6d} chunk {rec['chunk']}: {rec['ms']} ms" if rec["op"] == "prefill" else (
        f"batch {rec['batch']:3d} context {rec['context']:6d} loop {rec['loop']!s:5s}: "
        f"{rec['tokens_per_s']} tok/s (floor {rec['floor_tokens_per_s']:.0f})")
    if "temp_bytes" in rec:
      what += f" (temp {rec['temp_bytes'] / 2**20:.1f} MiB)"
    print(f"{rec['size']:5s} {rec['family']:12s} {rec['op']:8s} {what} compile {rec['compile_s']} s"
          f"{'  SKIPPED ' + rec['skipped'] if 'skipped' in rec else ''}", flush=True)
    write_results(schedule.merge_previous(list(records)), "inference", out_dir)   # a cut run keeps its rows

  schedule = RowSchedule(KEY_FIELDS, path, args.resume, args.budget_s, t0)
  for size in sizes:
    for family in map(Family, args.families.split(",")):
      bench_family(family, size, args, bandwidth, limit, emit, schedule)
      jax.clear_caches()                                 # one model's compiled code at a time
  for row in schedule.left_out:
    print(f"left out (--budget_s {args.budget_s:g}): {json.dumps(row)}")
  if not os.path.exists(path):
    print(f"{path}: no rows measured")
    return
  with open(path) as f:
    print(figure(json.load(f), path.replace(".json", ".png"), args.kernel_layout, args.decode_attn_impl))
  print(f"{path}: {len(records)} records in {time.perf_counter() - schedule.t0:.0f} s"
        + (f"; {len(schedule.left_out)} rows left out for the budget: rerun with --resume" if schedule.left_out
           else ""))


if __name__ == "__main__":
  main()
