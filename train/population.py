"""A population: many MQAR runs of one model trained at once on one device.

R runs that share the model's shapes but differ in learning rate and seed train together. Their parameters
and optimizer states are stacked over a leading run axis, and one jitted call (a *dispatch*) advances every
run by K steps with `lax.scan`. Each step is a `jax.vmap` over runs of the trainer's own update:
`train.steps.loss_sums` → gradients / supervised tokens → the optax transformation of
`train.optim.make_optimizer` → `optax.apply_updates`. A dispatch contains, per step: the batch indices, the
batches (drawn on the device by `train.data.mqar.generate_batch`), the R updates, and the per-run metrics;
nothing crosses from the host between evaluations.

Per-run learning rate: `make_optimizer` is built with a peak learning rate of 1 and each run multiplies its
updates by its own learning rate (a traced f32[runs]). The chain is clip → AdamW → scale by -schedule(step),
and everything before the last scaling (clipping, the moments, the masked weight decay) is independent of the
learning rate, so the update of run r is the one of `make_optimizer` with peak lr_r (to fp32 rounding):
same AdamW, clipping, weight-decay mask, warmup and decay shape.

Data: the training set is the task's (`data.train_seed`, `data.num_train` examples: the examples grain
reads from `MQARSource`) read in epochs of num_train // B batches, each epoch in the order of a permutation
drawn on the device from (shuffle seed, epoch); grain's shuffle is a different permutation of the same
examples. `shared_data=True` (the default, as Zoology trains every learning rate on the same data): all runs
read one stream, shuffled by `config.seed`; False: run r shuffles with its own seed.

Evaluation: the test split, generated once on the device, through the trainer's eval step (`lax.map` over
runs, so one run's eval batch is in memory at a time), its sums reduced as the trainer's (`steps.eval_metrics`).
Every `train.eval_every` steps (a multiple of K) and at the end. With a validation split (data.num_val > 0)
the validation split too, and a run stops when its validation accuracy has not improved by train.min_delta for
train.patience evaluations (`stopped_by="patience"`, `train.steps.EarlyStopping`, the trainer's rule); it then
reports the test figures of its best validation evaluation. A run whose accuracy (validation, else test) reaches
`train.target_accuracy` stops (unless its loss is at ln V: then it stops as "collapsed",
`train.steps.target_outcome`): its parameters and optimizer state are no longer updated (the update is
masked). A run whose loss or gradient norm becomes NaN/inf stops too, keeping its last finite parameters
(`stopped_by="non_finite_loss"`), instead of ending the population.

The training loop and the runs' files (bmojo-train workdirs): `train/population_loop.py`.

Memory: the R runs' activations are live together (vmap); at batch 256 × L 256 × vocab 8192 the fp32 logits
alone are 2.1 GB per run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import steps as steps_lib
from bmojo_jax.train.data import mqar
from bmojo_jax.train.data.packing import IGNORE_INDEX

SHUFFLE_TAG = 0x5EED  # folded into a shuffle seed's key, apart from the init stream of the same seed


@dataclasses.dataclass(frozen=True)
class Run:
  """One member of a population: what differs from the others."""
  learning_rate: float
  seed: int

  @property
  def name(self) -> str:
    return f"lr{self.learning_rate:.3g}_seed{self.seed}"


def run_config(config: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The single-run trainer config of `run`: `config` with the run's learning rate and seed."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.optim.learning_rate, c.seed = float(run.learning_rate), int(run.seed)
  return c


def largest_divisor_at_most(n: int, limit: int) -> int:
  """The largest divisor of n that is <= limit (steps per dispatch that land on every eval step)."""
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class Population:
  """R runs of one MQAR config (`configs/mqar.py` fields) that differ in learning rate and seed.

  Example:
    pop = Population(config, [Run(lr, 0) for lr in (1e-4, 4.6e-4, 2.2e-3, 1e-2)])
    results = population_loop.train(pop, "runs/sweep")   # one results dict per run, as results.json
  """

  def __init__(self, config: ml_collections.ConfigDict, runs: Sequence[Run], *, shared_data: bool = True,
               steps_per_dispatch: int = 50):
    if config.data.kind != "mqar":
      raise ValueError(f"A population trains MQAR (data.kind='mqar'), got data.kind={config.data.kind!r}.")
    if not runs:
      raise ValueError("A population needs at least one run.")
    if any(not r.learning_rate > 0 for r in runs):
      raise ValueError(f"Every learning rate must be positive, got {[r.learning_rate for r in runs]}.")
    if len({r.name for r in runs}) < len(runs):
      raise ValueError(f"Two runs have the same learning rate and seed: {[r.name for r in runs]}.")
    if int(config.train.grad_accum_steps) != 1:
      raise ValueError("A population steps whole batches: set train.grad_accum_steps=1.")
    self.config, self.runs, self.shared_data = config, list(runs), bool(shared_data)
    self.device = jax.devices()[0]        # where jit runs the population
    # The trainer's setup with a peak learning rate of 1 on that device: its model, graphdef, optimizer and
    # schedule shape, its task, and its validation of every setting.
    unit = ml_collections.ConfigDict(config.to_dict())
    unit.optim.learning_rate = 1.0
    unit.mesh.data, unit.mesh.fsdp, unit.mesh.tensor = 1, 1, 1
    self.setup = setup = setup_lib.build(unit, [self.device])
    self.cfg, self.task = setup.cfg, setup.task
    self.mq: mqar.MQARConfig = setup.task.train_source.config
    t = config.train
    self.num_steps, self.batch_size = int(t.num_steps), int(t.batch_size)
    self.steps_per_epoch = len(setup.task.train_source) // self.batch_size
    self.eval_every = int(t.eval_every)
    k = int(steps_per_dispatch)
    self.steps_per_dispatch = largest_divisor_at_most(self.eval_every, k) if self.eval_every else k
    self.tokens_per_step = self.batch_size * self.task.seq_len
    self.learning_rates = jnp.asarray([r.learning_rate for r in runs], jnp.float32)
    shuffle = [int(config.seed)] if self.shared_data else [r.seed for r in runs]
    self.shuffle_seeds = jnp.asarray(shuffle, jnp.int32)
    self._init = jax.jit(jax.vmap(lambda seed: setup_lib.fresh_state(setup.cfg, setup.tx, seed)))
    self._dispatch = jax.jit(self._scan_steps, donate_argnums=0)
    self._evaluate = jax.jit(self._eval_sums)
    self.early_stopping = steps_lib.early_stopping(setup)   # each run's rule (a copy per run); None: no split
    self._split_batches = {}
    self.state = None

  @property
  def size(self) -> int:
    return len(self.runs)

  # ------------------------------------------------------------------------------------------- device
  def init_state(self) -> dict[str, Any]:
    """The population's state: params / opt_state / rng [runs, ...] (run r's is the trainer's fresh state of
    seed r.seed, `setup.fresh_state`), active bool[runs], the epoch permutations int32[streams, num_train],
    step int32."""
    fresh = self._init(jnp.asarray([r.seed for r in self.runs], jnp.int32))
    return dict(fresh, step=jnp.zeros((), jnp.int32), active=jnp.ones((self.size,), bool),
                perm=jnp.zeros((self.shuffle_seeds.shape[0], len(self.task.train_source)), jnp.int32))

  def epoch_order(self, epoch):
    """int32[streams, num_train]: each stream's order of the training set in `epoch`; update s (0-based) of
    the epoch reads positions [s B, (s + 1) B) of it."""
    num_train = len(self.task.train_source)
    def perm(seed):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), SHUFFLE_TAG), epoch)
      return jax.random.permutation(key, num_train).astype(jnp.int32)
    return jax.vmap(perm)(self.shuffle_seeds)

  def _run_update(self, params, opt_state, lr, batch, step):
    """One run's train step: the trainer's, with the optimizer's updates scaled by the run's lr."""
    setup = self.setup
    g, loss, n, c = steps_lib.batch_grads(setup.graphdef, params, batch, setup.task.supervised_per_example)
    return steps_lib.apply_gradients(setup.tx, setup.schedule, params, opt_state, g, loss, n, c, step, lr_scale=lr)

  def _scan_steps(self, state):
    """K steps of every active run (one dispatch); returns (state, metrics {name: [K, runs]})."""
    bsz, spe = self.batch_size, self.steps_per_epoch
    data_axis = None if self.shared_data else 0

    def one_step(carry, _):
      params, opt_state, active, perm, step = carry
      epoch, pos = step // spe, step % spe
      perm = jax.lax.cond(pos == 0, lambda: self.epoch_order(epoch), lambda: perm)
      idx = jax.lax.dynamic_slice_in_dim(perm, pos * bsz, bsz, axis=1)                 # [streams, B]
      batch = jax.vmap(lambda i: mqar.generate_batch(self.mq, self.task.train_source.seed, i))(idx)
      if self.shared_data:
        batch = jax.tree.map(lambda x: x[0], batch)
      new_params, new_opt, m = jax.vmap(self._run_update, in_axes=(0, 0, 0, data_axis, None))(
          params, opt_state, self.learning_rates, batch, step)
      finite = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
      live = active & finite & (step < self.num_steps)                                  # [runs]
      keep = lambda new, old: jnp.where(live.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
      params = jax.tree.map(keep, new_params, params)
      opt_state = jax.tree.map(keep, new_opt, opt_state)
      m["updated"] = live
      return (params, opt_state, active & finite, perm, step + 1), m

    carry = (state["params"], state["opt_state"], state["active"], state["perm"], state["step"])
    (params, opt_state, active, perm, step), metrics = jax.lax.scan(
        one_step, carry, None, length=self.steps_per_dispatch)
    return dict(state, params=params, opt_state=opt_state, active=active, perm=perm, step=step), metrics

  def dispatch(self, state):
    """Advances every active run by K = `steps_per_dispatch` steps (none past train.num_steps)."""
    return self._dispatch(state)

  def test_batches(self, source: mqar.MQARSource | None = None) -> dict[str, jax.Array]:
    """The test split (or `source`: the validation split) on the device, {name: [batches, eval_batch_size,
    ...]}, padded with masked rows."""
    source = self.task.eval_source if source is None else source
    if source.seed not in self._split_batches:
      eb, n = int(self.config.train.eval_batch_size), len(source)
      nb = -(-n // eb)
      idx = jnp.arange(nb * eb) % n
      batch = mqar.generate_batch(self.mq, source.seed, idx)
      mask = jnp.arange(nb * eb) < n
      batch = {"inputs": jnp.where(mask[:, None], batch["inputs"], 0),
               "targets": jnp.where(mask[:, None], batch["targets"], IGNORE_INDEX), "mask": mask}
      self._split_batches[source.seed] = jax.tree.map(lambda x: x.reshape(nb, eb, *x.shape[1:]), batch)
    return self._split_batches[source.seed]

  def _eval_sums(self, params, batches):
    eval_step = steps_lib.make_eval_step(self.setup)

    def one_run(p):
      def body(total, batch):
        return jax.tree.map(jnp.add, total, eval_step(p, batch)), None
      zero = {"acc_sum": jnp.zeros((), jnp.float32), "examples": jnp.zeros((), jnp.int32),
              "ce_sum": jnp.zeros((), jnp.float32), "tokens": jnp.zeros((), jnp.int32)}
      return jax.lax.scan(body, zero, batches)[0]

    return jax.lax.map(one_run, params)

  def evaluate(self, params, source: mqar.MQARSource | None = None) -> list[dict[str, float]]:
    """The trainer's test metrics (accuracy, loss, perplexity, examples) of every run's `params` (on `source`,
    the validation split, when given)."""
    totals = jax.device_get(self._evaluate(params, self.test_batches(source)))
    return [steps_lib.eval_metrics({k: v[r].item() for k, v in totals.items()}) for r in range(self.size)]

  def validate(self, params) -> list[dict[str, float]]:
    """`evaluate` on the validation split (data.num_val examples of data.val_seed)."""
    return self.evaluate(params, self.task.val_source)

  def run_state(self, state, r: int, step: int) -> dict[str, Any]:
    """Run r's train state after `step` updates, in the trainer's layout {"params", "opt_state", "step", "rng"}."""
    run = jax.tree.map(lambda x: x[r], {k: state[k] for k in ("params", "opt_state", "rng")})
    return dict(run, step=jnp.asarray(step, jnp.int32))


def tokens_per_second(population: Population, dispatches: int = 5) -> float:
  """Aggregate training tokens/s of every run of `population` (all active), after one compiling dispatch."""
  state = population.dispatch(population.init_state())[0]
  jax.block_until_ready(state)
  t0 = time.time()
  for _ in range(dispatches):
    state = population.dispatch(state)[0]
  jax.block_until_ready(state)
  steps = dispatches * population.steps_per_dispatch
  return population.size * steps * population.tokens_per_step / (time.time() - t0)
