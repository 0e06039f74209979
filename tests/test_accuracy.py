"""Issue 31's accuracy rule: a token is right only when its label's logit is strictly the largest, and a run whose
test loss sits at ln V is "collapsed", never a run that reached its target accuracy."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax import losses
from tests.conftest import tiny_train_config
from tests.test_mqar_sweep import _record as _sweep_record
from bmojo_jax.train import steps
from bmojo_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 256


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(module_compilation_cache):
  return module_compilation_cache


def test_constant_logits_score_zero_and_only_a_strict_winner_is_right():
  labels = jnp.asarray([[3, 0, 7, 5]])
  ce, correct = losses.token_losses_reference(jnp.zeros((1, 4, 8)), labels)              # constant: every token tied
  assert not np.asarray(correct).any()
  np.testing.assert_allclose(ce, math.log(8), rtol=1e-6)
  logits = np.zeros((1, 4, 8), np.float32)
  logits[0, 0, 3] = 2.0                       # the label alone on top: right
  logits[0, 1, [0, 6]] = 2.0                  # the label tied with another for the top: wrong
  logits[0, 2, [1, 7]] = [3.0, 2.0]           # the label second: wrong
  logits[0, 3, 5] = 1e-6                      # the label on top by a hair: right
  _, correct = losses.token_losses_reference(jnp.asarray(logits), labels)
  assert np.asarray(correct).tolist() == [[True, False, False, True]]
  logits[0, 0, 3] = np.nan                    # a NaN label logit is never right
  assert not np.asarray(losses.token_losses_reference(jnp.asarray(logits), labels)[1])[0, 0]


def test_a_loss_at_ln_v_is_collapsed_and_never_reaches_the_target():
  ln_v = math.log(V)
  assert steps.collapsed(ln_v, V) and steps.collapsed(ln_v - 0.04, V) and steps.collapsed(700.0, V)
  assert not steps.collapsed(ln_v - 0.06, V) and not steps.collapsed(float("nan"), V)
  assert steps.target_outcome({"accuracy": 0.999, "loss": 0.01}, 0.99, V) == "target_accuracy"
  assert steps.target_outcome({"accuracy": 0.999, "loss": ln_v}, 0.99, V) == "collapsed"
  assert steps.target_outcome({"accuracy": 0.98, "loss": 0.01}, 0.99, V) is None
  assert steps.target_outcome({"accuracy": 0.999, "loss": ln_v}, 0.0, V) is None    # no target asked


def test_a_run_at_learning_rate_10_is_collapsed_not_a_success(tmp_path, capsys):
  """Issue 31's run: lr 10 once gave loss ln 256, "accuracy" 0.99875 and "stopped: target accuracy"."""
  config = tiny_train_config(num_steps=10, eval_every=5, checkpoint_every=10, target_accuracy=0.99)
  config.optim.learning_rate = 10.0
  results = trainer.train(config, str(tmp_path))
  assert results["stopped_by"] is None and results["step"] == 10
  assert results["collapsed"] is True and results["test_loss"] >= math.log(V) - steps.COLLAPSE_TOLERANCE
  assert results["test_accuracy"] < 0.05
  assert "Step 10: collapsed: test loss" in capsys.readouterr().out
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["collapsed"] is True


def test_a_collapsed_eval_at_the_target_stops_as_collapsed_and_exits_1(tmp_path, compilation_cache):
  """An eval whose accuracy reaches the target while its loss is ln V (what the tie rule gave a collapsed model)
  stops the run as "collapsed", and bmojo-train exits 1 with one line, not 0."""
  workdir = str(tmp_path / "run")
  code = ("import math, sys\n"
          "from bmojo_jax.train import steps\n"
          "steps.evaluate = lambda *a, **k: {'accuracy': 0.999, 'loss': math.log(256), 'perplexity': 256.0,"
          " 'examples': 12}\n"
          "from bmojo_jax.train import cli\n"
          "sys.argv = ['bmojo-train', *sys.argv[1:]]\n"
          "cli.train_main()\n")
  overrides = ["--config.model.d_model=16", "--config.model.n_layers=2", "--config.model.d_state=4",
               "--config.data.seq_len=32", "--config.data.num_kv_pairs=4", "--config.data.num_train=64",
               "--config.data.num_test=8", "--config.train.num_steps=6", "--config.train.eval_every=2",
               "--config.train.batch_size=4", "--config.train.eval_batch_size=8",
               "--config.train.progress_bar=false", "--config.train.plot=false"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=compilation_cache)
  r = subprocess.run([sys.executable, "-c", code, "--config", "configs/mqar.py:mamba", "--workdir", workdir,
                      *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1].startswith("bmojo-train: collapsed at step 2: test loss 5.5452")
  assert "Step 2: collapsed: test loss 5.5452" in r.stdout
  assert "accuracy 0.9990 >= target 0.99 is no success; stopping." in r.stdout
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["stopped_by"] == "collapsed" and results["collapsed"] is True and results["step"] == 2


# ------------------------------------------------------------------------------------ the sweep's records
def test_the_table_gives_the_test_loss_and_counts_a_collapsed_run_as_zero():
  from benchmarks.studies.mqar_sweep import report  # pylint: disable=g-import-not-at-top
  from benchmarks.studies.mqar_sweep.records import best_setting  # pylint: disable=g-import-not-at-top
  records = [_sweep_record(seed=0, test_accuracy=0.99, test_loss=0.02, collapsed=False),
             _sweep_record(seed=1, test_accuracy=0.97, test_loss=0.04, collapsed=False),
             _sweep_record(learning_rate=1e-2, test_accuracy=0.999, test_loss=math.log(8192), collapsed=True)]
  assert best_setting(records) == (pytest.approx(0.98), 1e-3, [0.99, 0.97])
  row = report.table(records, "bfloat16", 8, 80).splitlines()[2]
  assert row == "| transformer | 128 | 1k | 0.980 (0.001; 2 runs: 0.970–0.990; loss 0.030) |"


def test_recheck_reruns_the_records_at_90_percent_resumably(tmp_path, capsys):
  """--recheck on a fake results file of the --smoke sweep: the record at 0.95 is trained again (its key fields
  rebuilt exactly) and written with its strict accuracy, test loss, collapsed, recheck_of and stands; the one at
  0.5 is not; a second call finds it done; --only and a record of another model are refused or filtered."""
  from benchmarks.studies.mqar_sweep import cli, population, recheck  # pylint: disable=g-import-not-at-top
  from benchmarks.studies.mqar_sweep.records import record_key  # pylint: disable=g-import-not-at-top
  from bmojo_jax import count_params  # pylint: disable=g-import-not-at-top
  args = cli.parse_args(["--smoke"])
  config = population.population_config(args, "transformer", "", 16, 4)
  base, cfg = population.population_base(args, config, "transformer", "", 16, 4)
  old = [{**base, "learning_rate": 1e-2, "seed": 1, "test_accuracy": 0.95, "test_step": 8, "stopped_by": None,
          "wall_s": 12.0, "params": count_params(cfg), "device": "cpu"},
         {**base, "learning_rate": 3e-3, "seed": 0, "test_accuracy": 0.5, "wall_s": 12.0}]
  fake = tmp_path / "mqar_sweep_fake.json"
  fake.write_text(json.dumps(old))
  out = tmp_path / "out"
  argv = ["--smoke", "--recheck", str(fake), "--out", str(out), "--workdir", str(tmp_path / "runs"), "--no-progress"]
  cli.main(argv + ["--dry-run"])
  assert "1 records with test accuracy >= 0.9 in 1 populations; they took 12 s" in capsys.readouterr().out
  assert not (out / "mqar_sweep_fake_recheck.json").exists()
  cli.main(argv)
  [new] = json.loads((out / "mqar_sweep_fake_recheck.json").read_text())
  assert record_key(new) == record_key(old[0])
  assert new["steps"] > 0 and new["test_loss"] > 0 and isinstance(new["collapsed"], bool)
  assert new["recheck_of"]["test_accuracy"] == 0.95 and new["recheck_of"]["file"].endswith("mqar_sweep_fake.json")
  assert new["stands"] == (not new["collapsed"] and new["test_accuracy"] >= 0.95 - recheck.STANDS_TOLERANCE)
  text = capsys.readouterr().out
  assert "0.9500 -> strict" in text and "1 records in" in text
  cli.main(argv)                                     # resumed: nothing left to train
  assert "lr 0.01 seed 1: 0.9500 at step 8 (None), rechecked" in capsys.readouterr().out
  cli.main(argv + ["--only", "d_model=32", "--dry-run"])
  assert "0 records with test accuracy >= 0.9 and d_model=32" in capsys.readouterr().out
  fake.write_text(json.dumps([{**old[0], "seed": 2, "params": 1}]))
  with pytest.raises(SystemExit, match="has .* parameters, the record 1: give the --set overrides"):
    cli.main(argv)
