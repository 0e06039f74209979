"""The sweep's command line: options, their defaults (the protocol's, or tiny ones for --smoke) and the mode
they pick (sweep, --gpus launch, --recheck, --table, --throughput). The package docstring says what each does."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import benchmarks.studies.mqar_sweep as package
from benchmarks.common import ints
from benchmarks.studies.mqar_sweep.population import FAMILIES, ZOOLOGY_LRS
from benchmarks.studies.mqar_sweep.records import load_records, results_paths
from benchmarks.studies.mqar_sweep.recheck import RECHECK_MIN, recheck
from benchmarks.studies.mqar_sweep.report import summarize
from benchmarks.studies.mqar_sweep.sweep import launch, sweep
from benchmarks.studies.mqar_sweep.throughput import throughput
from bmojo_jax.config import Selection

# Defaults of the options left unset: the protocol's, or tiny ones for --smoke (L=32, window 8, a minute or two).
DEFAULTS = dict(d_models="64,128,256", kv_pairs="16,32,64", lrs=",".join(f"{x:.6g}" for x in ZOOLOGY_LRS),
                seq_len=256, window=32, n_fading=8, n_eidetic=80, eidetic_per_chunk=16, epochs=8,
                runs="1,4,8,16", dispatches=5, baseline_steps=250)
SMOKE_DEFAULTS = dict(d_models="16", kv_pairs="4", lrs="3e-3,1e-2", seq_len=32, window=8, n_fading=2, n_eidetic=8,
                      eidetic_per_chunk=4, epochs=2, runs="1,2", dispatches=2, baseline_steps=20)


def floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x]


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python3 -m benchmarks.studies.mqar_sweep",
                              description=package.__doc__.split("\n")[0])
  p.add_argument("--families", default=",".join(FAMILIES),
                 help="comma-separated family[:attn_impl], of " + ", ".join(FAMILIES) + " (attn_impl: --attn-impl's; "
                      "the equal-memory Hybrid takes the Hybrid's), e.g. transformer:cudnn,hybrid:cudnn,bmojo")
  p.add_argument("--d-models", help="default 64,128,256")
  p.add_argument("--lrs", help="default Zoology's logspace(-4, -2, 4)")
  p.add_argument("--kv-pairs", help="N values; default 16,32,64")
  p.add_argument("--seeds", default="0", help="seeds per learning rate (each adds a run to the population)")
  p.add_argument("--seq-len", type=int, help="L; default 256")
  p.add_argument("--window", type=int, help="w; default 32")
  p.add_argument("--n-fading", type=int, help="M_f of B'MOJO(-F); default 8 (the 99%% run of docs/results.md)")
  p.add_argument("--n-eidetic", type=int, help="M_e of B'MOJO; default 80 (w + M_f + M_e = 120 <= L/2)")
  p.add_argument("--eidetic-per-chunk", type=int, help="k_e of B'MOJO; default 16")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay fp32); default bfloat16")
  p.add_argument("--attn-impl", default="reference",
                 help="reference (default) | pallas | cudnn, for families without their own :attn_impl. cuDNN "
                      "(no memory tokens: Transformer, Hybrid) trains like the reference in populations: 3 of 4 "
                      "seeds against 4 of 4 reached 0.99 (docs/results.md)")
  p.add_argument("--store-policy", default="score", help="B'MOJO's eidetic store: score (default) or fifo")
  p.add_argument("--selection", default=Selection.INNOVATION.value, choices=[s.value for s in Selection],
                 help="B'MOJO's selection score (docs/mqar.md, 'Selection variants'); default the paper's innovation")
  p.add_argument("--selections", help="comma-separated selection scores: one B'MOJO population each (the other "
                                      "families train once); default --selection's")
  p.add_argument("--no-equal-memory", dest="equal_memory", action="store_false",
                 help="skip the Hybrid with window w + M_f + M_e")
  p.add_argument("--epochs", type=int, help="default 8 (Zoology: 64)")
  p.add_argument("--target", type=float, default=0.99,
                 help="per-run early stop at this test accuracy (with --patience: validation accuracy)")
  p.add_argument("--patience", type=int, default=0,
                 help="stop a run once this many evaluations in a row (two an epoch) leave its validation accuracy "
                      "no better than its best + --min-delta, and report the test figures of its best validation "
                      "evaluation (0: off, the test split decides as before); --epochs is then the cap")
  p.add_argument("--min-delta", type=float, default=0.001, help="--patience: the improvement that counts")
  p.add_argument("--num-val", type=int, default=3000,
                 help="--patience: held-out validation examples (their own seed, data.val_seed)")
  p.add_argument("--steps-per-dispatch", type=int, default=64, help="at most; lands on every evaluation")
  p.add_argument("--set", action="append", default=[], help="config override key=value, e.g. model.d_state=16")
  p.add_argument("--budget-s", type=float, default=0.0, help="stop starting populations past this (0: none)")
  p.add_argument("--workdir", help="run directories (default <tmp>/mqar_sweep)")
  p.add_argument("--out", help="results folder (default $OUT, else benchmarks/results; --smoke: a temp folder)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--gpus", help="spread the populations over these GPUs, e.g. 0,1: one worker process each")
  p.add_argument("--worker", type=int, help=argparse.SUPPRESS)   # set by --gpus for its workers
  p.add_argument("--save-checkpoints", action="store_true",
                 help="keep each run's final state as a trainer checkpoint in its run folder (for "
                      "benchmarks/studies/mqar_selection.py --workdir, bmojo-eval)")
  p.add_argument("--smoke", action="store_true", help="tiny models and data, results in a temp folder")
  p.add_argument("--table", nargs="?", const="", metavar="JSON",
                 help="train nothing: print the best accuracies of a results file (default: this device's) as a "
                      "markdown table and redraw its figure")
  p.add_argument("--recheck", metavar="JSON",
                 help="re-run, with the strict accuracy rule (issue 31), each record of this results file with "
                      "test accuracy >= --recheck-min; writes <out>/<name>_recheck.json (resumable). Give the "
                      "--set overrides of the sweep that wrote it (records do not hold them)")
  p.add_argument("--recheck-min", type=float, default=RECHECK_MIN, help="--recheck: default 0.9")
  p.add_argument("--only", action="append", default=[], metavar="FIELD=VALUE",
                 help="--recheck: only records with this field value, e.g. --only d_model=128 (repeatable)")
  p.add_argument("--dry-run", action="store_true", help="--recheck: list the records and populations, train nothing")
  p.add_argument("--throughput", action="store_true", help="measure tokens/s instead of sweeping")
  p.add_argument("--runs", help="--throughput: population sizes; default 1,4,8,16")
  p.add_argument("--dispatches", type=int, help="--throughput: timed dispatches per size; default 5")
  p.add_argument("--baseline-steps", type=int, help="--throughput: single-run trainer steps (0: none); default 250")
  p.add_argument("--profile", help="--throughput: trace each population into this folder, GPU ms by source line")
  p.add_argument("--label", default="", help="--throughput: a name stored in the records")
  p.add_argument("--append", action="store_true", help="--throughput: add to the results file, not replace it")
  args = p.parse_args(argv)
  for name, value in (SMOKE_DEFAULTS if args.smoke else DEFAULTS).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.smoke:
    args.out = args.out or os.path.join(tempfile.gettempdir(), "mqar_sweep_smoke")
  args.workdir = args.workdir or os.path.join(tempfile.gettempdir(), "mqar_sweep_smoke" if args.smoke else "mqar_sweep",
                                              "runs")
  args.family_attn = dict(f.split(":", 1) for f in args.families.split(",") if ":" in f)
  args.families = [f.split(":", 1)[0] for f in args.families.split(",")]
  unknown = set(args.families) - set(FAMILIES)
  if unknown:
    p.error(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")
  args.d_models, args.kv_pairs, args.seeds, args.runs = (ints(args.d_models), ints(args.kv_pairs), ints(args.seeds),
                                                         ints(args.runs))
  args.lrs = floats(args.lrs)
  args.selections = [s for s in (args.selections or args.selection).split(",") if s]
  bad = sorted(set(args.selections) - {s.value for s in Selection})
  if bad:
    p.error(f"--selections: unknown {bad}; choose from {[s.value for s in Selection]}")
  if args.patience < 0 or args.min_delta < 0 or args.num_val < 1:
    p.error(f"--patience {args.patience}, --min-delta {args.min_delta} must be >= 0 and --num-val {args.num_val} >= 1")
  args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
  if args.gpus and args.throughput:
    p.error("--gpus spreads a sweep's populations; --throughput measures one device")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.profile:   # kernels attributed one by one: no CUDA graphs (set before jax's backend starts)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  if args.throughput:
    throughput(args)
  elif args.recheck:
    recheck(args)
  elif args.table is not None:
    path, sources, _ = results_paths(args)
    if args.table:
      if not os.path.exists(args.table):
        raise SystemExit(f"--table: no results file {args.table}")
      path, sources = args.table, [args.table]
    if not summarize(args, path, load_records(sources)):
      raise SystemExit(f"--table: no records of {args.dtype}, {args.epochs} epochs, patience {args.patience} in "
                       f"{sources} (see --dtype, --epochs, --patience)")
  elif args.gpus and args.worker is None:
    launch(args, list(sys.argv[1:] if argv is None else argv))
  else:
    sweep(args)
