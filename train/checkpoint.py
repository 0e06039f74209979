"""Orbax checkpoints of the training state and the grain iterator, with clear errors.

A checkpoint at step s (directory `<workdir>/checkpoints/<s>/`) holds three items:
    state  the train state {"params", "opt_state", "step", "rng"} (StandardSave; sharded arrays restore
           into the shardings of the abstract target)
    data   the grain iterator state (one JSON file per process; `train.data.iterator_save_args`)
    meta   JSON: the model config, step and data settings, read first to refuse an incompatible checkpoint
Nothing here ever deletes or overwrites a checkpoint it cannot read: restoring raises `CheckpointError`
and the trainer stops, so a corrupt or incompatible run directory is never silently replaced by a fresh run.
"""

import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp

from bmojo_jax.config import COMPUTE_FIELDS
from train import data as data_lib


def _brief(e: Exception, limit: int = 240) -> str:
  """The exception's type and the first line of its message (TensorStore errors span dozens of lines)."""
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {first[:limit]}{'…' if len(first) > limit else ''}"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into this run; the message names the path and the reason."""


def _diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  keys = sorted(set(saved) | set(current))
  return [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, config {current.get(k, '<absent>')!r}"
          for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]


class Checkpointer:
  """Save / restore of (train state, grain iterator, meta) under `directory`, keeping the last `max_to_keep`."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, iterator: Any | None, meta: dict[str, Any]) -> None:
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=int(step))))
    if iterator is not None:
      items["data"] = data_lib.iterator_save_args(iterator)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = restored["meta"]
    except Exception as e:  # Orbax raises many types for missing / corrupt files.
      raise CheckpointError(f"Checkpoint {self.step_dir(step)} is unreadable (corrupt or not written by "
                            f"bmojo-train): reading its 'meta' item failed with {_brief(e)}.\n"
                            f"{self._older(step)}") from e
    if not isinstance(meta, dict) or "model" not in meta:
      raise CheckpointError(f"Checkpoint {self.step_dir(step)} has no model config in its 'meta' item; it "
                            "was left untouched; move it away or use another --workdir.")
    return meta

  def check_compatible(self, step: int, model_config: dict[str, Any]) -> dict[str, Any]:
    """Raises CheckpointError listing the model fields that differ from the checkpoint's; fields that only
    choose how the model is computed (`COMPUTE_FIELDS`) may differ. Returns the checkpoint's meta, whose
    model["scan_layers"] tells its parameter layout (False for checkpoints written before the field)."""
    meta = self.read_meta(step)
    meta["model"] = {"scan_layers": False, **meta["model"]}
    strip = lambda d: {k: v for k, v in d.items() if k not in COMPUTE_FIELDS}
    diffs = _diff(strip(meta["model"]), strip(model_config))
    if diffs:
      raise CheckpointError(f"Checkpoint {self.step_dir(step)} was written for a different model; "
                            f"differing fields: {'; '.join(diffs)}. Use the checkpoint's config (config.json "
                            "in the workdir) or another --workdir; the checkpoint was left untouched.")
    return meta

  def restore(self, step: int, abstract_state: Any, iterator: Any | None) -> Any:
    """Restores the state into `abstract_state`'s shapes/shardings and `iterator` in place."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if iterator is not None:
      items["data"] = data_lib.iterator_restore_args(iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(f"Checkpoint {self.step_dir(step)} could not be restored ({_brief(e)}): it is "
                            "corrupt or was written by an incompatible optimizer/model.\n"
                            f"{self._older(step)}") from e
    return restored["state"]

  def _older(self, step: int) -> str:
    """What to do about an unusable checkpoint `step`: which other checkpoints there are, and how to use one."""
    older = sorted((s for s in self.all_steps() if s < step), reverse=True)
    readable = [s for s in older if self._meta_readable(s)]
    if not readable:
      return (f"It was left untouched, and no older checkpoint with a readable meta exists: move "
              f"{self.step_dir(step)} away to start over, or use another --workdir.")
    return (f"It was left untouched. Older checkpoints whose meta reads fine: {', '.join(map(str, readable))}. "
            f"To resume from step {readable[0]}, move this one aside (mv {self.step_dir(step)} "
            f"{self.directory}_set_aside_{step}) and rerun the same command.")

  def _meta_readable(self, step: int) -> bool:
    try:
      self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return True
    except Exception:  # pylint: disable=broad-except
      return False

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def model_config_dict(model_config: Any) -> dict[str, Any]:
  """JSON-able dict of a ModelConfig (enums as their string values)."""
  out = {}
  for f in dataclasses.fields(model_config):
    v = getattr(model_config, f.name)
    out[f.name] = v.value if hasattr(v, "value") else v
  return out
