"""The training loop: `train(config, workdir)`, `evaluate(...)`, and `load_run(workdir)` for eval / generation.

The train state is a dict of pure pytrees {"params", "opt_state", "step", "rng"}; the model's graph
definition stays outside, and the train step is one `jax.jit` of a pure function over (state, batch) that
donates the state. Parameters and optimizer state are placed by the logical-axis rules of
`train/sharding.py`; batches are split over the ("data", "fsdp") mesh axes, each process feeding its own
shard of the data (`shard_index = process_index`).

Step s means "after s optimizer updates"; the loss logged at step s is the one computed by update s.
What the loop does about a non-finite update, a failed save or an explicit resume step is `train/faults.py`'s
and `train/checkpoint.py`'s.
"""

import collections
import contextlib
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bmojo_jax import LanguageModel, ModelConfig
from bmojo_jax.model import stack_blocks, unstack_blocks
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import faults
from train import metrics as metrics_lib
from train import optim as optim_lib
from train import sharding as shard_lib
from train import tasks as tasks_lib
from train.workdir_lock import WorkdirLock

IGNORE_INDEX = data_lib.IGNORE_INDEX
MAX_IN_FLIGHT = 2  # train steps dispatched ahead of the last finished one
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


NonFiniteLossError = faults.NonFiniteLossError   # training diverged (train.on_nonfinite=stop, or past its limit)


# ----------------------------------------------------------------------------------------------- setup
def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """ModelConfig from `config.model` (raises bmojo_jax.ConfigError on impossible models)."""
  return ModelConfig(**config.model.to_dict())


def validate_config(config: ml_collections.ConfigDict, mesh, task: tasks_lib.Task, cfg: ModelConfig) -> None:
  """Raises ValueError naming the first training setting that cannot work."""
  t = config.train
  dp, procs = shard_lib.batch_parallelism(mesh), jax.process_count()
  for name in ("num_steps", "batch_size", "grad_accum_steps", "eval_batch_size", "log_every",
               "checkpoint_every", "keep_checkpoints"):
    if int(t[name]) < 1:
      raise ValueError(f"train.{name}={t[name]} must be >= 1.")
  if t.eval_every < 0:
    raise ValueError(f"train.eval_every={t.eval_every} must be >= 0.")
  if t.batch_size % t.grad_accum_steps:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps="
                     f"{t.grad_accum_steps}.")
  micro = t.batch_size // t.grad_accum_steps
  if micro % dp:
    raise ValueError(f"train.batch_size={t.batch_size} (micro-batch {micro} with grad_accum_steps="
                     f"{t.grad_accum_steps}) is not divisible by the data-parallel size {dp} "
                     f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}).")
  for name in ("batch_size", "eval_batch_size"):
    if t[name] % procs or t[name] % dp:
      raise ValueError(f"train.{name}={t[name]} is not divisible by the data-parallel size {dp} and the "
                       f"process count {procs}.")
  if not 0.0 <= t.target_accuracy <= 1.0:
    raise ValueError(f"train.target_accuracy={t.target_accuracy} must be in [0, 1].")
  optim_lib.validate(config.optim)
  faults.validate(t)
  if task.vocab_size > cfg.vocab_size:
    raise ValueError(f"The data has token ids up to {task.vocab_size - 1} but model.vocab_size="
                     f"{cfg.vocab_size}; set --config.model.vocab_size>={task.vocab_size}.")
  if len(task.train_source) // procs < t.batch_size // procs:
    raise ValueError(f"The training set has {len(task.train_source)} examples, fewer than one batch "
                     f"(train.batch_size={t.batch_size}).")


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step."""
  config: ml_collections.ConfigDict
  cfg: ModelConfig
  mesh: Any
  task: tasks_lib.Task
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  abstract_state: Any
  init_state: Callable[[], Any]


def build(config: ml_collections.ConfigDict, devices=None, task: tasks_lib.Task | None = None) -> Setup:
  cfg = model_config(config)
  mesh = shard_lib.make_mesh(config.mesh, devices)
  task = task or tasks_lib.make_task(config)
  validate_config(config, mesh, task, cfg)
  tx, schedule = optim_lib.make_optimizer(config.optim, int(config.train.num_steps))
  seed = int(config.seed)

  def init_state():
    model = LanguageModel(cfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1))}

  abstract_model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(seed)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  abstract = jax.eval_shape(init_state)
  p_sh = shard_lib.param_shardings(logical, abstract["params"], mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = {"params": p_sh,
               "opt_state": shard_lib.opt_state_shardings(tx, abstract["opt_state"], p_sh, mesh),
               "step": replicated, "rng": replicated}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return Setup(config, cfg, mesh, task, graphdef, tx, schedule, shardings, abstract,
               jax.jit(init_state, out_shardings=shardings))


def restore_state(ckpt: ckpt_lib.Checkpointer, step: int, setup: Setup, iterator) -> Any:
  """The train state of checkpoint `step` (checked with `check_compatible`) in `setup`'s shardings.

  A checkpoint written with the other block layout (scan_layers) is restored as written and converted, so
  runs from before scanned blocks resume and evaluate as they are."""
  meta = ckpt.check_compatible(step, ckpt_lib.model_config_dict(setup.cfg))
  saved_scan = bool(meta["model"]["scan_layers"])
  if saved_scan == setup.cfg.scan_layers:
    return ckpt.restore(step, setup.abstract_state, iterator)
  config = ml_collections.ConfigDict(setup.config.to_dict())
  config.model.scan_layers = saved_scan
  written = build(config, list(setup.mesh.devices.flat), setup.task)
  state = ckpt.restore(step, written.abstract_state, iterator)
  convert = stack_blocks if setup.cfg.scan_layers else (lambda t: unstack_blocks(t, setup.cfg.n_blocks))
  state = {**state, "params": convert(state["params"]), "opt_state": convert(state["opt_state"])}
  return jax.device_put(state, setup.state_shardings)


# ----------------------------------------------------------------------------------------------- steps
def token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy [B, T] fp32, correct [B, T] bool) of logits [B, T, V] fp32 against labels [B, T].

  The loss and the accuracy share one max over the vocabulary: a token is correct when its label's logit is
  the largest (a tie counts as correct, where argmax would pick the first). A separate argmax is one more
  pass over the logits, ~0.75 ms per step at 16k tokens and vocab 50280 on an H200."""
  top = jnp.max(logits, axis=-1)                                                        # [B, T]
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  shifted = logits - jax.lax.stop_gradient(top)[..., None]
  lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)) + jax.lax.stop_gradient(top)
  return lse - label_logit, label_logit >= top


MODEL_FIELDS = ("inputs", "targets", "segment_ids", "positions")  # what a step reads of a batch, when present


def model_batch(batch: dict, *extra: str) -> dict:
  """The fields of `batch` a step reads: MODEL_FIELDS (segment_ids / positions of packed text) and `extra`."""
  return {k: batch[k] for k in MODEL_FIELDS + extra if k in batch}


def loss_sums(graphdef, params, batch, supervised: int | None = None):
  """(sum of token cross-entropies, (supervised tokens [B], correct tokens [B], ce per example [B])).

  A batch with segment_ids (packed documents) keeps its documents apart (`LanguageModel.__call__`).
  supervised (static): at most this many targets per row are not IGNORE_INDEX (MQAR: N of T), so the head runs
  on those positions only, [B, supervised, V] logits instead of [B, T, V]; the sums are the same."""
  model = nnx.merge(graphdef, params)
  x = model.hidden(batch["inputs"], batch.get("segment_ids"), batch.get("positions"))     # [B, T, D]
  targets = batch["targets"]
  if supervised:
    rows = jnp.argsort(targets == IGNORE_INDEX, axis=1, stable=True)[:, :supervised]   # supervised first
    x = jnp.take_along_axis(x, rows[..., None], axis=1)
    targets = jnp.take_along_axis(targets, rows, axis=1)
  logits = model.logits(x)                                                              # [B, T|supervised, V]
  valid = targets != IGNORE_INDEX
  ce, correct = token_losses(logits, jnp.where(valid, targets, 0))
  ce = jnp.where(valid, ce, 0.0)
  correct = correct & valid
  per_ex_ce = ce.sum(axis=1)
  return per_ex_ce.sum(), (valid.sum(axis=1), correct.sum(axis=1), per_ex_ce)


def batch_grads(graphdef, params, batch, supervised: int | None = None):
  """(gradient of the summed loss, summed loss, supervised tokens, correct tokens) of one (micro-)batch."""
  (loss, (n, c, _)), g = jax.value_and_grad(loss_sums, argnums=1, has_aux=True)(graphdef, params, batch,
                                                                                  supervised)
  return g, loss, n.sum(), c.sum()


def apply_gradients(tx, schedule, params, opt_state, g, loss, n, c, step, lr_scale=None):
  """The update from summed gradients g over n supervised tokens (c correct): (params, opt_state, metrics).

  lr_scale (a population's per-run learning rate, `train.population`) multiplies the optimizer's updates;
  its schedule then has peak 1."""
  denom = jnp.maximum(n, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda x: x / denom, g)
  updates, opt_state = tx.update(grads, opt_state, params)
  lr = schedule(step)
  if lr_scale is not None:
    updates = jax.tree.map(lambda u: (lr_scale * u).astype(u.dtype), updates)
    lr = lr * lr_scale
  metrics = {"loss": loss / denom, "accuracy": c / denom, "grad_norm": optax.global_norm(grads),
             "learning_rate": lr}
  return optax.apply_updates(params, updates), opt_state, metrics


def make_train_step(setup: Setup, accum: int, lr_scale: float = 1.0, skip_nonfinite: bool = False):
  """The jitted step (state, batch) -> (state, metrics); metrics["finite"] says whether the update is finite.

  lr_scale multiplies the learning rate (what rollbacks leave, `train.faults`; 1.0 adds no op); skip_nonfinite
  (train.on_nonfinite=skip) also checks the new parameters and keeps the old parameters and optimizer state
  where the update is not finite."""
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
  grads_of = functools.partial(batch_grads, graphdef, supervised=setup.task.supervised_per_example)

  def train_step(state, batch):
    params = state["params"]
    batch = model_batch(batch)
    if accum == 1:
      g, loss, n, c = grads_of(params, batch)
    else:
      # Micro-batch i takes rows i, i+accum, ...: each device keeps its own rows (no resharding).
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
                           batch)
      def body(carry, mb):
        out = grads_of(params, mb)
        return jax.tree.map(jnp.add, carry, out), None
      zero = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
              jnp.zeros((), jnp.int32))
      (g, loss, n, c), _ = jax.lax.scan(body, zero, micro)
    params, opt_state, metrics = apply_gradients(tx, schedule, params, state["opt_state"], g, loss, n, c,
                                                 state["step"], None if lr_scale == 1.0 else lr_scale)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    if skip_nonfinite:
      finite &= faults.all_finite(params)
      params, opt_state = faults.keep_if(finite, (params, opt_state), (state["params"], state["opt_state"]))
    metrics["finite"] = finite
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}, metrics

  batch_sh = shard_lib.batch_sharding(setup.mesh)
  return jax.jit(shard_lib.in_mesh(train_step, setup.mesh), in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, None), donate_argnums=0)


def make_eval_step(setup: Setup):
  graphdef = setup.graphdef

  def eval_step(params, batch):
    _, (n, c, ce) = loss_sums(graphdef, params, batch, setup.task.supervised_per_example)
    mask = batch["mask"] & (n > 0)
    per_ex_acc = c.astype(jnp.float32) / jnp.maximum(n, 1).astype(jnp.float32)
    return {"acc_sum": jnp.sum(jnp.where(mask, per_ex_acc, 0.0)), "examples": jnp.sum(mask),
            "ce_sum": jnp.sum(jnp.where(mask, ce, 0.0)), "tokens": jnp.sum(jnp.where(mask, n, 0))}

  batch_sh = shard_lib.batch_sharding(setup.mesh)
  return jax.jit(shard_lib.in_mesh(eval_step, setup.mesh),
                 in_shardings=(setup.state_shardings["params"], batch_sh))


def eval_batches(setup: Setup):
  """This process's share of the test set, in global batches of train.eval_batch_size, sharded."""
  it = data_lib.make_eval_iterator(setup.task.eval_source,
                                   batch_size=int(setup.config.train.eval_batch_size) // jax.process_count(),
                                   shard_index=jax.process_index(), shard_count=jax.process_count())
  return (shard_lib.shard_batch(model_batch(batch, "mask"), setup.mesh) for batch in it)


def evaluate(setup: Setup, params, eval_step=None) -> dict[str, float]:
  """One pass over the test set: accuracy (per example, then averaged), loss per token, perplexity."""
  eval_step = eval_step or make_eval_step(setup)
  totals = {"acc_sum": 0.0, "examples": 0, "ce_sum": 0.0, "tokens": 0}
  for batch in eval_batches(setup):
    out = jax.device_get(eval_step(params, batch))
    for k in totals:
      totals[k] += out[k].item()
  loss = totals["ce_sum"] / max(totals["tokens"], 1)
  return {"accuracy": totals["acc_sum"] / max(totals["examples"], 1), "loss": loss,
          "perplexity": float(np.exp(min(loss, 80.0))), "examples": totals["examples"]}


# ----------------------------------------------------------------------------------------------- loop
class StopRequest:
  """Signal handler that asks the loop to checkpoint and stop after the current step."""

  def __init__(self):
    self.signum: int | None = None

  def __call__(self, signum, frame=None):
    del frame
    self.signum = signum


@contextlib.contextmanager
def _handle_signals(stop: StopRequest):
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _meta(setup: Setup, record: faults.FaultRecord | None = None) -> dict[str, Any]:
  return {"model": ckpt_lib.model_config_dict(setup.cfg), "data": setup.config.data.to_dict(),
          "faults": (record or faults.FaultRecord()).to_meta()}


def _write_run_files(setup: Setup, workdir: str) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(setup.config.to_json_best_effort(indent=2, sort_keys=True))
  info = tasks_lib.save_tokenizer(setup.task.tokenizer, workdir)
  with open(os.path.join(workdir, TOKENIZER_FILE), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
          step_callback: Callable[[int, dict[str, Any]], None] | None = None,
          stop: StopRequest | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics (also in results.json).

  step_callback(step, state) is called after each update (tests use it to send signals).
  """
  start_wall = time.time()
  workdir = os.path.abspath(workdir)
  setup = build(config, devices)        # validates everything first: a config that cannot work creates nothing
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:                            # one run per workdir, before anything is written
    return _train(config, setup, workdir, start_wall, step_callback, stop)


def _train(config, setup: Setup, workdir: str, start_wall: float, step_callback, stop) -> dict[str, Any]:
  t = config.train
  lead = jax.process_index() == 0
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                               async_save=bool(t.async_checkpointing), writer=True)
  notes = [f"Removed {name} from {ckpt.directory}: the unfinished save of an earlier run."
           for name in ckpt.removed_unfinished]
  local_batch = int(t.batch_size) // jax.process_count()
  make_iterator = functools.partial(
      data_lib.make_train_iterator, setup.task.train_source, batch_size=local_batch, seed=int(config.seed),
      shard_index=jax.process_index(), shard_count=jax.process_count(), worker_count=int(t.data_workers))
  it = make_iterator()
  latest, record = faults.start_point(ckpt, t.get("resume_from"), notes.append)
  state = setup.init_state() if latest is None else restore_state(ckpt, latest, setup, it)
  start = int(jax.device_get(state["step"]))
  results_path = os.path.join(workdir, "results.json")
  finished = faults.finished(results_path, start, t)
  if finished:
    ckpt.close()
    if lead:
      print("\n".join(notes + [f"{workdir} already finished at step {start} ({finished[0]}); its results are kept "
                               f"in {results_path}. Raise --config.train.num_steps (or train.target_accuracy) to "
                               "train further."]))
    return finished[1]
  if latest is not None:
    notes.append(f"{workdir}: resuming from step {latest} (checkpoint {ckpt.step_dir(latest)}).")
  if lead:
    _write_run_files(setup, workdir)

  # Out-of-range ids fail before any update: the first eval batch is checked here, every train batch below.
  first_eval = next(iter(data_lib.make_eval_iterator(setup.task.eval_source, batch_size=1)))
  tasks_lib.check_first_batch(first_eval, setup.cfg.vocab_size, "test data")

  accum, skip = int(t.grad_accum_steps), t.get("on_nonfinite", "stop") == "skip"
  train_step = make_train_step(setup, accum, record.lr_scale, skip)
  eval_step = make_eval_step(setup)
  probe_batch = next(eval_batches(setup))       # a state whose loss on it is not finite is never saved
  num_steps = int(t.num_steps)
  writer = metrics_lib.MetricWriter(workdir, total_steps=num_steps, initial_step=start, enabled=lead,
                                    progress_bar=bool(t.progress_bar))
  for note in notes:
    writer.message(note)
  tokens_per_step = int(t.batch_size) * setup.task.seq_len
  stop = stop or StopRequest()
  pending: list[tuple[int, dict[str, Any]]] = []
  in_flight: collections.deque = collections.deque()
  last_eval: dict[str, float] | None = None
  last_eval_step: int | None = None
  stopped_by, step = None, start
  train_time, trained_steps, interval_start = 0.0, 0, time.time()
  guard = faults.NonFiniteGuard(t, record, ckpt.step_dir, writer.message, last_saved=latest, start=start)

  def flush():
    """Pulls the pending step metrics, acts on non-finite updates, logs the averages of the finite ones."""
    nonlocal interval_start, train_time, trained_steps
    if not pending:
      return
    values = jax.device_get([m for _, m in pending])      # one transfer for the interval
    for (s, _), v in zip(pending, values):
      guard.observe(s, v)
    elapsed = time.time() - interval_start
    train_time += elapsed
    trained_steps += len(pending)
    kept = [v for v in values if v["finite"]]
    avg = {k: float(np.mean([v[k] for v in kept])) for k in ("loss", "accuracy", "grad_norm")} if kept else {}
    avg["learning_rate"] = float(values[-1]["learning_rate"])
    avg["tokens_per_s"] = tokens_per_step * len(pending) / max(elapsed, 1e-9)
    if len(kept) < len(values):
      avg["dropped_updates"] = len(values) - len(kept)
    writer.write(pending[-1][0], {k: v for k, v in avg.items() if np.isfinite(v)}, "train")
    writer.advance(pending[-1][0])
    in_flight.clear()
    pending.clear()
    interval_start = time.time()

  def save(s):
    """Checkpoint s, if its state gives a finite loss on the probe batch (else train.on_nonfinite acts)."""
    nonlocal interval_start
    guard.checkpoint(s, lambda: eval_step(state["params"], probe_batch)["ce_sum"],
                     lambda: ckpt.save(s, state, it, _meta(setup, record)))
    interval_start = time.time()

  def roll_back(r: faults.Rollback) -> int:
    """Back to the last good checkpoint (the initial state if none), with a lower learning rate."""
    nonlocal state, it, train_step
    ckpt.wait()
    pending.clear()
    in_flight.clear()
    back = guard.last_saved or 0
    if guard.last_saved is None:
      it, state = make_iterator(), setup.init_state()
    else:
      state = restore_state(ckpt, back, setup, it)
    guard.rolled_back(back, r)
    train_step = make_train_step(setup, accum, record.lr_scale, skip)
    return back

  try:
    with _handle_signals(stop):
      while step < num_steps:
        try:
          step += 1
          batch = next(it)
          tasks_lib.check_first_batch(batch, setup.cfg.vocab_size, f"training batch of step {step}")
          state, m = train_step(state, shard_lib.shard_batch(model_batch(batch), setup.mesh))
          pending.append((step, m))
          if step_callback is not None:
            step_callback(step, state)
          ckpt.poll()                     # an asynchronous save that failed stops the run here
          # At most MAX_IN_FLIGHT steps queued on the device: the bar shows finished steps, and a stop request
          # is acted on after at most that many more steps rather than after everything queued.
          in_flight.append((step, m))
          while len(in_flight) > MAX_IN_FLIGHT:
            done_step, done_m = in_flight.popleft()
            guard.observe(done_step, done_m)
            writer.advance(done_step)
          done = step == num_steps
          if step % int(t.log_every) == 0 or done or stop.signum is not None:
            flush()
          if (t.eval_every and step % int(t.eval_every) == 0) or done:
            flush()
            last_eval, last_eval_step = evaluate(setup, state["params"], eval_step), step
            writer.write(step, {k: v for k, v in last_eval.items() if np.isfinite(v)}, "eval")
            interval_start = time.time()
            if t.target_accuracy and last_eval["accuracy"] >= t.target_accuracy:
              writer.message(f"Step {step}: eval accuracy {last_eval['accuracy']:.4f} >= target "
                             f"{t.target_accuracy}; stopping early.")
              stopped_by = "target_accuracy"
          if step % int(t.checkpoint_every) == 0 or done or stopped_by or stop.signum is not None:
            flush()
            save(step)
          if stop.signum is not None:
            stopped_by = signal.Signals(stop.signum).name
            saved = f"checkpoint of step {step} saved" if guard.last_saved == step else \
                f"the last checkpoint is step {guard.last_saved}"
            writer.message(f"{stopped_by} received: {saved}; rerun the same command to resume.")
          if stopped_by:
            break
        except faults.Rollback as r:
          step = roll_back(r)
  except BaseException:
    for close in (ckpt.close, writer.close):
      with contextlib.suppress(Exception):   # the error in flight is the one to report
        close()
    raise
  try:
    ckpt.close()                          # waits for the last save: CheckpointSaveError if it failed
  finally:
    writer.close()

  final_step = max(step, start)
  if last_eval is None and stopped_by is None:
    last_eval, last_eval_step = evaluate(setup, state["params"], eval_step), final_step
  results = {"step": final_step, "stopped_by": stopped_by, "wall_s": time.time() - start_wall,
             "tokens_per_s": tokens_per_step * trained_steps / max(train_time, 1e-9),
             "family": setup.cfg.family.value, "task": setup.task.kind, "data": setup.task.info,
             "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
             "platform": jax.default_backend(), "jax_version": jax.__version__}
  if last_eval is not None:
    results.update({f"test_{k}": v for k, v in last_eval.items()}, test_step=last_eval_step)
  if record != faults.FaultRecord():
    results["faults"] = record.to_meta()
  if setup.task.kind == "mqar":
    results["window"] = setup.cfg.window
    if setup.cfg.window is not None:
      results["data"]["fraction_beyond_window"] = data_lib.fraction_beyond_window(
          setup.task.eval_source, setup.cfg.window)
  if not lead:
    return faults.strict_json(results)[0]
  results = faults.write_strict_json(results_path, results, f"the run's step {final_step}")
  if t.plot:
    from train import plots  # pylint: disable=g-import-not-at-top
    plots.maybe_plot(workdir)
  return results


# ----------------------------------------------------------------------------------------------- runs
def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {CONFIG_FILE} in {workdir}: not a bmojo-train workdir (or it never started).")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, config: ml_collections.ConfigDict | None = None, devices=None, with_task: bool = True):
  """(setup, params, step) of the latest checkpoint in `workdir`; raises CheckpointError / FileNotFoundError."""
  workdir = os.path.abspath(workdir)
  config = config or load_config(workdir)
  task = None if with_task else tasks_lib.Task("none", range(1 << 30), range(1), 1, 0)
  if not with_task:
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    config.train.batch_size = config.train.eval_batch_size = jax.device_count()
    config.train.grad_accum_steps = 1
  setup = build(config, devices, task)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.train.keep_checkpoints),
                               async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"No checkpoint in {ckpt.directory}: train first (bmojo-train).")
    state = restore_state(ckpt, step, setup, None)
  finally:
    ckpt.close()
  return setup, state["params"], step


def evaluate_run(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir`; writes and returns eval.json's contents.

  eval.json is strict JSON: a non-finite figure is written as null, listed under "nonfinite", and warned about
  (faults.NonFiniteResultWarning)."""
  setup, params, step = load_run(workdir, config)
  result = {"step": step, **{f"test_{k}": v for k, v in evaluate(setup, params).items()}}
  if jax.process_index() == 0:
    return faults.write_strict_json(os.path.join(workdir, "eval.json"), result, f"checkpoint {step} of {workdir}")
  return faults.strict_json(result)[0]
