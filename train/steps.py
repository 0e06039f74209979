"""The jitted steps and the test-set evaluation of a `Setup` (`train/setup.py`).

`make_train_step`: one `jax.jit` of a pure function (state, batch) -> (state, metrics) that donates the
state; its parts (`loss_sums` -> `batch_grads` -> `apply_gradients`) are what `train/population.py` vmaps
over runs. `make_eval_step` and `evaluate`: one pass over the test set (accuracy per example, loss per
token, perplexity). Batches are split over the ("data", "fsdp") mesh axes.
"""

import dataclasses
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmojo_jax import losses
from bmojo_jax.config import LossImpl
from bmojo_jax.train import faults
from bmojo_jax.train import sharding as shard_lib
from bmojo_jax.train.data import pipeline
from bmojo_jax.train.data.packing import IGNORE_INDEX
from bmojo_jax.train.setup import Setup


COLLAPSE_TOLERANCE = 0.05   # nats: a test loss within this of ln V (uniform logits' loss) is a collapse


def collapsed(loss: float, vocab_size: int) -> bool:
  """Whether a test loss per token sits at uniform logits' ln V (within COLLAPSE_TOLERANCE) or above: the model
  predicts the labels no better than chance over its vocabulary, whatever its accuracy says. An untrained model
  is there too. A NaN loss is not a collapse (`train.faults` handles non-finite losses)."""
  return bool(loss >= math.log(vocab_size) - COLLAPSE_TOLERANCE)


def target_outcome(evaluation: dict[str, float], target: float, vocab_size: int) -> str | None:
  """What a test evaluation ({"accuracy", "loss", ...}) means for train.target_accuracy = `target` (0: none):
  "target_accuracy" when the accuracy reaches it, "collapsed" when it does but the loss is at ln V
  (`collapsed`), else None. The trainer and `train.population` both stop on either."""
  if not target or not evaluation["accuracy"] >= target:
    return None
  return "collapsed" if collapsed(evaluation["loss"], vocab_size) else "target_accuracy"


@dataclasses.dataclass
class EarlyStopping:
  """Patience on validation accuracy (train.patience, train.min_delta), and the test figures at the best
  validation evaluation. The trainer and `train.population` (one per run) both use it.

  `observe(step, validation, test)` after each evaluation: an evaluation *improves* when its validation accuracy
  exceeds the best so far by more than `min_delta` (the first always does); it then becomes the best, and its
  `test` evaluation is the one the run reports (no parameter copy is kept: test is evaluated at every
  evaluation). With patience > 0, `stop` is True once `patience` evaluations in a row have not improved;
  patience 0 never stops (the best is still tracked). Example, patience 2, min_delta 0.01: validation
  accuracies 0.5, 0.7, 0.705, 0.69 improve at the first two, then stop at the fourth, reporting step 2's test.
  """
  patience: int = 0
  min_delta: float = 0.0
  best_step: int | None = None
  best_validation: dict[str, float] | None = None
  best_test: dict[str, float] | None = None
  waited: int = 0                     # evaluations since the best

  def __post_init__(self):
    if self.patience < 0:
      raise ValueError(f"train.patience={self.patience} must be >= 0 (0: no early stopping).")
    if not self.min_delta >= 0:
      raise ValueError(f"train.min_delta={self.min_delta} must be >= 0.")

  def observe(self, step: int, validation: dict[str, float], test: dict[str, float] | None) -> bool:
    """Records one evaluation at `step` ({"accuracy", ...} of each split); returns whether it improved."""
    best = None if self.best_validation is None else self.best_validation["accuracy"]
    if best is None or validation["accuracy"] > best + self.min_delta:
      self.best_step, self.best_validation, self.best_test, self.waited = step, dict(validation), test, 0
      return True
    self.waited += 1
    return False

  @property
  def stop(self) -> bool:
    return self.patience > 0 and self.waited >= self.patience

  def message(self, step: int) -> str:
    """The log line of a stop at `step`."""
    return (f"Step {step}: validation accuracy has not improved by more than {self.min_delta} on its best "
            f"{self.best_validation['accuracy']:.4f} (step {self.best_step}) for {self.waited} evaluations "
            f"(train.patience={self.patience}); stopping, reporting step {self.best_step}'s test figures.")

  def record(self) -> dict[str, Any]:
    """What results.json says of it: the best step, its validation figures, the rule's settings."""
    return {"best_step": self.best_step, "patience": self.patience, "min_delta": self.min_delta,
            **{f"val_{k}": v for k, v in (self.best_validation or {}).items()}}

  def to_meta(self) -> dict[str, Any]:
    """The state a checkpoint keeps (a resumed run goes on counting); `from_meta` reads it back."""
    return dataclasses.asdict(self)

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> "EarlyStopping":
    return cls(**meta)


def early_stopping(setup: Setup) -> EarlyStopping | None:
  """The EarlyStopping of a run, or None without a validation split (MQAR's data.num_val = 0, the default, and
  every text task: the run reports its last test evaluation, as before). train.patience needs the split."""
  t = setup.config.train
  rule = EarlyStopping(int(t.get("patience", 0)), float(t.get("min_delta", 0.0)))   # checks both
  if setup.task.val_source is None:
    if rule.patience:
      raise ValueError(f"train.patience={rule.patience} stops on validation accuracy, and this task has no "
                       "validation split: set data.num_val (MQAR's held-out examples, e.g. 3000).")
    return None
  return rule


def collapse_message(step: int, evaluation: dict[str, float], vocab_size: int, target: float = 0.0) -> str:
  """The log line of a collapsed test evaluation (`collapsed`) at `step`; with `target`, one that reached it."""
  reached = f" >= target {target}" if target else ""
  ln_v = math.log(vocab_size)
  return (f"Step {step}: collapsed: test loss {evaluation['loss']:.4f} is not below ln V = {ln_v:.4f} "
          f"(uniform logits) - {COLLAPSE_TOLERANCE}, so eval accuracy {evaluation['accuracy']:.4f}{reached} is no "
          "success" + ("; stopping." if target else "."))


MODEL_FIELDS = ("inputs", "targets", "segment_ids", "positions")  # what a step reads of a batch, when present


def model_batch(batch: dict, *extra: str) -> dict:
  """The fields of `batch` a step reads: MODEL_FIELDS (segment_ids / positions of packed text) and `extra`."""
  return {k: batch[k] for k in MODEL_FIELDS + extra if k in batch}


def loss_sums(graphdef, params, batch, supervised: int | None = None):
  """(sum of token cross-entropies, (supervised tokens [B], correct tokens [B], ce per example [B])).

  A batch with segment_ids (packed documents) keeps its documents apart (`LanguageModel.__call__`).
  supervised (static): at most this many targets per row are not IGNORE_INDEX (MQAR: N of T), so the head runs
  on those positions only, [B, supervised, V] logits instead of [B, T, V]; the sums are the same.
  The model's `loss_impl` picks the head + loss: `chunked` (`bmojo_jax.losses.linear_cross_entropy`, blocks of
  `loss_block` tokens; its ce carries no gradient, the sum does) or `reference` (logits, then
  `losses.token_losses_reference`)."""
  model = nnx.merge(graphdef, params)
  x = model.hidden(batch["inputs"], batch.get("segment_ids"), batch.get("positions"))     # [B, T, D]
  targets = batch["targets"]
  if supervised:
    rows = jnp.argsort(targets == IGNORE_INDEX, axis=1, stable=True)[:, :supervised]   # supervised first
    x = jnp.take_along_axis(x, rows[..., None], axis=1)
    targets = jnp.take_along_axis(targets, rows, axis=1)
  valid = targets != IGNORE_INDEX
  labels = jnp.where(valid, targets, 0)
  loss = None
  if model.cfg.compute.loss_impl == LossImpl.CHUNKED:   # the head and loss in token blocks (bmojo_jax/losses.py)
    x = model.final_norm(x)
    loss, ce, correct = losses.linear_cross_entropy(x, model.head_weight(x.dtype), labels,
                                                    valid.astype(jnp.float32), model.cfg.compute.loss_block)
  else:
    ce, correct = losses.token_losses_reference(model.logits(x), labels)                                # logits [B, T|S, V]
  ce = jnp.where(valid, ce, 0.0)
  correct = correct & valid
  per_ex_ce = ce.sum(axis=1)
  return (per_ex_ce.sum() if loss is None else loss), (valid.sum(axis=1), correct.sum(axis=1), per_ex_ce)


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


def make_train_step(setup: Setup, accum: int, lr_scale: float | None = 1.0, skip_nonfinite: bool = False):
  """The jitted step (state, batch) -> (state, metrics); metrics["finite"] says whether the update is finite.

  lr_scale multiplies the learning rate (what rollbacks leave, `train.faults`; 1.0 adds no op); None makes it an
  argument, (state, batch, lr_scale), so a rollback's new scale needs no new compilation; skip_nonfinite
  (train.on_nonfinite=skip) also checks the new parameters and keeps the old parameters and optimizer state
  where the update is not finite."""
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
  grads_of = functools.partial(batch_grads, graphdef, supervised=setup.task.supervised_per_example)

  def train_step(state, batch, *scale):
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
    scale = scale[0] if lr_scale is None else (None if lr_scale == 1.0 else lr_scale)
    params, opt_state, metrics = apply_gradients(tx, schedule, params, state["opt_state"], g, loss, n, c,
                                                 state["step"], scale)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    if skip_nonfinite:
      finite &= faults.all_finite(params)
      params, opt_state = faults.keep_if(finite, (params, opt_state), (state["params"], state["opt_state"]))
    metrics["finite"] = finite
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}, metrics

  batch_sh = shard_lib.batch_sharding(setup.mesh)
  in_shardings = (setup.state_shardings, batch_sh) + ((None,) if lr_scale is None else ())
  return jax.jit(shard_lib.in_mesh(train_step, setup.mesh, setup.rules), in_shardings=in_shardings,
                 out_shardings=(setup.state_shardings, None), donate_argnums=0)


def make_eval_step(setup: Setup):
  """The jitted (params, batch) -> sums over the batch's unmasked examples {"acc_sum", "examples", "ce_sum",
  "tokens"} (`eval_metrics` turns their totals into the test metrics)."""
  graphdef = setup.graphdef

  def eval_step(params, batch):
    _, (n, c, ce) = loss_sums(graphdef, params, batch, setup.task.supervised_per_example)
    mask = batch["mask"] & (n > 0)
    per_ex_acc = c.astype(jnp.float32) / jnp.maximum(n, 1).astype(jnp.float32)
    return {"acc_sum": jnp.sum(jnp.where(mask, per_ex_acc, 0.0)), "examples": jnp.sum(mask),
            "ce_sum": jnp.sum(jnp.where(mask, ce, 0.0)), "tokens": jnp.sum(jnp.where(mask, n, 0))}

  batch_sh = shard_lib.batch_sharding(setup.mesh)
  return jax.jit(shard_lib.in_mesh(eval_step, setup.mesh, setup.rules),
                 in_shardings=(setup.state_shardings["params"], batch_sh))


def eval_batches(setup: Setup, source=None):
  """This process's share of the test set (or of `source`: the validation set), in global batches of
  train.eval_batch_size, sharded."""
  it = pipeline.make_eval_iterator(setup.task.eval_source if source is None else source,
                                   batch_size=int(setup.config.train.eval_batch_size) // jax.process_count(),
                                   shard_index=jax.process_index(), shard_count=jax.process_count())
  return (shard_lib.shard_batch(model_batch(batch, "mask"), setup.mesh) for batch in it)


def evaluate(setup: Setup, params, eval_step=None, source=None) -> dict[str, float]:
  """One pass over the test set (or `source`: the validation set): accuracy (per example, then averaged), loss
  per token, perplexity."""
  eval_step = eval_step or make_eval_step(setup)
  totals = {"acc_sum": 0.0, "examples": 0, "ce_sum": 0.0, "tokens": 0}
  for batch in eval_batches(setup, source):
    out = jax.device_get(eval_step(params, batch))
    for k in totals:
      totals[k] += out[k].item()
  return eval_metrics(totals)


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
  """The test metrics of the eval steps' sums over a test set ({"acc_sum", "examples", "ce_sum", "tokens"},
  host numbers): accuracy per example then averaged, loss per token, perplexity, examples."""
  loss = totals["ce_sum"] / max(totals["tokens"], 1)
  return {"accuracy": totals["acc_sum"] / max(totals["examples"], 1), "loss": loss,
          "perplexity": float(np.exp(min(loss, 80.0))), "examples": totals["examples"]}
