"""Two processes on one machine train one run through `jax.distributed` (CPU, gloo collectives), save, resume.

Each process has 2 fake CPU devices; the 4 devices form a (data 2, fsdp 2) mesh, so every step's collectives
cross the processes and each process feeds its own half of the batch. Both write to one workdir (process 0
holds its lock). The first launch trains 4 steps with checkpoints at 2 and 4; with checkpoint 4 removed, a
second launch resumes from step 2 and must repeat steps 3 and 4 exactly.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import cache_env
from bmojo_jax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json
    import sys
    import jax
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # cross-process collectives on CPU
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from bmojo_jax.configs import mqar
    from bmojo_jax.train import trainer

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2), jax.devices()
    c = mqar.get_config("mamba")
    c.model.update(d_model=16, n_layers=2, d_state=4)
    c.model.compute.scan_chunk = 32
    c.data.update(seq_len=32, num_kv_pairs=4, num_train=64, num_test=8)
    c.train.update(num_steps=4, batch_size=8, eval_batch_size=8, log_every=1, eval_every=0, checkpoint_every=2,
                   keep_checkpoints=5, progress_bar=False, plot=False)
    c.mesh.update(data=2, fsdp=2, tensor=1)
    print("RESULT" + json.dumps(trainer.train(c, workdir)), flush=True)
""")


def free_port() -> int:
  try:
    import portpicker  # pylint: disable=g-import-not-at-top
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      return s.getsockname()[1]


def launch(workdir: str, cache: str) -> list[str]:
  """Runs SCRIPT as processes 0 and 1 of one job; returns their outputs (fails the test if either fails). Both
  launches share the persistent compilation cache `cache` (every program): the second launch's process 0 reads
  the programs the first compiled (jax writes the cache from process 0 only, so process 1 compiles again)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
             **cache_env(cache))
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), port, workdir], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:   # one process failing leaves the other waiting for it at a collective
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
  return outputs


def result(output: str) -> dict:
  return json.loads(output.split("RESULT", 1)[1].splitlines()[0])


def losses(workdir: str, skip: int = 0) -> dict[int, float]:
  """{step: train loss} of the records of metrics.jsonl after its first `skip` lines."""
  with open(os.path.join(workdir, metrics_lib.METRICS_FILE), encoding="utf-8") as f:
    records = [json.loads(line) for line in f.read().splitlines()[skip:]]
  return dict(zip(*metrics_lib.series(records, "train", "loss")))


@pytest.mark.slow
def test_two_processes_train_save_and_resume(tmp_path):
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "jax_cache")
  first = launch(workdir, cache)
  results = [result(out) for out in first]
  assert [r["step"] for r in results] == [4, 4] and results[0]["device"].startswith("4 x ")
  assert results[0]["test_loss"] == results[1]["test_loss"]       # one evaluation over both processes' rows
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["step"] == 4                               # written once, by process 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  expected = losses(workdir)
  assert sorted(expected) == [1, 2, 3, 4]
  with open(os.path.join(workdir, metrics_lib.METRICS_FILE), encoding="utf-8") as f:
    first_lines = len(f.read().splitlines())

  # As if the run had died before its last save: the second launch resumes from step 2 on both processes.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  os.remove(os.path.join(workdir, "results.json"))
  second = launch(workdir, cache)
  assert "resuming from step 2" in second[0], second[0][-2000:]
  assert [result(out)["step"] for out in second] == [4, 4]
  got = losses(workdir, skip=first_lines)                          # the second launch's records
  assert sorted(got) == [3, 4], got
  for step in (3, 4):
    assert got[step] == expected[step], (step, got, expected)     # bit-exact: same program, same devices
  assert result(second[0])["test_loss"] == results[0]["test_loss"]
