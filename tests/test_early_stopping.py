"""Early stopping on a held-out MQAR validation split (train.patience, train.min_delta; `train.steps.EarlyStopping`):
the rule on constructed sequences, the split itself, and the trainer and a population stopping at the same
evaluation and reporting the test figures of the best validation evaluation."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from bmojo_jax.configs import mqar as mqar_config
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import population as pop_lib
from bmojo_jax.train import population_loop
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import steps
from bmojo_jax.train import trainer

# Each trainer.train and Population builds fresh jitted closures of the same tiny B'MOJO: the module's persistent
# compilation cache gives the later ones the programs an earlier one compiled (the same executables, read back).
pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def observe_all(rule, accuracies):
  """Feeds validation accuracies at steps 1, 2, ... (test accuracy = 10 x the step); returns the step the rule
  stops at (None: never)."""
  for i, acc in enumerate(accuracies, 1):
    rule.observe(i, {"accuracy": acc, "loss": 1.0}, {"accuracy": 10.0 * i, "loss": 2.0})
    if rule.stop:
      return i
  return None


def test_rule_on_constructed_sequences():
  rule = steps.EarlyStopping(patience=2, min_delta=0.01)
  assert observe_all(rule, [0.5, 0.7, 0.705, 0.69, 0.9]) == 4      # 0.705 is within min_delta: no improvement
  assert (rule.best_step, rule.best_validation["accuracy"], rule.best_test["accuracy"]) == (2, 0.7, 20.0)
  assert rule.record() == {"best_step": 2, "patience": 2, "min_delta": 0.01, "val_accuracy": 0.7, "val_loss": 1.0}

  rule = steps.EarlyStopping(patience=2, min_delta=0.01)            # an improvement resets the count
  assert observe_all(rule, [0.5, 0.5, 0.6, 0.6, 0.6, 0.99]) == 5
  assert rule.best_step == 3 and rule.best_test["accuracy"] == 30.0

  rule = steps.EarlyStopping(patience=0, min_delta=0.0)             # never stops; the best is still tracked
  assert observe_all(rule, [0.3, 0.9, 0.2, 0.2, 0.2]) is None
  assert rule.best_step == 2 and rule.waited == 3

  rule = steps.EarlyStopping(patience=1, min_delta=0.0)             # equal is no improvement
  assert observe_all(rule, [0.5, 0.5]) == 2 and rule.best_step == 1

  back = steps.EarlyStopping.from_meta(json.loads(json.dumps(rule.to_meta())))   # a checkpoint's round trip
  assert back == rule


def test_rule_errors():
  with pytest.raises(ValueError, match="train.patience=-1 must be >= 0"):
    steps.EarlyStopping(patience=-1)
  with pytest.raises(ValueError, match="train.min_delta=-0.1 must be >= 0"):
    steps.EarlyStopping(patience=1, min_delta=-0.1)


def tiny_config(patience=0, num_val=0):
  c = mqar_config.get_config("bmojo")
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.window, m.chunk_size = 64, 32, 2, 2, 8, 4
  m.n_fading, m.n_eidetic, m.eidetic_per_chunk, m.d_state, m.compute.scan_chunk = 2, 4, 2, 4, 8
  d = c.data
  d.seq_len, d.num_kv_pairs, d.num_train, d.num_test, d.num_val = 16, 2, 40, 20, num_val
  t = c.train
  t.num_steps, t.batch_size, t.eval_batch_size, t.eval_every, t.log_every = 8, 8, 8, 2, 2
  t.checkpoint_every = 8
  t.progress_bar, t.plot, t.target_accuracy = False, False, 0.0
  t.patience, t.min_delta = patience, 1.0   # min_delta 1: no evaluation improves on the first, whatever it is
  c.optim.warmup_steps = 2
  return c


def test_validation_split_and_config_errors():
  task = setup_lib.build(tiny_config(num_val=12)).task
  val, test, train = task.val_source, task.eval_source, task.train_source
  assert len(val) == 12 and task.info["num_val"] == 12
  assert len({val.seed, test.seed, train.seed}) == 3                 # a stream of its own
  assert not np.array_equal(val[0]["inputs"], test[0]["inputs"])
  assert setup_lib.build(tiny_config()).task.val_source is None      # off by default
  with pytest.raises(ValueError, match="train.patience=2 stops on validation accuracy.*data.num_val"):
    steps.early_stopping(setup_lib.build(tiny_config(patience=2)))
  c = tiny_config(num_val=12)
  c.data.val_seed = c.data.test_seed
  with pytest.raises(ValueError, match="data.val_seed=1 must differ"):
    setup_lib.build(c)
  c = tiny_config(patience=1, num_val=12)
  c.train.min_delta = -1.0
  with pytest.raises(ValueError, match="train.min_delta=-1.0 must be >= 0"):
    pop_lib.Population(c, [pop_lib.Run(3e-3, 0)])


@pytest.mark.slow
def test_trainer_and_population_stop_at_the_same_evaluation(tmp_path):
  """Patience 1 with min_delta 1: the second evaluation (step 4) stops the run, which reports step 2's test
  figures; the runs of a population with the same settings do the same. (The trainer reads the training set in
  grain's order, a population in its own, so their figures differ; tests/test_population.py checks that their
  steps agree on the same batches.)"""
  config = tiny_config(patience=1, num_val=12)
  single = trainer.train(pop_lib.run_config(config, pop_lib.Run(3e-3, 0)), str(tmp_path / "single"))
  pop = pop_lib.Population(config, [pop_lib.Run(3e-3, 0), pop_lib.Run(1e-2, 1)], steps_per_dispatch=2)
  results = population_loop.train(pop, str(tmp_path / "pop"), progress_bar=False)
  workdirs = [tmp_path / "single", tmp_path / "pop" / "lr0.003_seed0", tmp_path / "pop" / "lr0.01_seed1"]
  for res, workdir in zip([single] + results, workdirs):
    assert (res["step"], res["stopped_by"], res["test_step"], res["best_step"]) == (4, "patience", 2, 2)
    assert res["patience"] == 1 and res["min_delta"] == 1.0 and res["data"]["num_val"] == 12
    records = metrics_lib.read_metrics(str(workdir))
    assert [r["step"] for r in records if r["split"] == "val"] == [2, 4]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4]
    val2, test2, test4 = ({k: v for k, v in r.items() if k not in ("step", "split")} for r in (
        next(r for r in records if r["split"] == split and r["step"] == step)
        for split, step in (("val", 2), ("eval", 2), ("eval", 4))))
    assert {k: res[f"val_{k}"] for k in val2} == val2      # the best validation evaluation's figures ...
    assert {k: res[f"test_{k}"] for k in test2} == test2   # ... and the test figures of that step, not the last
    assert test2 != test4
  # A rerun of the stopped single run finds it finished (train.patience still set) instead of training on.
  again = trainer.train(pop_lib.run_config(config, pop_lib.Run(3e-3, 0)), str(tmp_path / "single"))
  assert again["step"] == 4 and again["stopped_by"] == "patience"
  with open(os.path.join(tmp_path, "single", "results.json")) as f:
    assert json.load(f)["best_step"] == 2


@pytest.mark.slow
def test_population_validation_is_the_trainers():
  """The population's validation split (generated on the device) evaluates as the trainer's (grain, host)."""
  p = pop_lib.Population(tiny_config(num_val=12), [pop_lib.Run(3e-3, 0)])
  state = p.init_state()
  params = jax.tree.map(lambda x: x[0], state["params"])
  ev = steps.evaluate(p.setup, params, source=p.task.val_source)
  pv = p.validate(state["params"])[0]
  assert ev["examples"] == pv["examples"] == 12
  np.testing.assert_allclose(ev["accuracy"], pv["accuracy"], atol=1e-6)
  np.testing.assert_allclose(ev["loss"], pv["loss"], rtol=1e-5)
  assert ev["loss"] != p.evaluate(state["params"])[0]["loss"]        # not the test split


@pytest.mark.slow
def test_population_stops_each_run_on_its_own_sequence(tmp_path, monkeypatch):
  """Constructed validation accuracies per run (evaluations at steps 2, 4, 6, 8): run 0 improves then stalls
  (stops at step 6, best 2), run 1 keeps improving (trains to the cap, best 8); the test figures reported are those
  of the best step, and a stopped run is no longer active (its updates are masked)."""
  config = tiny_config(patience=2, num_val=12)
  config.train.min_delta = 0.01
  p = pop_lib.Population(config, [pop_lib.Run(3e-3, 0), pop_lib.Run(1e-2, 1)], steps_per_dispatch=2)
  sequences = [[0.5, 0.505, 0.4, 0.9], [0.1, 0.2, 0.3, 0.4]]
  calls = []

  def validate(params):
    i = len(calls)
    calls.append(i)
    return [{"accuracy": seq[i], "loss": 1.0 - seq[i], "perplexity": 1.0, "examples": 12} for seq in sequences]

  real_evaluate = p.evaluate
  test_accuracy = []

  def evaluate(params, source=None):
    out = real_evaluate(params, source)
    test_accuracy.append([e["accuracy"] for e in out])
    return out

  monkeypatch.setattr(p, "validate", validate)
  monkeypatch.setattr(p, "evaluate", evaluate)
  results = population_loop.train(p, str(tmp_path), progress_bar=False)
  assert [(r["step"], r["stopped_by"], r["test_step"], r["best_step"]) for r in results] == [
      (6, "patience", 2, 2), (8, None, 8, 8)]
  assert results[0]["val_accuracy"] == 0.5 and results[1]["val_accuracy"] == 0.4
  assert results[0]["test_accuracy"] == test_accuracy[0][0] and results[1]["test_accuracy"] == test_accuracy[3][1]
  assert np.asarray(p.state["active"]).tolist() == [False, True]   # run 0's updates are masked from step 6 on


@pytest.mark.slow
def test_resumed_trainer_keeps_counting(tmp_path):
  """A SIGTERM after the second evaluation (step 4, one without improvement) and a rerun: the checkpoint gives the
  count and the best back, so the run stops at step 8 (three in a row: 4, 6, 8) reporting step 2, as it would
  have uninterrupted. Without them the resumed run would count from step 6 as its best and stop at 12."""
  config = tiny_config(patience=3, num_val=12)
  config.train.num_steps, config.train.checkpoint_every = 12, 2
  workdir = str(tmp_path)

  def send_sigterm(step, state):
    del state
    if step == 4:
      signal.raise_signal(signal.SIGTERM)

  first = trainer.train(config, workdir, step_callback=send_sigterm)
  assert (first["stopped_by"], first["step"], first["best_step"]) == ("SIGTERM", 4, 2)
  second = trainer.train(config, workdir)
  assert (second["stopped_by"], second["step"], second["test_step"], second["best_step"]) == ("patience", 8, 2, 2)
  assert second["test_accuracy"] == first["test_accuracy"] and second["val_accuracy"] == first["val_accuracy"]
