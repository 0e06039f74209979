"""Optimizer pieces and the train step: weight-decay mask, schedule values, grad accumulation, one update."""

import dataclasses

import chex
import jax
import ml_collections
import numpy as np
import optax
import pytest

from bmojo_jax.model import stack_blocks
from bmojo_jax.configs import mqar
from bmojo_jax.train import optim
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import sharding
from bmojo_jax.train import steps


def tiny_mqar_config(family="hybrid", **train_overrides):
  """A 1-block d_model-32 model on MQAR L=32: compiles in seconds on CPU."""
  c = mqar.get_config(family)
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.d_state = 4
  c.model.window = None if family == "transformer" else 8
  c.model.chunk_size = 8
  c.model.n_eidetic = 4
  c.model.eidetic_per_chunk = 2
  c.model.n_fading = 2
  c.data.seq_len = 32
  c.data.num_kv_pairs = 4
  c.data.num_train = 512
  c.data.num_test = 24
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.num_steps = 8
  c.train.progress_bar = False
  c.train.plot = False
  c.train.async_checkpointing = False
  c.optim.warmup_steps = 0
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def test_weight_decay_mask_by_path():
  c = tiny_mqar_config("bmojo")
  setup = setup_lib.build(c)
  mask = optim.weight_decay_mask(setup.abstract_state["params"])
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  no_decay = sorted(k for k, v in flat.items() if not v)
  decay = sorted(k for k, v in flat.items() if v)
  # Norm scales, biases, A_log and D never decay; embeddings and projection kernels do.
  assert "final_norm/scale" in no_decay and "blocks/0/norm1/scale" in no_decay
  for name in ("A_log", "D", "conv_bias", "dt_bias"):
    assert f"blocks/0/mixer1/{name}" in no_decay
  assert "embed" in decay
  assert "blocks/0/mixer1/in_proj/kernel" in decay and "blocks/0/mixer2/wq/kernel" in decay
  assert all(k.endswith(("scale", "bias", "A_log", "/D")) for k in no_decay)
  c.model.selection = "linear"        # the linear selection's predictor fits its own loss: no decay
  mask = optim.weight_decay_mask(setup_lib.build(c).abstract_state["params"])
  assert not mask["blocks"][0]["mixer2"]["predictor"] and mask["blocks"][0]["mixer2"]["wq"]["kernel"]


@pytest.mark.parametrize("decay,expected", [
    ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + np.cos(np.pi * 0.5)) * 0.9 + 0.1, 0.1]),
    ("linear", [0.0, 0.5, 1.0, 0.55, 0.1]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
])
def test_schedule_values(decay, expected):
  o = ml_collections.ConfigDict(dict(learning_rate=2.0, warmup_steps=10, decay=decay, end_lr_ratio=0.1))
  schedule = optim.make_schedule(o, num_steps=30)   # warmup 0..10, decay over 20 steps
  got = [float(schedule(s)) for s in (0, 5, 10, 20, 30)]
  np.testing.assert_allclose(got, 2.0 * np.asarray(expected), rtol=1e-6, atol=1e-7)


def test_weight_decay_applies_only_to_masked_params():
  o = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, decay="constant", end_lr_ratio=1.0,
                                     weight_decay=0.5, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0))
  tx, _ = optim.make_optimizer(o, num_steps=10)
  params = {"norm": {"scale": np.ones(3, np.float32)}, "w": {"kernel": np.ones(3, np.float32)}}
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["norm"]["scale"], 0.0)
  np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * 0.5)


@pytest.fixture(scope="module")
def step_setup():
  c = tiny_mqar_config("hybrid")
  c.optim.grad_clip_norm = 0.0
  setup = setup_lib.build(c)
  it = iter(setup.task.train_source[i] for i in range(16))
  examples = [next(it) for _ in range(16)]
  batch = {k: np.stack([e[k] for e in examples[:8]]) for k in ("inputs", "targets")}
  return setup, batch


def test_grad_accumulation_equals_big_batch(step_setup):
  """4 micro-batches of 2 give the 8-row batch's loss and gradient (SGD with lr 1: update = -gradient)."""
  setup, batch = step_setup
  sgd = optax.sgd(1.0)
  init = setup.init_state()
  opt_sh = sharding.opt_state_shardings(sgd, jax.eval_shape(sgd.init, init["params"]),
                                        setup.state_shardings["params"], setup.mesh)
  sgd_setup = dataclasses.replace(setup, tx=sgd, state_shardings={**setup.state_shardings, "opt_state": opt_sh})
  sharded = sharding.shard_batch(batch, setup.mesh)
  p0 = jax.device_get(init["params"])

  def run(accum):
    state = {**setup.init_state(), "opt_state": sgd.init(p0)}
    state, m = steps.make_train_step(sgd_setup, accum)(state, sharded)
    grads = jax.tree.map(lambda a, b: a - b, p0, jax.device_get(state["params"]))
    return grads, m, int(state["step"])

  g1, m1, _ = run(1)
  g4, m4, step = run(4)
  assert step == 1
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g1)) > 1e-4  # gradients are not trivially zero


def test_train_step_reduces_loss_on_fixed_batch(step_setup):
  setup, batch = step_setup
  step = steps.make_train_step(setup, 1)
  sharded = sharding.shard_batch(batch, setup.mesh)
  state = setup.init_state()
  losses = []
  for _ in range(5):
    state, m = step(state, sharded)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  assert np.isclose(losses[0], np.log(setup.cfg.vocab_size), rtol=0.05)  # near-uniform at init


def test_scanned_and_unscanned_train_steps_agree(step_setup):
  """The trainer's step with scanned blocks and with the block loop, from the same initialization: equal losses
  over 4 AdamW updates and equal parameters after them (fp32)."""
  _, batch = step_setup
  results = []
  for scan in (False, True):
    c = tiny_mqar_config("bmojo")
    c.model.n_layers = 4
    c.model.compute.scan_layers = scan
    setup = setup_lib.build(c)
    step, state = steps.make_train_step(setup, 1), setup.init_state()
    losses = []
    for _ in range(4):
      state, m = step(state, sharding.shard_batch(batch, setup.mesh))
      losses.append(float(m["loss"]))
    params = jax.device_get(state["params"])
    results.append((losses, params if scan else stack_blocks(params)))
  (loss_loop, p_loop), (loss_scan, p_scan) = results
  np.testing.assert_allclose(loss_loop, loss_scan, rtol=1e-5)
  chex.assert_trees_all_close(p_loop, p_scan, rtol=1e-4, atol=1e-6)


def test_head_on_supervised_positions_only_changes_nothing(step_setup):
  """MQAR scores N of T positions: the loss through `supervised` (the head on those rows only) equals the
  full-logits loss, with its gradients, and a row with fewer supervised targets than the bound is fine."""
  setup, batch = step_setup
  assert setup.task.supervised_per_example == 4
  params = jax.device_get(setup.init_state()["params"])
  batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  batch["targets"] = batch["targets"].at[0].set(-100).at[0, 5].set(7)     # row 0: one supervised target
  value_and_grad = jax.jit(jax.value_and_grad(steps.loss_sums, argnums=1, has_aux=True), static_argnums=(0, 3))
  full = value_and_grad(setup.graphdef, params, batch)        # compiled: op by op it took most of the test
  sparse = value_and_grad(setup.graphdef, params, batch, 4)
  (loss_f, aux_f), g_f = full
  (loss_s, aux_s), g_s = sparse
  np.testing.assert_allclose(loss_s, loss_f, rtol=1e-6)
  for a, b in zip(aux_s, aux_f):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_f)):   # fp32 sums in another order: 1e-5 of the scale
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
  assert int(aux_s[0][0]) == 1 and int(aux_s[0][1]) == 4
