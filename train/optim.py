"""Optimizer: AdamW, warmup then cosine / linear / constant decay, global-norm clipping, a weight-decay mask.

Weight decay (decoupled, AdamW) applies to every matrix and to the embeddings, as in Zoology; it skips
parameters whose path ends in a norm `scale`, any `*bias*`, the S4D `A_log`, the skip `D` and the linear
selection's `predictor` (`decays`): a least-squares fit to its own auxiliary loss, which decay would pull towards
predicting zero, the `input_norm` score (`bmojo_jax.memory.scoring.linear_scores`).
"""

from typing import Any, Sequence

import jax
import ml_collections
import optax

NO_DECAY_NAMES = ("scale", "A_log", "D", "predictor")  # exact leaf names that never decay; plus any "*bias*"


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def decays(path: Sequence[Any]) -> bool:
  """Whether the parameter at `path` (a jax key path or a tuple of names) gets weight decay."""
  leaf = _key_name(path[-1])
  return leaf not in NO_DECAY_NAMES and "bias" not in leaf.lower()


def weight_decay_mask(params) -> Any:
  """A tree of bools matching `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def make_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then the decay to `end_lr_ratio` at
  `num_steps` (cosine, linear, or constant)."""
  peak, warmup = float(optim.learning_rate), int(optim.warmup_steps)
  decay_steps = max(1, int(num_steps) - warmup)
  end = peak * float(optim.end_lr_ratio)
  if optim.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(optim.end_lr_ratio))
  elif optim.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif optim.decay == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.decay={optim.decay!r} is unknown; choose cosine, linear or constant.")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict,
                   num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip → AdamW with the wd mask, schedule). Gradient accumulation is done by the train step."""
  schedule = make_schedule(optim, num_steps)
  parts = []
  if optim.grad_clip_norm and optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                           weight_decay=float(optim.weight_decay), mask=weight_decay_mask))
  return optax.chain(*parts), schedule


def validate(optim: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible optimizer field."""
  if not optim.learning_rate > 0:
    raise ValueError(f"optim.learning_rate={optim.learning_rate} must be positive.")
  if optim.warmup_steps < 0:
    raise ValueError(f"optim.warmup_steps={optim.warmup_steps} must be >= 0.")
  if optim.decay not in ("cosine", "linear", "constant"):
    raise ValueError(f"optim.decay={optim.decay!r} is unknown; choose cosine, linear or constant.")
  if not 0.0 <= optim.end_lr_ratio <= 1.0:
    raise ValueError(f"optim.end_lr_ratio={optim.end_lr_ratio} must be in [0, 1].")
  if optim.get("eps", 0.0) < 0:
    raise ValueError(f"optim.eps={optim.eps} must be >= 0 (it keeps Adam's denominator away from zero).")
  if optim.weight_decay < 0:
    raise ValueError(f"optim.weight_decay={optim.weight_decay} must be >= 0.")
  if (optim.grad_clip_norm or 0.0) < 0:
    raise ValueError(f"optim.grad_clip_norm={optim.grad_clip_norm} must be >= 0 (0 turns clipping off).")
  for name in ("b1", "b2"):
    if not 0.0 <= optim[name] < 1.0:
      raise ValueError(f"optim.{name}={optim[name]} must be in [0, 1): Adam's moment decay rate.")
