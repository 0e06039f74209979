"""The training loop of the sharded-training subprocesses (tests/test_train_sharding.py, tests/test_scaling.py):
one compiled step run over a few batches from one initial state."""

import jax
import numpy as np
import optax

from bmojo_jax.train import sharding, steps


def run_steps(setup, host_state, n_steps: int):
  """n_steps train steps of `setup` from host_state (a host copy of an initial state) on batches i = 0 ..
  n_steps - 1, each the training examples 8i .. 8i + 7 sharded over the setup's mesh. Returns (the compiled step,
  the final state, the losses, Adam's mu after the first update: (1 - b1) x the first gradient when the config
  has no warmup and no clipping)."""
  source = setup.task.train_source
  state = jax.device_put(host_state, setup.state_shardings)
  rows = [[source[8 * i + j] for j in range(8)] for i in range(n_steps)]
  batches = [sharding.shard_batch({k: np.stack([x[k] for x in r]) for k in ("inputs", "targets")}, setup.mesh)
             for r in rows]
  compiled = steps.make_train_step(setup, 1).lower(state, batches[0]).compile()
  losses, mu = [], None
  for b in batches:
    state, m = compiled(state, b)
    losses.append(float(m["loss"]))
    if mu is None:
      mu = jax.device_get(optax.tree_utils.tree_get(state["opt_state"], "mu"))
  return compiled, state, losses, mu
