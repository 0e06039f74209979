"""Sharded training equals one device: data-, fsdp- and tensor-parallel meshes on 8 fake CPU devices.

`test_sharded_runs_match_one_device` trains the Hybrid on the reference paths; `test_pallas_paths_sharded`
trains every family on the Pallas kernels (interpret mode), which run per shard under the mesh
(`pallas_kernels.sharding`), and checks that the compiled step gathers parameters only. Each runs in one
subprocess because the device count is fixed when jax starts.
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
    from bmojo_jax.configs import mqar
    from bmojo_jax.train import setup as setup_lib
    from bmojo_jax.train import sharding, steps

    assert jax.device_count() == 8, jax.devices()

    def config(data, fsdp, tensor, **rules):
      c = mqar.get_config("hybrid")
      c.model.update(d_model=32, n_layers=2, n_heads=2, d_state=4, window=8, chunk_size=8)
      c.model.compute.scan_chunk = 32
      c.data.update(seq_len=32, num_kv_pairs=4, num_train=64, num_test=8)
      c.train.update(batch_size=8, eval_batch_size=8, num_steps=3)
      c.optim.update(warmup_steps=0, learning_rate=1e-3)
      c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
      c.mesh.logical_axis_rules.update(rules)
      return c

    source = None
    out = {}
    meshes = {"single": (1, 1, 1), "data": (8, 1, 1), "fsdp": (2, 4, 1), "tensor": (4, 1, 2),
              "fsdp_embed_replicated": (2, 4, 1, {"embed": ""})}
    for name, (*mesh, rules) in ((n, (*m, {}) if len(m) == 3 else m) for n, m in meshes.items()):
      devices = jax.devices()[:1] if name == "single" else None
      setup = setup_lib.build(config(*mesh, **rules), devices)
      src = setup.task.train_source
      batches = [{k: np.stack([src[8 * i + j][k] for j in range(8)]) for k in ("inputs", "targets")}
                 for i in range(3)]
      step = steps.make_train_step(setup, 1)
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


def run_on_8_devices(script: str, *xla_flags: str) -> dict:
  """Runs `script` in a subprocess with 8 fake CPU devices; returns the JSON it prints after "RESULT"."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                 *xla_flags]))
  r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return json.loads(r.stdout.split("RESULT", 1)[1])


@pytest.mark.slow
def test_sharded_runs_match_one_device():
  out = run_on_8_devices(SCRIPT)
  ref = out["single"]
  assert ref["losses"][-1] < ref["losses"][0]
  for name in ("data", "fsdp", "tensor", "fsdp_embed_replicated"):
    got = out[name]
    for a, b in zip(got["losses"], ref["losses"]):
      assert abs(a - b) <= 1e-5 * abs(b), (name, got["losses"], ref["losses"])
  # The meshes really shard: embed [V, D] has D on fsdp, V on tensor.
  assert out["data"]["embed_spec"] in ([], [None, None])
  assert out["fsdp"]["embed_spec"] == [None, "fsdp"]
  assert out["tensor"]["embed_spec"] == ["tensor", None]
  assert any("tensor" in s for s in out["tensor"]["specs"]) and len(out["tensor"]["specs"]) > 2
  assert out["tensor"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  # The run config's logical-axis rules decide it: with "embed" replicated the fsdp mesh splits no parameter.
  assert out["fsdp_embed_replicated"]["embed_spec"] in ([], [None, None])
  assert not any("fsdp" in s for s in out["fsdp_embed_replicated"]["specs"])
  assert any("fsdp" in s for s in out["fsdp"]["specs"])


PALLAS_SCRIPT = textwrap.dedent("""
    import json
    import re
    import time
    import jax
    import numpy as np
    from bmojo_jax.configs import mqar
    from bmojo_jax.train import setup as setup_lib
    from tests.sharded_steps import run_steps

    assert jax.device_count() == 8, jax.devices()
    MESHES = {"single": (1, 1, 1), "data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "mix": (2, 2, 2)}
    # B'MOJO on every mesh, the other families on the 2x2x2 mix (every axis at once): 13 compiled steps.
    CASES = {"bmojo": ("data", "fsdp", "tensor", "mix"), "transformer": ("mix",), "mamba": ("mix",),
             "hybrid": ("mix",), "bmojo_f": ("mix",)}

    def config(family, mesh):
      c = mqar.get_config(family)
      # One block, the Pallas kernels (interpret mode on CPU); 8 heads and E = 64 split 8 ways on "tensor".
      c.model.update(d_model=32, n_layers=2, n_heads=8, d_state=4, chunk_size=8, n_fading=2, n_eidetic=4,
                     eidetic_per_chunk=2, window=None if family == "transformer" else 8)
      c.model.compute.update(scan_impl="pallas", attn_impl="pallas")
      c.data.update(seq_len=32, num_kv_pairs=4, num_train=16, num_test=8)
      c.train.update(batch_size=8, eval_batch_size=8, num_steps=2)
      c.optim.update(warmup_steps=0, grad_clip_norm=0.0)   # Adam's mu after update 1 = (1 - b1) x gradient
      c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
      return c

    def allowed_gathers(setup):
      # Parameters (FSDP, and the vocab-parallel embedding): a parameter's shape, whole or split on "tensor".
      shapes = set()
      for x, sh in zip(jax.tree.leaves(setup.abstract_state["params"]),
                       jax.tree.leaves(setup.state_shardings["params"])):
        shapes.add(tuple(x.shape))
        shapes.add(tuple(n // setup.mesh.shape["tensor"] if axes and "tensor" in np.atleast_1d(axes) else n
                         for n, axes in zip(x.shape, tuple(sh.spec) + (None,) * x.ndim)))
      return shapes

    task, out, host_state = None, {}, {}
    for family, meshes in CASES.items():
      for name in ("single",) + meshes:
        t0 = time.time()
        mesh = MESHES[name]
        setup = setup_lib.build(config(family, mesh), jax.devices()[:int(np.prod(mesh))], task)
        task = setup.task
        if name == "single":
          host_state[family] = jax.device_get(setup.init_state())
        compiled, state, losses, mu = run_steps(setup, host_state[family], 2)
        hlo = compiled.as_text()
        gathers = [tuple(int(n) for n in dims.split(",") if n)
                   for dims in re.findall(r"= \\w+\\[([\\d,]*)\\]\\S* all-gather\\(", hlo)]
        specs = sorted({str(s.spec) for s in jax.tree.leaves(setup.state_shardings["params"])})
        out[family, name] = {"losses": losses, "mu": mu, "gathers": gathers, "specs": specs,
                             "all_gathers": len(re.findall(r" all-gather(?:-start)?\\(", hlo)),
                             "activation_gathers": sorted(set(gathers) - allowed_gathers(setup)),
                             "s": round(time.time() - t0, 1)}

    result = {}
    for (family, name), r in out.items():
      ref = out[family, "single"]
      grad_err = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                     for a, b in zip(jax.tree.leaves(r["mu"]), jax.tree.leaves(ref["mu"])))
      result[f"{family}/{name}"] = dict({k: v for k, v in r.items() if k != "mu"}, grad_err=grad_err,
                                        ref_losses=ref["losses"])
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.slow
def test_pallas_paths_sharded():
  """Every family on the Pallas kernels, sharded (data, fsdp, tensor, 2x2x2) = one device: losses of two steps
  and the gradient of the first (fp32); the compiled step all-gathers parameters only, no activation (the
  kernels' inputs stay split by rows and heads)."""
  # XLA's LLVM optimizations off: the 13 steps compile in ~40% less time.
  out = run_on_8_devices(PALLAS_SCRIPT, "--xla_backend_optimization_level=0")
  assert len(out) == 13, sorted(out)
  for case, r in out.items():
    if case.endswith("/single"):
      assert r["all_gathers"] == 0 and all(0 < x < 10 for x in r["losses"]), (case, r)
      continue
    for a, b in zip(r["losses"], r["ref_losses"]):
      assert abs(a - b) <= 1e-6 * abs(b), (case, r["losses"], r["ref_losses"])
    assert r["grad_err"] <= 1e-5, (case, r["grad_err"])
    assert r["activation_gathers"] == [], (case, r["activation_gathers"])
    assert r["all_gathers"] == len(r["gathers"]), (case, "an all-gather the pattern did not parse")
  # The meshes really split: parameters along "embed" under fsdp, heads / inner / vocab under tensor; under data
  # nothing is gathered.
  assert out["bmojo/data"]["all_gathers"] == 0
  assert out["bmojo/fsdp"]["gathers"] and any("fsdp" in s for s in out["bmojo/fsdp"]["specs"])
  assert any("tensor" in s for s in out["bmojo/tensor"]["specs"])
  for family in ("transformer", "mamba", "hybrid", "bmojo_f", "bmojo"):
    assert out[f"{family}/mix"]["gathers"], family


def test_logical_axis_rules_come_from_the_run_config():
  """mesh.logical_axis_rules holds today's rules by default; an override changes where a logical axis goes, for
  the parameters (`param_shardings`' specs) and inside the steps (`in_mesh` enters the rules as a context, which
  the activation constraints and the kernels' shard_map read); a bad rule is refused naming it."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import AbstractMesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from bmojo_jax.configs import mqar  # pylint: disable=g-import-not-at-top
  from bmojo_jax.pallas_kernels import sharding as kernel_sharding  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import sharding  # pylint: disable=g-import-not-at-top
  c = mqar.get_config("bmojo")
  assert sharding.axis_rules_of(c.mesh) == sharding.LOGICAL_RULES
  mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  spec = lambda: kernel_sharding.logical_to_mesh(("vocab", "embed"), (64, 32), jax.sharding.get_abstract_mesh())
  assert sharding.in_mesh(spec, mesh, sharding.axis_rules_of(c.mesh))() == P("tensor", "fsdp")
  c.mesh.logical_axis_rules.embed = ""
  c.mesh.logical_axis_rules.vocab = "tensor,data"
  rules = sharding.axis_rules_of(c.mesh)
  assert rules["embed"] is None and rules["vocab"] == ("tensor", "data")
  assert sharding.in_mesh(spec, mesh, rules)() == P(("tensor", "data"), None)
  assert kernel_sharding.current_rules() is sharding.LOGICAL_RULES      # the context ends with the call
  c.mesh.logical_axis_rules.heads = "model"
  with pytest.raises(ValueError, match=r"mesh.logical_axis_rules.heads='model': give distinct mesh axes"):
    sharding.axis_rules_of(c.mesh)
  del c.mesh.logical_axis_rules["heads"]
  with pytest.raises(ValueError, match=r"missing logical axes \['heads'\]"):
    sharding.axis_rules_of(c.mesh)
