"""One writer per workdir: an exclusive lock that a training run holds from before its first write to its end.

Two runs on one workdir interleave their metrics and collide in their checkpoints (a finished-looking
checkpoint with no arrays in it). `WorkdirLock` takes an advisory `flock` on `<workdir>/.lock` and writes the
holder (host, PID, start time) into it. The kernel drops the lock when its process dies, however it dies, so a
lock left by a killed run is stale by construction: the next run takes it over. A second live run is refused
with a message naming the holder. (flock is local to a host; on multiple hosts process 0 holds the lock.)
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from bmojo_jax.train import files

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the lock for the block; `acquire` / `release` for explicit use."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    try:      # never through a symbolic link: the holder written below would land in the file it points to
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno != errno.ELOOP:
        raise
      raise files.UnsafePathError(f"{self.path} is a symbolic link (to {os.readlink(self.path)}); a workdir's lock is "
                             "never followed out of it. Remove the link and rerun.") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f"{os.path.dirname(self.path)} is in use by another run ({holder}). Two runs on one workdir would mix "
          "their metrics and checkpoints: wait for it, stop it (SIGTERM saves a checkpoint and exits), or use "
          "another --workdir.") from None
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)           # no holder: the file alone never blocks anyone
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
  except (ValueError, KeyError, OSError):
    return "holder unknown"
