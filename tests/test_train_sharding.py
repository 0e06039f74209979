"""Sharded training equals one device: data-, fsdp- and tensor-parallel meshes on 8 fake CPU devices.

Runs in a subprocess because the device count is fixed when jax starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from configs import mqar
    from train import sharding, trainer

    assert jax.device_count() == 8, jax.devices()

    def config(data, fsdp, tensor):
      c = mqar.get_config("hybrid")
      c.model.update(d_model=32, n_layers=2, n_heads=2, d_state=4, window=8, chunk_size=8, scan_chunk=32)
      c.data.update(seq_len=32, num_kv_pairs=4, num_train=64, num_test=8)
      c.train.update(batch_size=8, eval_batch_size=8, num_steps=3)
      c.optim.update(warmup_steps=0, learning_rate=1e-3)
      c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
      return c

    source = None
    out = {}
    for name, mesh in {"single": (1, 1, 1), "data": (8, 1, 1), "fsdp": (2, 4, 1), "tensor": (4, 1, 2)}.items():
      devices = jax.devices()[:1] if name == "single" else None
      setup = trainer.build(config(*mesh), devices)
      src = setup.task.train_source
      batches = [{k: np.stack([src[8 * i + j][k] for j in range(8)]) for k in ("inputs", "targets")}
                 for i in range(3)]
      step = trainer.make_train_step(setup, 1)
      state = setup.init_state()
      specs = sorted({str(s.spec) for s in jax.tree.leaves(setup.state_shardings["params"])})
      losses = []
      for b in batches:
        state, m = step(state, sharding.shard_batch(b, setup.mesh))
        losses.append(float(m["loss"]))
      out[name] = {"losses": losses, "specs": specs,
                   "embed_spec": list(state["params"]["embed"].sharding.spec),
                   "mesh": dict(setup.mesh.shape)}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_runs_match_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.split("RESULT", 1)[1])
  ref = out["single"]
  assert ref["losses"][-1] < ref["losses"][0]
  for name in ("data", "fsdp", "tensor"):
    got = out[name]
    for a, b in zip(got["losses"], ref["losses"]):
      assert abs(a - b) <= 1e-5 * abs(b), (name, got["losses"], ref["losses"])
  # The meshes really shard: embed [V, D] has D on fsdp, V on tensor.
  assert out["data"]["embed_spec"] in ([], [None, None])
  assert out["fsdp"]["embed_spec"] == [None, "fsdp"]
  assert out["tensor"]["embed_spec"] == ["tensor", None]
  assert any("tensor" in s for s in out["tensor"]["specs"]) and len(out["tensor"]["specs"]) > 2
  assert out["tensor"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
