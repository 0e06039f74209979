"""Scaling on paper, from measurements: collective bytes read from the compiled HLO on fake CPU devices, step
times measured on one GPU, link bandwidths from public spec sheets -> predicted step time and efficiency on
H100 x 8 / 64 and TPU v5p-64 / 256 (docs/scaling.md).

    # 1. compile the train step on N fake CPU devices (no arrays allocated) and record its collectives and its
    #    memory per device -> benchmarks/results/scaling_hlo_cpu.json
    python -m benchmarks.studies.scaling_model measure --cases bmojo:1.4b:data=8,bmojo:1.4b:fsdp=8
    # 2. the projection (reads the records above and benchmarks/results/train_step_h200.json)
    python -m benchmarks.studies.scaling_model predict
    # the train-step bench with ZeRO-1 on (mesh.shard_optimizer=True), same arguments as train_step_bench
    python -m benchmarks.studies.scaling_model bench-zero1 --families bmojo --sizes 370m --seqs 2048 --meshes 1,data=2

`measure` re-runs itself in a subprocess per device count (XLA_FLAGS=--xla_force_host_platform_device_count=N)
and reads the collectives with `train.hlo.collectives`; `predict` is scaling_projection.py.
The compiled step is the trainer's (`train.steps.make_train_step`) for the paper preset in bf16, scanned blocks,
remat dots_kernels, the Pallas kernels in interpret mode: the same program the GPU runs up to the backend.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import REPO, RESULTS
from benchmarks.studies.scaling_projection import EXTRA_SIZES, HLO_RECORDS, predict, wire_bytes


def parse_case(case: str) -> tuple[str, str, dict[str, int]]:
  """"bmojo:1.4b:data=8" or "transformer:7b:data=8/fsdp=8" -> (family, size, {data, fsdp, tensor})."""
  family, size, mesh = case.split(":")
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  if mesh != "1":
    for part in mesh.split("/"):
      axis, _, n = part.partition("=")
      sizes[axis] = int(n)
  return family, size, sizes


def compile_case(family: str, size: str, mesh: dict[str, int], seq_len: int, batch_per_device: int,
                 zero: bool) -> dict:
  """Compiles the trainer's step for `family`-`size` on the mesh (this process's fake devices); returns its
  collectives and memory analysis per device."""
  import jax
  from benchmarks.step_configs import step_config, synthetic_task
  from bmojo_jax import count_params
  from bmojo_jax.presets import PAPER_SIZES
  from bmojo_jax.train import setup as setup_lib
  from bmojo_jax.train import sharding as shard_lib
  from bmojo_jax.train import steps as steps_lib
  from bmojo_jax.train.hlo import collectives

  n_dev = int(np.prod(list(mesh.values())))
  extra = dict(EXTRA_SIZES.get(size, {}))
  preset = "1.4b" if extra else size
  assert preset in PAPER_SIZES, size
  attn = "pallas" if family != "transformer" else "reference"
  batch = batch_per_device * mesh["data"] * mesh["fsdp"]
  config = step_config(family, preset, seq_len, batch, attn, "pallas", mesh,
                       dict(remat="dots_kernels", scan_layers=True), **extra)
  config.mesh.shard_optimizer = zero
  cfg = setup_lib.model_config(config)
  setup = setup_lib.build(config, jax.devices()[:n_dev], synthetic_task(seq_len, cfg.vocab_size))
  batch_sh = shard_lib.batch_sharding(setup.mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct((batch, seq_len), np.int32, sharding=batch_sh)
                    for k in ("inputs", "targets")}
  t0 = time.time()
  compiled = steps_lib.make_train_step(setup, 1).lower(setup.abstract_state, abstract_batch).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()

  def per_device(tree) -> int:
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))

  colls = collectives(compiled.as_text(), mesh)
  for c in colls:
    c.pop("group")
  return dict(family=family, size=size, mesh=mesh, devices=n_dev, shard_optimizer=zero, T=seq_len,
              batch=batch, params=count_params(cfg), n_blocks=cfg.n_blocks, compile_s=round(compile_s, 1),
              argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
              temp_bytes=int(mem.temp_size_in_bytes),
              params_bytes_per_device=per_device(setup.abstract_state["params"]),
              opt_bytes_per_device=per_device(setup.abstract_state["opt_state"]), collectives=colls)


def measure(cases: list[str], seq_len: int, batch_per_device: int, zero: bool, out: str) -> None:
  """Each case in a subprocess with as many fake CPU devices as its mesh; appends the records to `out`."""
  records = json.load(open(out)) if os.path.exists(out) else []
  for case in cases:
    family, size, mesh = parse_case(case)
    n = int(np.prod(list(mesh.values())))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}")
    code = (f"import json; from benchmarks.studies.scaling_model import compile_case; print('RESULT' + json.dumps("
            f"compile_case({family!r}, {size!r}, {mesh!r}, {seq_len}, {batch_per_device}, {zero})))")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
      print(f"{case}: failed\n{r.stderr[-3000:]}", flush=True)
      continue
    rec = json.loads(r.stdout.split("RESULT", 1)[1])
    rec["wall_s"] = round(time.time() - t0, 1)
    key = lambda x: (x["family"], x["size"], json.dumps(x["mesh"], sort_keys=True), x["shard_optimizer"], x["T"])
    records = [x for x in records if key(x) != key(rec)] + [rec]
    with open(out, "w") as f:
      json.dump(records, f, indent=1)
    wire = sum(wire_bytes(c["kind"], c["bytes"], c["n"]) * c["runs"] for c in rec["collectives"])
    print(f"{case} zero={zero}: {len(rec['collectives'])} collectives, {wire / 2**30:.3f} GiB sent per device, "
          f"opt {rec['opt_bytes_per_device'] / 2**30:.3f} GiB, args {rec['argument_bytes'] / 2**30:.3f} GiB, "
          f"temp {rec['temp_bytes'] / 2**30:.3f} GiB, compile {rec['compile_s']} s", flush=True)


def bench_with_zero1(argv: list[str]) -> None:
  """`benchmarks.speed.train_step_bench` with mesh.shard_optimizer=True in every config it builds (the bench has no
  flag for it): `python -m benchmarks.studies.scaling_model bench-zero1 <train_step_bench arguments>`."""
  from benchmarks.speed import train_step_bench
  from bmojo_jax.configs import common
  base = common.base_config

  def with_zero1():
    c = base()
    c.mesh.shard_optimizer = True
    return c

  common.base_config = with_zero1
  sys.argv = ["train_step_bench (ZeRO-1)"] + argv
  train_step_bench.main()


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["bench-zero1"]:
    return bench_with_zero1(argv[1:])
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  m = sub.add_parser("measure")
  m.add_argument("--cases", required=True, help="family:size:mesh list, mesh like data=8/fsdp=8 or 1")
  m.add_argument("--seq", type=int, default=2048)
  m.add_argument("--batch-per-device", type=int, default=1)
  m.add_argument("--no-zero", action="store_true", help="mesh.shard_optimizer=False")
  m.add_argument("--out", default=HLO_RECORDS)
  p = sub.add_parser("predict")
  p.add_argument("--out", default=os.path.join(RESULTS, "scaling_model.json"))
  args = ap.parse_args(argv)
  if args.cmd == "measure":
    measure(args.cases.split(","), args.seq, args.batch_per_device, not args.no_zero, args.out)
  else:
    predict(args.out)


if __name__ == "__main__":
  main()
