"""Where a decode token's GPU time goes: the on-device loop (`Decoder.decode`) of --tokens tokens traced, its
kernels summed per XLA op and per source line of our code (`benchmarks.profiling`), per token.

The loop is compiled with command buffers off (`xla_gpu_enable_command_buffer` empty) so each kernel shows in
the trace under its own op (inside a command buffer the whole step is one event; the timing rows of
inference_bench.py keep XLA's default). The cache starts at --context + 1, off a memory-chunk boundary, so the
profile is that of the tokens inside a chunk (the boundary's extra work comes once per chunk).

`--prefill T` profiles a batch-1 prefill of T tokens instead (`Decoder.prefill` with last_only, the call
inference_bench times), per call: what the prompt's forward and the decode cache it builds cost, per source line.
It is compiled with command buffers off through XLA_FLAGS, set before the backend starts.

    python3 -m benchmarks.speed.decode_profile --size 1.4b --families bmojo,transformer
        # -> benchmarks/results/decode_loop_profile_<device>.json
    python3 -m benchmarks.speed.decode_profile --size 1.4b --families bmojo,transformer --prefill 2048
        # -> benchmarks/results/prefill_profile_<device>.json
    python3 -m benchmarks.speed.decode_profile --tiny          # CPU smoke
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import device_name, write_results
from benchmarks.profiling import hlo_sources, op_times
from benchmarks.speed.decoding import at_position
from benchmarks.speed.inference_bench import model_config
from bmojo_jax import LanguageModel, inference
from bmojo_jax.config import Family
from bmojo_jax.inference import Decoder

NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def profile_family(family: Family, size: str, batch: int, context: int, tokens: int, top: int,
                   decode_attn_impl: str = "auto", **decoder_kw) -> dict:
  cfg = model_config(family, size, decode_attn_impl)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  gpu = jax.default_backend() == "gpu"
  decoder = Decoder(model, compiler_options=NO_COMMAND_BUFFERS if gpu else None, **decoder_kw)
  cache0 = at_position(model.init_cache(batch, context + tokens + 2), context + 1)
  logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)

  def run():
    return decoder.decode(logits, jax.tree.map(jnp.copy, cache0), tokens)[0]

  jax.block_until_ready(run())
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  wall_ms = (time.perf_counter() - t0) * 1e3
  args = (decoder.graphdef, decoder.state, logits, cache0, jnp.zeros((batch, tokens), jnp.int32),
          jnp.zeros((batch, tokens), bool), jax.random.key(0), jnp.asarray(0, jnp.int32), 0.0, None, None)
  labels = hlo_sources(decoder._loop_fn.lower(*args).compile().as_text())
  kernels = {}
  ops = traced_ops(run, tokens, kernels)
  tables = op_tables(ops, labels, kernels, top)
  return dict(op="decode_profile", family=family.value, size=size, batch=batch, context=context, tokens=tokens,
              attn_impl=cfg.compute.attn_impl.value, decode_attn_impl=cfg.compute.decode_attn_impl.value,
              kernel_layout=str(decoder.kernel_layout),
              wall_ms_per_token=wall_ms / tokens, gpu_ms_per_token=sum(ms for ms, _ in ops.values()),
              launches_per_token=sum(n for _, n in ops.values()), **tables, device=device_name())


def profile_prefill(family: Family, size: str, t: int, top: int, **decoder_kw) -> dict:
  """The batch-1 prefill of t tokens (cache sized for t + 1, the last position's logits), traced once."""
  cfg = model_config(family, size)
  decoder = Decoder(LanguageModel(cfg, rngs=nnx.Rngs(0)), **decoder_kw)
  tokens = jnp.zeros((1, t), jnp.int32)

  def run():
    return decoder.prefill(tokens, t + 1, last_only=True)

  jax.block_until_ready(run())
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  wall_ms = (time.perf_counter() - t0) * 1e3
  args = (decoder.prefill_graphdef, decoder.prefill_state, tokens, t + 1, True, decoder.n_unstack)
  labels = hlo_sources(inference._prefill.lower(*args).compile().as_text())
  kernels = {}
  ops = traced_ops(run, 1, kernels)
  return dict(op="prefill_profile", family=family.value, size=size, batch=1, T=t,
              attn_impl=cfg.compute.attn_impl.value, kernel_layout=str(decoder.kernel_layout), wall_ms=wall_ms,
              gpu_ms=sum(ms for ms, _ in ops.values()), launches=sum(n for _, n in ops.values()),
              **op_tables(ops, labels, kernels, top), device=device_name())


def traced_ops(run, per: int, kernels: dict[str, str]) -> dict[str, tuple[float, int]]:
  """`op_times` of one traced call of run(), divided by `per` (the tokens it decodes, or 1); fills `kernels`."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(run())
    return op_times(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0], per,
                    kernels)


def op_tables(ops: dict[str, tuple[float, int]], labels: dict[str, str], kernels: dict[str, str],
              top: int) -> dict[str, list[dict]]:
  """{"by_source": ms and launches summed per source line of ours, "by_op": the top ops with their lines and
  longest kernel's name}; an op without a source line of ours ("[]": a copy or layout change XLA inserted) goes
  by its kind, "(copy)"."""
  by_source = collections.defaultdict(lambda: [0.0, 0])
  for op, (ms, calls) in ops.items():
    label = labels.get(op, "")
    key = ("" if label.startswith("[") else label.split(" [")[0]) or f"({op.split('.')[0]})"
    by_source[key][0] += ms
    by_source[key][1] += calls
  rows = sorted(by_source.items(), key=lambda kv: -kv[1][0])
  top_ops = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
  return dict(by_source=[dict(source=k, ms=ms, launches=n) for k, (ms, n) in rows[:top]],
              by_op=[dict(op=op, source=labels.get(op, ""), kernel=kernels.get(op, ""), ms=ms, launches=n)
                     for op, (ms, n) in top_ops])


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="1.4b")
  ap.add_argument("--families", default="bmojo,transformer")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--context", type=int, default=1024)
  ap.add_argument("--tokens", type=int, default=32, help="decode steps traced (one on-device loop)")
  ap.add_argument("--top", type=int, default=40, help="source lines and ops kept per family")
  ap.add_argument("--decode_attn_impl", default="auto", help="compute.decode_attn_impl: auto | reference | pallas")
  ap.add_argument("--kernel_layout", default=None, help="the Decoder's kernel_layout (default: its own)")
  ap.add_argument("--prefill", type=int, default=0,
                  help="T > 0: profile a batch-1 prefill of T tokens instead of the decode loop")
  ap.add_argument("--tiny", action="store_true", help="CPU smoke: the tiny models of inference_bench")
  ap.add_argument("--out_dir", default=None, help="results folder (default $OUT or benchmarks/results)")
  args = ap.parse_args(argv)
  size = "tiny" if args.tiny else args.size
  context = 16 if args.tiny else args.context
  records = []
  if args.prefill:
    # The prefill is one jitted call without compiler options of its own: command buffers go off for the whole
    # process (harmless off a GPU), so its kernels show one by one, as in the decode loop's profile.
    # (Restored afterwards: a caller's process, a test's, keeps its own.)
    flags = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = (flags or "") + " --xla_gpu_enable_command_buffer="
    try:
      for name in args.families.split(","):
        rec = profile_prefill(Family(name), size, args.prefill, args.top, kernel_layout=args.kernel_layout)
        records.append(rec)
        print(f"{name:12s} prefill T={args.prefill}: {rec['gpu_ms']:.3f} GPU ms ({rec['launches']} launches), "
              f"wall {rec['wall_ms']:.3f} ms", flush=True)
        for row in rec["by_source"][:12]:
          print(f"    {row['ms']:.4f} ms {row['launches']:4d}x  {row['source']}")
    finally:
      if flags is None:
        os.environ.pop("XLA_FLAGS")
      else:
        os.environ["XLA_FLAGS"] = flags
    print("->", write_results(records, "prefill_profile_tiny" if args.tiny else "prefill_profile", args.out_dir))
    return
  for name in args.families.split(","):
    rec = profile_family(Family(name), size, args.batch, context, 4 if args.tiny else args.tokens, args.top,
                         args.decode_attn_impl, kernel_layout=args.kernel_layout)
    records.append(rec)
    print(f"{name:12s} {rec['gpu_ms_per_token']:.3f} GPU ms/token ({rec['launches_per_token']} launches), "
          f"wall {rec['wall_ms_per_token']:.3f} ms/token", flush=True)
    for row in rec["by_source"][:12]:
      print(f"    {row['ms']:.4f} ms {row['launches']:4d}x  {row['source']}")
  print("->", write_results(records, "decode_loop_profile_tiny" if args.tiny else "decode_loop_profile",
                            args.out_dir))


if __name__ == "__main__":
  main()
