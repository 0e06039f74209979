"""The trainer end to end on a device mesh: a run saves its checkpoints on the mesh, a second run restores one.

    python -m benchmarks.checks.mesh_train_run --mesh fsdp=2                 # 2 GPUs, parameters split (FSDP)
    python -m benchmarks.checks.mesh_train_run --mesh data=2 --steps 40      # 2 GPUs, data parallel

`train.trainer.train` trains MQAR (`configs/mqar.py`, the Pallas kernels, scanned blocks) for --steps steps
with checkpoints at the half and at the end. The end checkpoint and results.json are then removed, as if the run
had died after its last step, and the same call resumes from the half: it restores the sharded state and the
data iterator and repeats the second half. The record (`<--name>_<device>.json` in $OUT, else
benchmarks/results): the first run's tokens/s and wall time, the step the second run resumed from, the largest
relative difference of its losses from the first run's over the repeated steps (0 when the restore is exact and
the steps deterministic), test accuracy of both runs, devices and mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from benchmarks.common import parse_mesh, write_results
from bmojo_jax.configs import mqar
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import sharding as shard_lib
from bmojo_jax.train import trainer


def run_config(family: str, mesh: dict[str, int], steps: int, d_model: int, batch: int):
  c = mqar.get_config(family)
  # Scanned blocks: the Pallas kernels compile once, not once per block.
  c.model.d_model = d_model
  c.model.compute.update(scan_impl="pallas", attn_impl="pallas", scan_layers=True)
  c.train.update(num_steps=steps, batch_size=batch, eval_batch_size=batch, checkpoint_every=steps // 2,
                 log_every=1, eval_every=0, progress_bar=False, plot=False, target_accuracy=0.0)
  c.mesh.update({axis: int(mesh.get(axis, 1)) for axis in shard_lib.MESH_AXES})
  return c


def train_losses(workdir: str, skip: int = 0) -> dict[int, float]:
  """{step: train loss} of the records of metrics.jsonl after its first `skip` lines."""
  with open(os.path.join(workdir, metrics_lib.METRICS_FILE), encoding="utf-8") as f:
    records = [json.loads(line) for line in f.read().splitlines()[skip:]]
  return dict(zip(*metrics_lib.series(records, "train", "loss")))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mesh", default="fsdp=2", help="axis=size[:axis=size] over the first devices, or 1")
  ap.add_argument("--family", default="bmojo")
  ap.add_argument("--steps", type=int, default=40, help="steps of the first run (checkpoints at half and end)")
  ap.add_argument("--d-model", type=int, default=128)
  ap.add_argument("--batch", type=int, default=64, help="global batch")
  ap.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
  ap.add_argument("--name", default="mesh_train_run", help="result file stem (<name>_<device>.json)")
  ap.add_argument("--tag", default="", help="free text stored in the record (which code version)")
  args = ap.parse_args()
  if args.steps < 2 or args.steps % 2:
    raise SystemExit(f"--steps={args.steps} must be even and >= 2 (checkpoints at the half and at the end)")
  # The resumed run compiles the same programs: a persistent cache spares it the (Pallas) compile time.
  jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "bmojo_mesh_run_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  mesh = parse_mesh(args.mesh)
  devices = jax.devices()[:int(np.prod(list(mesh.values()) or [1]))]
  config = run_config(args.family, mesh, args.steps, args.d_model, args.batch)
  workdir = args.workdir or tempfile.mkdtemp(prefix="mesh_train_run_")
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    raise SystemExit(f"{workdir} already holds a run; use a fresh --workdir")

  first = trainer.train(config, workdir, devices=devices)
  expected = train_losses(workdir)
  with open(os.path.join(workdir, metrics_lib.METRICS_FILE), encoding="utf-8") as f:
    first_lines = len(f.read().splitlines())
  checkpoints = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(args.steps)))
  os.remove(os.path.join(workdir, "results.json"))
  second = trainer.train(config, workdir, devices=devices)
  repeated = train_losses(workdir, skip=first_lines)
  rec = dict(op="trainer_run", family=args.family, devices=len(devices), mesh=dict(zip(shard_lib.MESH_AXES,
             shard_lib.mesh_shape(config.mesh, len(devices)))), steps=args.steps, batch=args.batch,
             T=config.data.seq_len, d_model=args.d_model, checkpoints=checkpoints, resumed_from=min(repeated) - 1,
             repeated_steps=len(repeated),
             max_rel_loss_diff=max(abs(v - expected[s]) / abs(expected[s]) for s, v in repeated.items()),
             tokens_per_s=first["tokens_per_s"], wall_s=first["wall_s"], resumed_wall_s=second["wall_s"],
             test_accuracy=first["test_accuracy"], resumed_test_accuracy=second["test_accuracy"],
             final_loss=expected[args.steps], tag=args.tag)
  path = write_results([rec], args.name)
  print(json.dumps(rec))
  print(f"-> {path}")


if __name__ == "__main__":
  main()
