"""A population of runs trained at once (train/population.py) against the single-run trainer.

One tiny B'MOJO population of three runs is compiled once for the module: run r must match the trainer's
own step (`train.steps.make_train_step`) with run r's learning rate and seed on the same batches, and a
diverging run must leave the others alone.
"""

import json
import os

import jax
import numpy as np
import pytest

from bmojo_jax.configs import mqar as mqar_config
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import population as pop_lib
from bmojo_jax.train import population_loop
from bmojo_jax.train import runs
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import steps
from bmojo_jax.train.data import mqar

RUNS = [pop_lib.Run(3e-3, 0), pop_lib.Run(1e-2, 1), pop_lib.Run(1e30, 2)]   # the last one diverges
STEPS, K = 6, 3


def tiny_config():
  c = mqar_config.get_config("bmojo")
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.window, m.chunk_size = 64, 32, 2, 2, 8, 4
  m.n_fading, m.n_eidetic, m.eidetic_per_chunk, m.d_state, m.compute.scan_chunk = 2, 4, 2, 4, 8
  d = c.data
  d.seq_len, d.num_kv_pairs, d.num_train, d.num_test = 16, 2, 40, 20   # 5 batches an epoch: a reshuffle
  t = c.train
  t.num_steps, t.batch_size, t.eval_batch_size, t.eval_every, t.log_every = STEPS, 8, 8, K, 2
  t.progress_bar, t.plot, t.target_accuracy = False, False, 0.0
  c.optim.warmup_steps = 2            # warmup, then cosine: the schedule's shape is part of the check
  return c


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def pop():
  """The population, and what its first two dispatches did (metrics [STEPS, runs], params after K and
  STEPS steps), on host."""
  p = pop_lib.Population(tiny_config(), RUNS, steps_per_dispatch=K)
  state = p.init_state()
  init = host(state["params"])
  state, m1 = p.dispatch(state)
  after_k = host(state["params"])
  state, m2 = p.dispatch(state)
  metrics = {k: np.concatenate([m1[k], m2[k]]) for k in m1}
  return p, {"init": init, "after_k": after_k, "final": host(state["params"]), "metrics": metrics,
             "active": np.asarray(state["active"]), "eval": p.evaluate(state["params"])}


def batch_indices(p, s):
  """The training-set indices of update s + 1 of stream 0: the epoch's order, cut into batches."""
  epoch, pos = divmod(s, p.steps_per_epoch)
  return np.asarray(p.epoch_order(epoch))[0, pos * p.batch_size:(pos + 1) * p.batch_size]


def row(tree, r):
  return jax.tree.map(lambda x: x[r], tree)


def assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.slow
@pytest.mark.parametrize("r", [0, 1])
def test_run_matches_single_run_trainer(pop, r):
  p, out = pop
  setup = setup_lib.build(pop_lib.run_config(p.config, RUNS[r]))
  state = setup.init_state()
  for x, y in zip(jax.tree.leaves(host(state["params"])), jax.tree.leaves(row(out["init"], r))):
    # The same init: the same random bits; their floats (normal draws, scaling) come from two programs (one run's
    # jit, the population's vmap), so to fp32 rounding; another seed would differ by the init scale everywhere.
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  step = steps.make_train_step(setup, 1)
  for s in range(STEPS):
    batch = mqar.generate_examples(p.mq, p.task.train_source.seed, batch_indices(p, s))
    state, m = step(state, batch)
    for name in ("loss", "accuracy", "grad_norm", "learning_rate"):
      np.testing.assert_allclose(float(m[name]), out["metrics"][name][s, r], rtol=2e-6, atol=1e-7,
                                 err_msg=f"{name} at step {s + 1}")
  assert out["metrics"]["updated"][:, r].all()
  assert_trees_close(host(state["params"]), row(out["final"], r), rtol=1e-5, atol=1e-6)
  # The trainer's evaluation (grain over MQARSource, on the host) = the population's (generated on the device).
  ev = steps.evaluate(setup, state["params"])
  assert ev["examples"] == out["eval"][r]["examples"] == 20
  np.testing.assert_allclose(ev["accuracy"], out["eval"][r]["accuracy"], atol=1e-6)
  np.testing.assert_allclose(ev["loss"], out["eval"][r]["loss"], rtol=1e-5)


@pytest.mark.slow
def test_diverging_run_is_stopped(pop):
  _, out = pop
  updated = out["metrics"]["updated"][:, 2]
  assert updated[:2].all() and not updated[2:].any()        # lr 0 then 5e29: the third loss is not finite
  assert not np.isfinite(out["metrics"]["loss"][2, 2])
  assert out["active"].tolist() == [True, True, False]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(row(out["final"], 2)))   # its last finite params


@pytest.mark.slow
def test_epoch_order(pop):
  p, _ = pop
  epoch = np.concatenate([batch_indices(p, s) for s in range(p.steps_per_epoch)])
  assert sorted(epoch.tolist()) == list(range(40))          # an epoch reads every example once
  assert not np.array_equal(batch_indices(p, 0), batch_indices(p, p.steps_per_epoch))   # reshuffled


@pytest.mark.slow
def test_train_files_and_early_stop(pop, tmp_path, monkeypatch):
  p, out = pop
  p.config.train.target_accuracy = 0.5
  p.config.train.plot = True
  real = p.evaluate

  def evaluate(params):          # run 0 reaches the target at the first evaluation
    evals = real(params)
    if not getattr(evaluate, "called", False):
      evals[0] = dict(evals[0], accuracy=1.0, loss=0.01)   # a loss at ln V would stop it as "collapsed"
      evaluate.called = True
    return evals

  monkeypatch.setattr(p, "evaluate", evaluate)
  try:   # the diverged run's test loss is not finite: results.json holds null there (strict JSON), and says so
    with pytest.warns(runs.NonFiniteResultWarning, match=r"run lr1e\+30_seed2's step 2 gives non-finite test_loss"):
      results = population_loop.train(p, str(tmp_path), progress_bar=False, save_checkpoints=True)
  finally:
    p.config.train.target_accuracy, p.config.train.plot = 0.0, False
  assert [(x["step"], x["stopped_by"], x["test_step"]) for x in results] == [
      (K, "target_accuracy", K), (STEPS, None, STEPS), (2, "non_finite_loss", 2)]
  # A stopped run is no longer updated; the others go on as without it.
  assert_trees_close(row(host(p.state["params"]), 0), row(out["after_k"], 0), rtol=0, atol=0)
  assert_trees_close(row(host(p.state["params"]), 1), row(out["final"], 1), rtol=0, atol=0)

  for r, run in enumerate(RUNS):
    d = os.path.join(tmp_path, run.name)
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "results.json", "curves.png", "checkpoints",
            "tensorboard"} <= set(os.listdir(d))
    config = runs.load_config(d)
    assert config.optim.learning_rate == run.learning_rate and config.seed == run.seed
    with open(os.path.join(d, "results.json")) as f:
      saved = json.load(f, parse_constant=lambda c: pytest.fail(f"results.json holds {c}: not strict JSON"))
    assert saved == results[r]
    assert saved.get("nonfinite") == (["test_loss", "test_perplexity"] if r == 2 else None)
    assert saved["learning_rate"] == run.learning_rate and saved["population"]["index"] == r
    assert saved["data"]["N"] == 2 and 0.0 <= saved["data"]["fraction_beyond_window"] <= 1.0
    records = metrics_lib.read_metrics(d)
    train_steps = [x["step"] for x in records if x["split"] == "train"]
    eval_steps = [x["step"] for x in records if x["split"] == "eval"]
    assert train_steps == {0: [2, 3], 1: [2, 3, 4, 6], 2: [2]}[r]
    assert eval_steps == {0: [3], 1: [3, 6], 2: [2]}[r]
    assert all(np.isfinite(x["tokens_per_s"]) for x in records if x["split"] == "train")
  # The checkpoint is the trainer's: bmojo-eval / bmojo-generate load it as a single run.
  d = os.path.join(tmp_path, RUNS[1].name)
  _, params, step = runs.load_run(d)
  assert step == STEPS
  assert_trees_close(host(params), row(out["final"], 1), rtol=0, atol=0)


def test_dispatch_lands_on_eval_steps():
  assert pop_lib.largest_divisor_at_most(195, 64) == 39
  assert pop_lib.largest_divisor_at_most(200, 64) == 50
  assert pop_lib.largest_divisor_at_most(7, 64) == 7


def test_errors():
  c = tiny_config()
  with pytest.raises(ValueError, match="positive"):
    pop_lib.Population(c, [pop_lib.Run(0.0, 0)])
  with pytest.raises(ValueError, match="same learning rate and seed"):
    pop_lib.Population(c, [pop_lib.Run(1e-3, 0), pop_lib.Run(1e-3, 0)])
  c.train.grad_accum_steps = 2
  with pytest.raises(ValueError, match="grad_accum_steps"):
    pop_lib.Population(c, [pop_lib.Run(1e-3, 0)])
