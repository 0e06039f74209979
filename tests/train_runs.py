"""The runs of the end-to-end training tests (tests/test_faults_*.py, tests/test_train_loop.py,
tests/test_train_workdir.py): tests/conftest.py's tiny_train_config (a tiny Mamba, d_model 16, L 32) as the fault
tests run it (NUM_STEPS steps, a checkpoint every 3, asynchronous saves) and a diverging variant, the uninterrupted
reference run, what two runs must share to be the same run, and what a workdir holds."""

import hashlib
import json
import os

from tests.conftest import tiny_train_config
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12


def tiny_config(**train):
  return tiny_train_config(**{"num_steps": NUM_STEPS, "async_checkpointing": True, **train})


def diverging_config(**train):
  """Step 1 has learning rate 0 (warmup); step 2's 2.5e29 blows the parameters up to finite values whose
  forward is NaN, while update 2's own loss is finite: the divergence on a checkpoint step of issue #21."""
  c = tiny_config(num_steps=6, checkpoint_every=1, async_checkpointing=False, **train)
  c.optim.update(learning_rate=1e30, warmup_steps=4, grad_clip_norm=0.0)
  return c


def losses(workdir):
  steps, values = metrics_lib.series(metrics_lib.read_metrics(workdir), "train", "loss")
  return dict(zip(steps, values))


def snapshot(directory):
  """{path relative to `directory`: sha256 of its bytes} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def steps_of(workdir):
  return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10).all_steps()


def strict_load(path):
  def refuse(name):
    raise ValueError(f"{path} holds {name}: not strict JSON")
  with open(path, encoding="utf-8") as f:
    return json.load(f, parse_constant=refuse)


def reference_run(tmp_path_factory):
  """The uninterrupted run: (workdir, results); each module's `reference` fixture."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, trainer.train(tiny_config(), workdir)


def assert_same_run(workdir, results, reference):
  ref_dir, ref_results = reference
  assert sorted(losses(workdir)) == list(range(1, NUM_STEPS + 1))
  assert losses(workdir) == losses(ref_dir)                        # bit-exact, fp32 on CPU
  for key in ("step", "test_loss", "test_accuracy"):
    assert results[key] == ref_results[key], key
