"""--throughput: aggregate tokens/s of populations of R runs against the single-run trainer, optionally traced
(GPU ms per training step by source line)."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import jax
import ml_collections
import numpy as np

from benchmarks import profiling
from benchmarks.common import RESULTS, append_results, device_name, device_tag, write_json
from benchmarks.studies.mqar_sweep.population import population_config
from bmojo_jax import count_params
from bmojo_jax.kernels import resolve_attn_impl, resolve_scan_impl
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import population as pop_lib
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import trainer


def throughput(args) -> str:
  """Aggregate tokens/s of populations of R runs vs the single-run trainer (grain data, a Python step loop),
  at one (family, d_model, N)."""
  family, d_model, n = args.families[0], args.d_models[0], args.kv_pairs[0]
  config = population_config(args, family, "", d_model, n)
  config.train.target_accuracy = 0.0
  records = []
  base = None
  if args.baseline_steps:
    # The single-run trainer: its logged tokens/s per interval of log_every steps, the first (compile) dropped.
    single = ml_collections.ConfigDict(config.to_dict())
    t = single.train
    t.num_steps, t.log_every, t.eval_every = args.baseline_steps, max(1, args.baseline_steps // 5), 0
    t.checkpoint_every, t.progress_bar, t.plot = args.baseline_steps, False, False
    single.data.num_test = min(int(single.data.num_test), int(t.eval_batch_size))
    with tempfile.TemporaryDirectory() as workdir:
      trainer.train(single, workdir)
      intervals = [r["tokens_per_s"] for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"][1:]
    base = float(np.median(intervals))
    records.append({"mode": "trainer", "runs": 1, "tokens_per_s": base, "speedup": 1.0})
    print(f"single-run trainer: {base / 1e6:.3f}M tokens/s")
  for size in args.runs:
    runs = [pop_lib.Run(args.lrs[i % len(args.lrs)], i // len(args.lrs)) for i in range(size)]
    try:
      pop = pop_lib.Population(config, runs, steps_per_dispatch=args.steps_per_dispatch)
      tps = pop_lib.tokens_per_second(pop, dispatches=args.dispatches)
      rec = {"mode": "population", "runs": size, "tokens_per_s": tps, "speedup": tps / base if base else None,
             "steps_per_dispatch": pop.steps_per_dispatch}
      if args.profile:
        rec["profile"] = profile_population(pop, args.profile, f"{args.label or family}_r{size}")
    except Exception as e:  # pylint: disable=broad-except  (out of memory at large R: recorded, next R)
      rec = {"mode": "population", "runs": size, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    records.append(rec)
    print(rec)
  cfg = setup_lib.model_config(config)
  for r in records:
    r.update(family=family, d_model=d_model, N=n, L=int(config.data.seq_len), batch_size=int(config.train.batch_size),
             params=count_params(cfg), scan_impl=resolve_scan_impl(cfg.compute.scan_impl).value,
             attn_impl=resolve_attn_impl(cfg.compute.attn_impl).value,
             dtype=cfg.compute.dtype, label=args.label, overrides=args.set, device=device_name(),
             jax=jax.__version__)
  out_dir = args.out or os.environ.get("OUT") or RESULTS
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"mqar_sweep_throughput_{'cpu_smoke' if args.smoke else device_tag()}.json")
  append_results(records, path) if args.append else write_json(path, records)
  print(f"-> {path}")
  return path


def profile_population(pop: pop_lib.Population, out_dir: str, name: str, dispatches: int = 2) -> dict:
  """GPU ms per training step by source line (`benchmarks.profiling`) over `dispatches` dispatches
  of the whole population; writes <out_dir>/<name>_ops.json."""
  state = pop.init_state()
  state = pop.dispatch(state)[0]
  jax.block_until_ready(state)
  trace_dir = os.path.join(tempfile.mkdtemp(), "trace")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(dispatches):
      state = pop.dispatch(state)[0]
    jax.block_until_ready(state)
  traces = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not traces:
    return {"error": f"no perfetto trace under {trace_dir}"}
  steps = dispatches * pop.steps_per_dispatch
  ops = profiling.op_times(traces[0], steps)
  labels = profiling.hlo_sources(pop._dispatch.lower(state).compile().as_text())  # pylint: disable=protected-access
  by_source = {}
  for op, (ms, _) in ops.items():
    key = labels.get(op, "").split(" [")[0] or op.split(".")[0]
    by_source[key] = by_source.get(key, 0.0) + ms
  summary = {"gpu_ms_per_step": sum(ms for ms, _ in ops.values()), "runs": pop.size,
             "by_source": dict(sorted(by_source.items(), key=lambda kv: -kv[1]))}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, name + "_ops.json"), "w") as f:
    json.dump(summary, f, indent=1)
  top = dict(list(summary["by_source"].items())[:20])
  print(f"{name}: {summary['gpu_ms_per_step']:.2f} GPU ms per step; top sources:")
  for k, v in top.items():
    print(f"  {v:8.3f} ms  {k}")
  return {"gpu_ms_per_step": summary["gpu_ms_per_step"], "top_sources": top}
