"""The sweep's records: what makes two of them one run (KEY_FIELDS), the results files they live in (with the --gpus
workers' files), the population folder they are trained in, and how the figure and table count them."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from benchmarks.common import RESULTS, device_tag, write_json
from bmojo_jax.config import Selection

KEY_FIELDS = ("family", "variant", "d_model", "N", "L", "window", "n_fading", "n_eidetic", "eidetic_per_chunk",
              "store_policy", "selection", "dtype", "attn_impl", "learning_rate", "seed", "epochs", "patience")


def record_key(r: dict) -> tuple:
  """What makes two records one run; floats to 6 significant digits (a learning rate given on the command line
  as 2.15443469e-3 is Zoology's 10^-2.6667, recorded earlier as 0.00215443)."""
  return tuple(float(f"{r[k]:.6g}") if isinstance(r[k], float) else r[k] for k in KEY_FIELDS)


def upgrade_record(r: dict) -> dict:
  """A record written before a key field existed, with the value its run had: the paper's innovation test
  (`selection` came in with issue #15's selection variants; "" without an eidetic store, like store_policy).
  `attn_impl` is "" for Mamba, which has no attention (older records named the resolved implementation).
  `patience` 0: early stopping on a validation split came with issue #33."""
  r = {"selection": Selection.INNOVATION.value if r.get("n_eidetic") else "", "patience": 0, **r}
  return {**r, "attn_impl": ""} if r["family"] == "mamba" else r


def load_records(paths: list[str]) -> list[dict]:
  records, seen = [], set()
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        for r in map(upgrade_record, json.load(f)):
          if record_key(r) not in seen:
            seen.add(record_key(r))
            records.append(r)
  return records


def results_paths(args, tag: str | None = None) -> tuple[str, list[str], list[str]]:
  """(the results file, the files whose records count as done: the repository's, the results file and the
  worker files, and the worker files alone: what a `--gpus` run leaves until it merges them). tag: the
  device's (default: this process's)."""
  tag = "cpu_smoke" if args.smoke else tag or device_tag()
  out_dir = args.out or os.environ.get("OUT") or RESULTS
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"mqar_sweep_{tag}.json")
  workers = sorted(glob.glob(glob.escape(path[:-len(".json")]) + ".worker*.json"))
  return path, [os.path.join(RESULTS, f"mqar_sweep_{tag}.json"), path] + workers, workers


def merge_workers(args, tag: str | None) -> tuple[str, list[dict]]:
  """Moves the worker files' records into the results file; returns (its path, all records)."""
  path, sources, workers = results_paths(args, tag)
  records = load_records(sources)
  write_json(path, records)
  for f in workers:
    os.remove(f)
  return path, records


def population_folder(base: dict) -> str:
  """The folder (under --workdir) of one population's run folders, named by every key field but the learning rate
  and seed (the run folders' names): two sweeps that differ in M_e or k_e, say, never share run folders."""
  name = base["family"] + (f"_{base['variant']}" if base["variant"] else "")
  name += f"_d{base['d_model']}_N{base['N']}_L{base['L']}"
  if base["window"]:
    name += f"_w{base['window']}"
  if base["n_fading"]:
    name += f"_mf{base['n_fading']}"
  if base["n_eidetic"]:
    name += f"_me{base['n_eidetic']}_ke{base['eidetic_per_chunk']}_{base['store_policy']}_{base['selection']}"
  name += (f"_{base['attn_impl']}" if base["attn_impl"] else "") + f"_{base['dtype']}_e{base['epochs']}"
  return name + (f"_p{base['patience']}" if base.get("patience") else "")


def population_label(base: dict) -> str:
  return f"{base['family']}{'(' + base['variant'] + ')' if base['variant'] else ''} d{base['d_model']} N{base['N']}"


def matches(r: dict, only: list[str]) -> bool:
  """Whether record r has every field=value of `only` (numbers compared as numbers, e.g. d_model=128)."""
  for item in only:
    key, _, value = item.partition("=")
    have = r.get(key)
    if isinstance(have, (int, float)) and not isinstance(have, bool):
      if float(f"{float(value):.6g}") != float(f"{have:.6g}"):
        return False
    elif str(have) != value:
      return False
  return True


def lr_key(r: dict) -> float:
  """A record's learning rate to 6 significant digits: what makes two rates one (best_setting)."""
  return float(f"{r['learning_rate']:.6g}")


def accuracy(r: dict) -> float:
  """A record's test accuracy as the figure and table count it: 0 for a collapsed run (test loss at ln V,
  `train.steps.collapsed`) or one without an evaluation."""
  return 0.0 if r.get("collapsed") else r["test_accuracy"] or 0.0


def best_setting(records: list[dict]) -> tuple[float, float, list[float]]:
  """Zoology's figure-2 value of one model: the best over learning rates of the test accuracy averaged over
  seeds, as (that mean, its learning rate, its runs' accuracies, each as `accuracy` counts it). A learning rate
  counts to 6 significant digits (`lr_key`: 2.15443469e-3 given on one command line is the 0.00215443 of
  another), and runs with cuDNN and with the reference attention pool (one function; docs/results.md, the strict
  re-check)."""
  groups: dict[float, list[float]] = {}
  for r in records:
    groups.setdefault(lr_key(r), []).append(accuracy(r))
  return max(((float(np.mean(accs)), lr, accs) for lr, accs in groups.items()), key=lambda row: row[0])
