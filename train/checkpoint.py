"""Orbax checkpoints of the training state and the grain iterator, with clear errors.

A checkpoint at step s (directory `<workdir>/checkpoints/<s>/`) holds three items:
    state  the train state {"params", "opt_state", "step", "rng"} (StandardSave; sharded arrays restore
           into the shardings of the abstract target)
    data   the grain iterator state (one JSON file per process; `train.data.pipeline.iterator_save_args`)
    meta   JSON: the model config, step and data settings, read first to refuse an incompatible checkpoint
Nothing here ever deletes or overwrites a checkpoint it cannot read: restoring raises `CheckpointError`
and the trainer stops, so a corrupt or incompatible run directory is never silently replaced by a fresh run;
the message lists the intact checkpoints (`intact_steps`), and `train.resume_from` picks one.

A save that fails (a full disk, no permission) raises `CheckpointSaveError` at that save, or for an
asynchronous save at the next `poll` (the trainer polls after every step): a few lines with the step, the
cause and the intact checkpoints. Orbax and TensorStore log a traceback per array and thread for such a failure
(~870 lines for one full disk); `train.orbax_logs` holds those records back (`--verbosity=0` shows them). The
training run's own Checkpointer (`writer=True`, created under the workdir lock) removes the unfinished
`<step>.orbax-checkpoint-tmp` folders of interrupted or failed saves first thing.
"""

import contextlib
import dataclasses
import errno
import glob
import os
import shutil
import time
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from bmojo_jax.config import nest_compute
from bmojo_jax.train.data import pipeline
from bmojo_jax.train import files
from bmojo_jax.train import orbax_logs
from bmojo_jax.train.files import brief as _brief


TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into this run; the message names the path and the reason."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed; the message names the step, the cause and the intact checkpoints."""


def save_failure_cause(e: BaseException | None, logged: str = "") -> str:
  """Why a save failed ("no space left on device", ...), from the exception and the first error Orbax logged."""
  return files.failure_cause(e, logged)




def _diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  keys = sorted(set(saved) | set(current))
  return [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, config {current.get(k, '<absent>')!r}"
          for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]


def _remove_unfinished(path: str, attempts: int = 20) -> None:
  """Removes an unfinished save's folder. In the process whose save just failed (a notebook, a test, a retry
  loop), Orbax may still be landing the other items' writes in it for a moment, and rmtree then meets a file
  that appeared or vanished under it ('Directory not empty', seen in CI): retry for up to ~2 s."""
  if os.path.islink(path):    # only the link goes: what it points to is outside the run
    os.remove(path)
    return
  for attempt in range(attempts):
    if not os.path.lexists(path):
      return
    try:
      shutil.rmtree(path)
      return
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.ENOENT) or attempt == attempts - 1:
        raise
      time.sleep(0.1)


def _checksum(x: jax.Array) -> jax.Array:
  """A uint32 checksum of an array's bits: sum_i bits_i * (2 i + 1) mod 2**32 over its words (64-bit values as
  two words). Integer sums wrap around exactly, so any sharding and reduction order give the same value; the odd
  multipliers make any change of one word, and most swaps, change it."""
  width = x.dtype.itemsize * 8
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif width <= 32:
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)   # [..., 2]
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, d) * jnp.uint32(stride % 2**32)
    stride *= words.shape[d]
  return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums_of(tree):
  return jax.tree.map(_checksum, tree)


def checksums(state: Any) -> dict[str, int]:
  """{key path: checksum} of every array of `state`, computed where the arrays live (one transfer of scalars)."""
  sums = jax.device_get(_checksums_of(state))
  return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(sums)}


class Checkpointer:
  """Save / restore of (train state, grain iterator, meta) under `directory`, keeping the last `max_to_keep`.

  writer: the training run's own Checkpointer, created under the workdir lock: unfinished saves
  (`<step>.orbax-checkpoint-tmp`) are removed on creation (by process 0) and listed in `removed_unfinished`."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True, writer: bool = False):
    self.directory = os.path.abspath(directory)
    if os.path.islink(self.directory):
      raise CheckpointError(f"{self.directory} is a symbolic link (to {os.readlink(self.directory)}); checkpoints "
                            "are only written and read inside the workdir. Replace it with a folder and rerun.")
    self.removed_unfinished: list[str] = []
    if writer and jax.process_index() == 0:   # before the first save of any process (Orbax's own cleanup is lazy)
      for path in sorted(glob.glob(os.path.join(glob.escape(self.directory), f"*{TMP_SUFFIX}*"))):
        _remove_unfinished(path)
        self.removed_unfinished.append(os.path.basename(path))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    orbax_logs.ERROR_LOGS.watch(self.directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None    # the step of a save not yet checked (asynchronous saves)
    self._failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, iterator: Any | None, meta: dict[str, Any]) -> None:
    """Starts saving checkpoint `step` (finishes it when saves are synchronous); CheckpointSaveError if this or
    the previous save failed."""
    self.wait()
    meta = dict(meta, step=int(step), checksums=checksums(state))   # checked at restore: bit rot is refused
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if iterator is not None:
      items["data"] = pipeline.iterator_save_args(iterator)
    orbax_logs.ERROR_LOGS.take()
    self._pending = int(step)
    try:
      self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # Orbax raises ValueError, OSError, ... from its writers
      raise self._save_failed(e) from None
    if not self.manager.is_saving_in_progress():
      self.wait()

  def poll(self) -> None:
    """Checks an asynchronous save once it has finished (CheckpointSaveError if it failed); never blocks."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight, then checks it: CheckpointSaveError if it failed or was not finalized."""
    if self._pending is None:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from None
    if not os.path.isdir(self.step_dir(self._pending)):   # Orbax logs some failures instead of raising them
      raise self._save_failed(None)
    self._pending = None

  def _save_failed(self, e: BaseException | None) -> CheckpointSaveError:
    step, self._pending, self._failed = self._pending, None, True
    cause = save_failure_cause(e, orbax_logs.ERROR_LOGS.take())
    return CheckpointSaveError(f"Saving checkpoint {step} in {self.directory} failed: {cause}.\n"
                               f"{self.advice(files.FIXES.get(cause, 'Fix it'), unfinished=True)}")

  def advice(self, fix: str, unfinished: bool = False) -> str:
    """What to do after a write of the run failed: the intact checkpoints, `fix` (e.g. "Free some space") and
    where a rerun resumes."""
    intact = self.intact_steps()
    resume = (f"rerun the same command: it resumes from step {intact[0]}" if intact else
              "rerun the same command: it starts from scratch")
    removed = "; the unfinished one is removed at the next start" if unfinished else ""
    return f"Intact checkpoints: {', '.join(map(str, intact)) or 'none'}{removed}. {fix} and {resume}."

  def read_meta(self, step: int) -> dict[str, Any]:
    self._check_plain(step)
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

  def meta_or_none(self, step: int, *keys: str) -> Any:
    """meta[keys[0]][keys[1]]... of checkpoint `step`, or None when unreadable or absent."""
    try:
      value = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      for k in keys:
        value = value[k]
      return value
    except Exception:  # pylint: disable=broad-except
      return None

  def check_compatible(self, step: int, model_config: dict[str, Any]) -> dict[str, Any]:
    """Raises CheckpointError listing the model fields that differ from the checkpoint's; how the model is
    computed (its "compute", a ComputeConfig) may differ. Returns the checkpoint's meta with its model in the
    current layout (`nest_compute`: meta of the previous layout has the compute fields flat), whose
    model["compute"]["scan_layers"] tells its parameter layout (False for checkpoints written before the
    field)."""
    meta = self.read_meta(step)
    model = nest_compute(meta["model"])
    model["compute"] = {"scan_layers": False, **model.get("compute", {})}
    meta["model"] = model
    strip = lambda d: {k: v for k, v in d.items() if k != "compute"}
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
      items["data"] = pipeline.iterator_restore_args(iterator)
    self._check_plain(step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(f"Checkpoint {self.step_dir(step)} could not be restored ({_brief(e)}): it is "
                            "corrupt or was written by an incompatible optimizer/model.\n"
                            f"{self._older(step)}") from e
    saved = self.meta_or_none(step, "checksums")        # None for checkpoints written before checksums
    if saved is not None:
      bad = [k for k, v in checksums(restored["state"]).items() if saved.get(k) != v]
      if bad:
        raise CheckpointError(f"Checkpoint {self.step_dir(step)} is corrupt: {len(bad)} array(s) differ from the "
                              f"checksums saved with them ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})."
                              f"\n{self._older(step)}")
    return restored["state"]

  def _check_plain(self, step: int) -> None:
    """CheckpointError if checkpoint `step`, or anything in it, is a symbolic link: a checkpoint is read only
    from inside the workdir."""
    path = self.step_dir(step)
    links = [path] if os.path.islink(path) else []
    for root, dirs, names in os.walk(path):
      links += [os.path.join(root, n) for n in dirs + names if os.path.islink(os.path.join(root, n))]
    if links:
      raise CheckpointError(f"Checkpoint {path} is not a plain folder: {links[0]} is a symbolic link (to "
                            f"{os.readlink(links[0])}); a checkpoint is never read from outside its workdir.\n"
                            f"{self._older(step)}")

  def intact_steps(self) -> list[int]:
    """Finished checkpoints whose meta and state metadata read fine, newest first (unfinished saves and
    checkpoints with unreadable metadata are left out; array contents are not read)."""
    self.manager.reload()
    return [s for s in sorted(self.manager.all_steps(), reverse=True) if self._intact(s)]

  def _intact(self, step: int) -> bool:
    if os.path.islink(self.step_dir(step)) or self.meta_or_none(step, "model") is None:
      return False
    reader = ocp.StandardCheckpointHandler()
    try:
      reader.metadata(epath.Path(self.step_dir(step)) / "state")
      return True
    except Exception:  # pylint: disable=broad-except
      return False
    finally:
      reader.close()

  def _older(self, step: int) -> str:
    """What to do about an unusable checkpoint `step`: the intact older ones, and how to resume from one."""
    older = [s for s in self.intact_steps() if s < step]
    if not older:
      return (f"It was left untouched, and no older checkpoint is intact: move {self.step_dir(step)} away to "
              "start over, or use another --workdir.")
    return (f"It was left untouched. Intact older checkpoints: {', '.join(map(str, older))}. To resume from step "
            f"{older[0]}, rerun with --config.train.resume_from={older[0]} (newer checkpoints are moved to "
            f"{self.directory}_set_aside/).")

  def set_aside(self, steps: list[int]) -> str:
    """Moves the checkpoints `steps` to `<directory>_set_aside/` (process 0; a suffix keeps earlier ones)."""
    dest = f"{self.directory}_set_aside"
    self.wait()
    if jax.process_index() == 0:
      os.makedirs(dest, exist_ok=True)
      for s in steps:
        target, n = os.path.join(dest, str(s)), 1
        while os.path.exists(target):
          target, n = os.path.join(dest, f"{s}.{n}"), n + 1
        os.rename(self.step_dir(s), target)
    multihost_utils.sync_global_devices("bmojo_checkpoint_set_aside")
    self.manager.reload()
    return dest

  def close(self) -> None:
    """Waits for the save in flight (CheckpointSaveError if it failed) and closes the manager."""
    try:
      self.wait()
    finally:
      with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
        self.manager.close()   # after a failed save Orbax raises its error again here


def model_config_dict(model_config: Any) -> dict[str, Any]:
  """JSON-able dict of a ModelConfig (enums as their string values, its ComputeConfig under "compute")."""
  out = {}
  for f in dataclasses.fields(model_config):
    v = getattr(model_config, f.name)
    out[f.name] = model_config_dict(v) if dataclasses.is_dataclass(v) else v.value if hasattr(v, "value") else v
  return out
