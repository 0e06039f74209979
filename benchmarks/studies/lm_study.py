"""Language models on real text (issue #16): train the five families on the prepared corpus, then evaluate
perplexity against context length and the RULER NIAH tasks (`train/lm_eval.py`, `train/niah.py`, docs/lm.md).

    python3 -m bmojo_jax.train.data.corpus prepare --out data/corpus  # once, on the CPU machine (apt packages)
    python3 -m benchmarks.studies.lm_study --budget-s 540                      # GPU: -> $OUT/lm_<device>.json + plots
    python3 -m benchmarks.studies.lm_study --families bmojo,hybrid --tokens 20e6
    python3 -m benchmarks.studies.lm_study --smoke                             # tiny models, CPU, a few minutes
    python3 -m benchmarks.studies.lm_study --name lm_recall --set data.recall_fraction=0.5   # trained on a recall mix

Per family: `configs/lm.py:<family>` (`,cpu` off the GPU, `,smoke` with --smoke) trained by
`train.trainer.train` in `<runs>/<family>` on data.kind=corpus, then `lm_eval.evaluate_lm_run` (perplexity at
1, 2, 4, 8, 16 x T; NIAH at 1, 2, 4 x T); B'MOJO is evaluated a second time with its store grown at inference
(n_eidetic x --grow-store, variant "n_eidetic=<M_e>"). Records (`lm_eval`'s, plus the training figures under
"train" and the --set overrides under "overrides") go to `<out>/<name>_<device>.json` (name: --name, default
lm; out: --out, else $OUT, else benchmarks/results) after each family, with the figures `<name>_ppl_<device>.png`
and `<name>_niah_<device>.png`.

Resumable: a family with a record of the same --set overrides in that file (or in
benchmarks/results/<name>_<device>.json) is skipped; a workdir that holds a finished run is evaluated without
training; one that holds checkpoints resumes. A study with other settings takes its own --name (and --runs).
`--budget-s` bounds the whole call: training is stopped (checkpoint saved, as on SIGTERM) early enough to leave
`--eval-reserve-s` for its evaluation, and no family starts once less than that is left; rerun to continue.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import jax

from benchmarks.common import RESULTS, apply_overrides, device_tag, ints, write_results
from bmojo_jax.configs import lm as lm_config
from bmojo_jax.train import lm_eval
from bmojo_jax.train import trainer
from bmojo_jax.train.data import corpus as corpus_lib

FAMILIES = ("transformer", "mamba", "hybrid", "bmojo_f", "bmojo")


def family_config(args, family: str):
  """configs/lm.py:<family>[,<size>] on the corpus, with --tokens and --set applied."""
  config = lm_config.get_config(f"{family},{args.size}" if args.size else family)
  config.data.kind, config.data.corpus_dir = "corpus", args.corpus
  apply_overrides(config, args.set)
  if args.tokens:
    per_step = int(config.train.batch_size) * int(config.data.seq_len)
    config.train.num_steps = max(1, int(float(args.tokens)) // per_step)
  if args.no_progress:
    config.train.progress_bar = False
  return config


def _stop_after(seconds: float) -> tuple[trainer.StopRequest, threading.Timer | None]:
  """A StopRequest that fires (as SIGTERM would) after `seconds` (inf: never): the trainer saves and returns."""
  stop = trainer.StopRequest()
  if seconds == float("inf"):
    return stop, None
  timer = threading.Timer(max(seconds, 0.0), stop, args=(signal.SIGTERM,))
  timer.daemon = True
  timer.start()
  return stop, timer


def ensure_corpus(args) -> None:
  """--smoke without a prepared corpus: the stdlib stand-in, prepared into the runs folder."""
  if os.path.exists(os.path.join(args.corpus, corpus_lib.MANIFEST)):
    return
  if not args.smoke:
    corpus_lib.load_manifest(args.corpus)     # raises, naming the packages and the prepare command
  args.corpus = os.path.join(args.runs, "corpus_stdlib")
  manifest = corpus_lib.prepare(args.corpus, ("stdlib",), eval_fraction=0.2)
  print(f"no prepared corpus: smoke run on the stdlib stand-in, {corpus_lib.summary(manifest)}")


def previous_records(paths: list[str]) -> list[dict]:
  records = []
  for path in paths:
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        records += [r for r in json.load(f) if r not in records]
  return records


def study(args) -> str:
  start = time.time()
  if args.smoke and args.fresh:
    shutil.rmtree(args.runs, ignore_errors=True)
  ensure_corpus(args)
  out_dir = args.out or os.environ.get("OUT") or RESULTS
  tag = device_tag()
  path = os.path.join(out_dir, f"{args.name}_{tag}.json")
  records = previous_records([path, os.path.join(RESULTS, f"{args.name}_{tag}.json")]
                             if not args.smoke else [path])
  manifest = corpus_lib.load_manifest(args.corpus)
  print(f"corpus {args.corpus}: {corpus_lib.summary(manifest)}")

  def left() -> float:
    return args.budget_s - (time.time() - start) if args.budget_s else float("inf")

  for family in args.families:
    variants = [{}]
    config = family_config(args, family)
    if family == "bmojo" and args.grow_store > 1:
      variants.append({"n_eidetic": int(config.model.n_eidetic) * args.grow_store})
    todo = [v for v in variants if not recorded(records, family, _variant(v), args.set)]
    if not todo:
      print(f"{family}: recorded, skipped")
      continue
    if left() < args.eval_reserve_s:
      print(f"{family}: not started, {left():.0f} s left of --budget-s {args.budget_s}; rerun to continue")
      break
    workdir = os.path.join(args.runs, family)
    stop, timer = _stop_after(left() - args.eval_reserve_s)
    try:
      result = trainer.train(config, workdir, stop=stop)
    finally:
      if timer is not None:
        timer.cancel()
    if result.get("stopped_by") in ("SIGTERM", "SIGINT"):   # the budget's timer, or a signal
      print(f"{family}: stopped at step {result['step']} of {config.train.num_steps} ({result['stopped_by']}; "
            f"checkpoint saved in {workdir}); rerun to continue")
      break
    train_figures = {k: result.get(k) for k in ("step", "wall_s", "tokens_per_s", "test_loss", "test_perplexity",
                                                "test_accuracy", "device", "platform")}
    for overrides in todo:
      record = lm_eval.evaluate_lm_run(
          workdir, factors=args.lengths, niah=args.niah_samples > 0, niah_factors=args.niah_lengths,
          niah_samples=args.niah_samples, gen_tokens=args.gen_tokens, max_windows=args.windows or None,
          overrides=overrides, out=os.path.join(workdir, f"lm_eval{_variant(overrides, '_')}.json"))
      record["train"] = train_figures
      record["corpus"] = {"dir": args.corpus, "sources": manifest["sources"], **manifest["totals"]}
      record["overrides"] = list(args.set)
      records.append(record)
      print(f"{family}{' ' + _variant(overrides) if overrides else ''}: ppl "
            + ", ".join(f"{c}: {p:.3f}" for c, p in record.get("eval", {}).items())
            + (f"; NIAH mean {_niah_mean(record):.1f}" if record.get("niah") else ""))
    write_results(records, args.name, out_dir)
    try:
      lm_eval.plot_records(records, os.path.join(out_dir, f"{args.name}_ppl_{tag}.png"),
                           os.path.join(out_dir, f"{args.name}_niah_{tag}.png"))
    except ImportError as e:
      print(f"no figures: {e}")
  print(f"{len(records)} records in {path} ({time.time() - start:.0f} s)")
  return path


def recorded(records: list[dict], family: str, variant: str, overrides: list[str]) -> bool:
  """Whether `records` hold this family and variant trained with these --set overrides (a record without
  "overrides" was made without any)."""
  return any(r["family"] == family and r.get("variant", "") == variant and r.get("overrides", []) == list(overrides)
             for r in records)


def _variant(overrides: dict, prefix: str = "") -> str:
  return (prefix + ",".join(f"{k}={v}" for k, v in overrides.items())) if overrides else ""


def _niah_mean(record: dict) -> float:
  scores = [s for task in record["niah"].values() for s in task.values() if s is not None]
  return sum(scores) / max(len(scores), 1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of " + ", ".join(FAMILIES))
  p.add_argument("--size", help="configs/lm.py size: '' (GPU), cpu or smoke; default '' on a GPU, else cpu")
  p.add_argument("--tokens", help="training tokens per family (default: the preset's, 39.3M on the GPU)")
  p.add_argument("--set", action="append", default=[], help="config override section.field=value")
  p.add_argument("--name", default="lm", help="records <name>_<device>.json and its figures (default lm)")
  p.add_argument("--corpus", default="data/corpus", help="prepared corpus folder (default data/corpus)")
  p.add_argument("--lengths", default="1,2,4,8,16", help="perplexity contexts, multiples of T")
  p.add_argument("--niah-lengths", default="1,2,4", help="NIAH lengths, multiples of T")
  p.add_argument("--niah-samples", type=int, help="per task and length (0: no NIAH); default 50 (smoke 2)")
  p.add_argument("--gen-tokens", type=int, help="NIAH tokens generated; default 128 (smoke 32)")
  p.add_argument("--windows", type=int, help="perplexity windows of the longest context; default 64 (smoke 4)")
  p.add_argument("--grow-store", type=int, default=4, help="B'MOJO also evaluated with n_eidetic x this (1: no)")
  p.add_argument("--budget-s", type=float, default=0.0, help="bound on this call's seconds (0: none)")
  p.add_argument("--eval-reserve-s", type=float, help="seconds kept for a family's evaluation; default 90 "
                 "(smoke 0)")
  p.add_argument("--runs", help="workdirs (default runs/lm_study; --smoke: a temp folder, emptied first)")
  p.add_argument("--out", help="results folder (default $OUT, else benchmarks/results; --smoke: <runs>/results)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--smoke", action="store_true", help="tiny models (configs/lm.py ,smoke), temp folder")
  args = p.parse_args(argv)
  smoke = args.smoke
  args.size = "smoke" if smoke else (args.size if args.size is not None else
                                     ("" if jax.default_backend() == "gpu" else "cpu"))
  defaults = dict(niah_samples=2 if smoke else 50, gen_tokens=32 if smoke else 128, windows=4 if smoke else 64,
                  eval_reserve_s=0.0 if smoke else 90.0)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.fresh = smoke and not args.runs
  args.runs = args.runs or (os.path.join(tempfile.gettempdir(), "lm_study_smoke") if smoke else "runs/lm_study")
  if smoke:
    args.out = args.out or os.path.join(args.runs, "results")
  args.families = [f for f in args.families.split(",") if f]
  unknown = set(args.families) - set(FAMILIES)
  if unknown:
    p.error(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")
  args.lengths, args.niah_lengths = ints(args.lengths), ints(args.niah_lengths)
  return args


def main(argv=None):
  args = parse_args(argv)
  try:
    study(args)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"lm_study: {type(e).__name__}: {e}")


if __name__ == "__main__":
  main()
