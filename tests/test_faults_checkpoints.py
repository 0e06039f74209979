"""Checkpoints under faults: a failed save stops the run at that save and a rerun resumes; a checkpoint that
cannot be restored (damaged, linked out, bit rot the format does not see) is refused in two lines naming the intact
ones, and resume_from picks one of those. Runs of tests/train_runs.py's tiny config."""

import errno
import os
import random
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train_runs import assert_same_run, tiny_config
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import runs
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import trainer


# Every train() here reuses the programs compiled before, here or in another module of tiny_train_config runs.
pytestmark = pytest.mark.usefixtures("train_compilation_cache")


# ------------------------------------------------------------------------------------------------ failed saves
def _failing_meta_writes(monkeypatch, step: int, code: int):
  """Makes the background write of checkpoint `step`'s meta item fail with OSError(code), as a full disk or a
  read-only folder would (the arrays of the step are written, the checkpoint is never finalized)."""
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def save_fn(self, x, directory):
    if isinstance(x, dict) and x.get("step") == step:
      raise OSError(code, os.strerror(code), str(directory / "metadata"))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)


def test_an_unfinished_save_still_being_written_is_removed_on_a_retry(tmp_path, monkeypatch):
  """In the process whose save failed, Orbax may still land a file in the unfinished folder while the next
  Checkpointer removes it (CI: 'Directory not empty'); the removal retries instead of failing the run."""
  unfinished = tmp_path / f"6{ckpt_lib.TMP_SUFFIX}" / f"state{ckpt_lib.TMP_SUFFIX}"
  unfinished.mkdir(parents=True)
  (unfinished / "d").write_bytes(b"x")
  real_rmtree, calls = shutil.rmtree, []

  def racing_rmtree(path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 1:
      raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(unfinished))
    return real_rmtree(path, *args, **kwargs)

  monkeypatch.setattr(shutil, "rmtree", racing_rmtree)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False, writer=True)
  ckpt.close()
  assert len(calls) == 2 and ckpt.removed_unfinished == [f"6{ckpt_lib.TMP_SUFFIX}"]
  assert not (tmp_path / f"6{ckpt_lib.TMP_SUFFIX}").exists()


def test_a_removal_that_keeps_failing_is_raised(tmp_path, monkeypatch):
  (tmp_path / f"6{ckpt_lib.TMP_SUFFIX}").mkdir()

  def always_racing(path, *args, **kwargs):
    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), path)

  monkeypatch.setattr(time, "sleep", lambda seconds: None)
  monkeypatch.setattr(shutil, "rmtree", always_racing)
  with pytest.raises(OSError, match="not empty"):
    ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False, writer=True)


@pytest.mark.slow
@pytest.mark.parametrize("async_save,code,cause", [(True, errno.ENOSPC, "no space left on device"),
                                                   (False, errno.EACCES, "permission denied")])
def test_a_failed_save_stops_at_that_save_in_a_few_lines(reference, tmp_path, monkeypatch, capfd, async_save,
                                                          code, cause):
  workdir = str(tmp_path)
  _failing_meta_writes(monkeypatch, 6, code)
  seen = []

  def slow_steps(step, state):   # gives the background save of step 6 time to fail before step 7 ends
    del state
    seen.append(step)
    time.sleep(0.3 if step == 7 else 0.0)

  capfd.readouterr()
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    trainer.train(tiny_config(async_checkpointing=async_save), workdir, step_callback=slow_steps)
  assert seen[-1] in ((6, 7) if async_save else (6,))   # at the failed save, or (asynchronous) one step later
  message = str(e.value)
  assert message == (f"Saving checkpoint 6 in {workdir}/checkpoints failed: {cause}.\nIntact checkpoints: 3; the "
                     "unfinished one is removed at the next start. "
                     f"{'Free some space' if code == errno.ENOSPC else 'Make it writable'} and rerun the same "
                     "command: it resumes from step 3.")
  noise = capfd.readouterr()
  assert len((noise.out + noise.err).splitlines()) < 10, noise.err[-3000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp"))
  monkeypatch.undo()                                # the disk is free again: rerun the same command
  results = trainer.train(tiny_config(async_checkpointing=async_save), workdir)
  out = capfd.readouterr().out
  assert "Removed 6.orbax-checkpoint-tmp" in out
  assert f"resuming from step 3 (checkpoint {workdir}/checkpoints/3)" in out
  assert_same_run(workdir, results, reference)



# ---------------------------------------------------------------------------------------------- restore choice
@pytest.mark.slow
def test_resume_from_skips_a_checkpoint_that_cannot_be_restored(reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", "12", "state")):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    trainer.train(tiny_config(), workdir)
  message = str(e.value)
  assert len(message.splitlines()) <= 2 and "tensorstore_spec" not in message, message
  assert ("Intact older checkpoints: 9, 6, 3. To resume from step 9, rerun with --config.train.resume_from=9"
          in message)
  results = trainer.train(tiny_config(resume_from=9), workdir)
  out = capsys.readouterr().out
  assert f"checkpoints 12 moved to {workdir}/checkpoints_set_aside" in out
  assert f"resuming from step 9 (checkpoint {workdir}/checkpoints/9)" in out
  assert os.listdir(os.path.join(workdir, "checkpoints_set_aside")) == ["12"]
  assert_same_run(workdir, results, reference)
  assert trainer.train(tiny_config(resume_from=9), workdir) == results      # the same command again: finished
  out = capsys.readouterr().out
  assert "train.resume_from=9 was applied before" in out and "already finished at step 12" in out
  with pytest.raises(ckpt_lib.CheckpointError, match=r"resume_from=5: there is no checkpoint 5 .* intact "
                                                     r"checkpoints: 12, 9, 6, 3"):
    trainer.train(tiny_config(resume_from=5), workdir)


def test_a_symlinked_checkpoint_is_refused_naming_the_intact_ones(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir, symlinks=True)
  os.remove(os.path.join(workdir, "results.json"))
  step12 = os.path.join(workdir, "checkpoints", "12")
  shutil.move(step12, tmp_path / "elsewhere")
  os.symlink(tmp_path / "elsewhere", step12)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"is a symbolic link .*\n.*Intact older checkpoints: 9, 6, 3"):
    trainer.train(tiny_config(), workdir)
  unfinished = os.path.join(workdir, "checkpoints", f"15{ckpt_lib.TMP_SUFFIX}")
  os.remove(step12)
  os.symlink(tmp_path / "elsewhere", unfinished)           # a planted "unfinished save": only the link goes
  ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10, writer=True).close()
  assert not os.path.lexists(unfinished) and os.listdir(tmp_path / "elsewhere")



# ----------------------------------------------------------------------------------------------------- bit rot
def test_checksums_see_one_changed_word_and_a_swap():
  x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  state = {"a": x, "b": x.astype(jnp.bfloat16), "c": jnp.int32(7), "d": x.astype(jnp.float64)
           if jax.config.jax_enable_x64 else x}
  base = ckpt_lib.checksums(state)
  assert base == ckpt_lib.checksums(jax.tree.map(np.asarray, state))
  assert ckpt_lib.checksums({**state, "a": x.at[1, 2].add(1e-6)})["['a']"] != base["['a']"]
  assert ckpt_lib.checksums({**state, "a": x[::-1]})["['a']"] != base["['a']"]


@pytest.mark.slow
def test_bit_rot_in_an_array_file_is_refused_naming_the_intact_ones(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  state_dir = os.path.join(workdir, "checkpoints", "12", "state")
  arrays = [os.path.join(root, n) for root, _, names in os.walk(state_dir) for n in names
            if os.sep + "d" + os.sep in os.path.join(root, n)]
  largest = max(arrays, key=os.path.getsize)
  rng = random.Random(31)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 3)
    f.write(bytes(rng.getrandbits(8) for _ in range(min(4096, os.path.getsize(largest) // 3))))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    trainer.train(tiny_config(), workdir)
  assert len(str(e.value).splitlines()) <= 2 and "Intact older checkpoints: 9, 6, 3" in str(e.value), str(e.value)


@pytest.mark.parametrize("part, damage", [("meta/metadata", "empty"), ("meta", "remove"), ("state", "remove"),
                                          ("state/_METADATA", "garbage"), ("state/manifest.ocdbt", "empty"),
                                          ("array", "empty"), ("array", "link")])
def test_a_damaged_checkpoint_is_refused_in_two_lines_naming_the_intact_ones(reference, tmp_path, part, damage):
  """Checkpoint 12 with one part removed, emptied, overwritten or moved out and linked to: the run stops before
  training, in two lines, and reads nothing through the link."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  step12 = os.path.join(workdir, "checkpoints", "12")
  path = os.path.join(step12, part)
  if part == "array":            # the largest array file
    path = max((os.path.join(root, n) for root, _, names in os.walk(os.path.join(step12, "state")) for n in names
                if os.sep + "d" + os.sep in os.path.join(root, n)), key=os.path.getsize)
  if damage == "remove":
    shutil.rmtree(path)
  elif damage == "link":
    shutil.move(path, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", path)
  else:
    with open(path, "wb") as f:
      f.write(b"" if damage == "empty" else b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    trainer.train(tiny_config(), workdir)
  lines = str(e.value).splitlines()
  assert len(lines) == 2 and lines[0].startswith(f"Checkpoint {step12} "), lines
  assert lines[1].startswith("It was left untouched. Intact older checkpoints: 9, 6, 3."), lines


@pytest.mark.slow
def test_arrays_that_read_fine_but_differ_from_their_checksums_are_refused(reference, tmp_path):
  """Bit rot that the storage format does not catch (what random bytes in an uncompressed chunk give): checkpoint
  12's state folder replaced by a well-formed one holding other values."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  setup = setup_lib.build(tiny_config())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10, async_save=False)
  state = setup_lib.restore_state(ckpt, 12, setup, None)
  ckpt.close()
  rotten = ckpt_lib.Checkpointer(str(tmp_path / "rotten"), max_to_keep=1, async_save=False)
  rotten.save(12, {**state, "step": state["step"] + 1}, None, runs.checkpoint_meta(setup))
  rotten.close()
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12", "state"))
  shutil.copytree(tmp_path / "rotten" / "12" / "state", os.path.join(workdir, "checkpoints", "12", "state"))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/12 is corrupt: 1 array\(s\) differ from the "
                                                     r"checksums saved with them \(\['step'\]\)\.\nIt was left "
                                                     r"untouched\. Intact older checkpoints: 9, 6, 3"):
    runs.load_run(workdir)
