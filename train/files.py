"""The one home for how the trainer, eval and prepare touch their folder's files: never through a symbolic link,
whole or not at all, and failures in words.

A workdir (or a stream folder) is a boundary: every file the code writes or reads by a name relative to it is
reached through `inside`, which refuses a name that leads outside (an absolute path, `..`, or a symbolic link
anywhere below the folder), and is opened with O_NOFOLLOW, so a link planted between the check and the open is
refused too. JSON files (results.json, eval.json, config.json, progress.json, meta.json) are written to a
temporary file and renamed over the old one (`write_json`): a process killed mid-write leaves the old file
whole. A file that cannot be written (a full disk, no permission) raises `WriteError` with the cause in words;
one that cannot be read as JSON raises `UnreadableFileError` naming the file and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from typing import Any

_CAUSES = ((errno.ENOSPC, "No space left on device", "no space left on device"),
           (errno.EDQUOT, "Disk quota exceeded", "disk quota exceeded"),
           (errno.EACCES, "Permission denied", "permission denied"),
           (errno.EPERM, "Operation not permitted", "permission denied"),
           (errno.EROFS, "Read-only file system", "read-only file system"))
FIXES = {"no space left on device": "Free some space", "disk quota exceeded": "Free some space",
         "permission denied": "Make it writable", "read-only file system": "Make it writable"}


def brief(e: BaseException | str, limit: int = 240) -> str:
  """The exception's type and the first line of its message, without TensorStore's spec dump."""
  text = re.sub(r"\s*\[(tensorstore_spec|source locations)='.*?'\]", "", str(e)).strip()
  first = text.splitlines()[0] if text else ""
  first = f"{first[:limit]}{'…' if len(first) > limit else ''}"
  return first if isinstance(e, str) else f"{type(e).__name__}: {first}"


def failure_cause(e: BaseException | None, logged: str = "") -> str:
  """Why a write failed: "no space left on device", "permission denied", ... or the error's first line, from
  the exception (its chain included) and `logged`, the text of an error a library logged for it."""
  texts, seen = [logged], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      texts.insert(0, f"os_error_code='{e.errno}' {e.strerror}")
    texts.append(str(e))
    e = e.__cause__ or e.__context__
  text = " ".join(texts)
  for code, message, cause in _CAUSES:
    if message in text or f"os_error_code='{code}'" in text or f"[Errno {code}]" in text:
      return cause
  first = next((t for t in texts[1:] + texts[:1] if t.strip()), "")
  return f"other error: {brief(first)}" if first else "unknown error (nothing was reported)"


class WriteError(RuntimeError):
  """Writing a file failed (a full disk, no permission); the message names the file and the cause."""

  def __init__(self, path: str, e: BaseException | None):
    self.path, self.cause = path, failure_cause(e)
    super().__init__(f"Writing {path} failed: {self.cause}.")

  @property
  def fix(self) -> str:
    return FIXES.get(self.cause, "Fix it")


class UnsafePathError(ValueError):
  """A name that leads outside its folder (absolute, `..`, or through a symbolic link): refused."""


class UnreadableFileError(ValueError):
  """A file of the folder that cannot be read back (empty, truncated, not JSON); the message says what to do."""


def inside(root: str, name: str, source: str | None = None) -> str:
  """root/name, after checking that it stays inside `root`: `name` is relative, has no `..` out of it, and no
  existing component below `root` is a symbolic link (the last one included). UnsafePathError otherwise;
  `source` is the file `name` was read from (e.g. "tokenizer.json"), for the message."""
  name = str(name)
  path = os.path.normpath(os.path.join(root, name))
  rel = os.path.relpath(path, root)
  if os.path.isabs(name) or rel == ".." or rel.startswith(".." + os.sep):
    where = f"{os.path.join(root, source)} names {name!r}, which is" if source else f"{name!r} is"
    raise UnsafePathError(f"{where} outside {root}; refusing to use it (a folder's files may only name files "
                          "inside it).")
  current = root
  for part in ([] if rel == "." else rel.split(os.sep)):
    current = os.path.join(current, part)
    if os.path.islink(current):
      raise UnsafePathError(
          f"{current} is a symbolic link (to {os.readlink(current)}); refusing to follow it out of {root}: "
          f"{'the name in ' + source if source else 'a file the run writes or reads'} must be a plain file or "
          "folder inside it. Remove the link and rerun.")
  return path


def open_nofollow(path: str, mode: str = "r"):
  """open(path, mode) that refuses a symbolic link at `path` itself (O_NOFOLLOW): UnsafePathError."""
  flags = {"r": os.O_RDONLY, "rb": os.O_RDONLY, "r+b": os.O_RDWR, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
           "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
           "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}[mode]
  try:
    fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UnsafePathError(f"{path} is a symbolic link; refusing to follow it. Remove the link and rerun.") from None
    raise
  return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def write_json(path: str, obj: Any, indent: int = 2) -> str:
  """Writes `obj` as JSON to `path` through a temporary file in the same folder and a rename: a reader never
  sees half a file, a symbolic link at `path` is replaced (not followed), and a failed write (WriteError)
  leaves the old file whole. The temporary files of writers killed before their rename are removed. Returns
  path."""
  tmp = f"{path}.tmp{os.getpid()}"
  folder, name = os.path.split(path)
  for stale in os.listdir(folder or "."):
    if re.fullmatch(re.escape(name) + r"\.tmp\d+", stale):
      os.remove(os.path.join(folder, stale))
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=indent)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException as e:   # a full disk, or an object that is not JSON (TypeError, raised as it is)
    if os.path.lexists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise WriteError(path, e) from None
    raise
  return path


def read_json(path: str, fix: str) -> Any:
  """The JSON in `path` (opened without following a symbolic link); UnreadableFileError naming it and `fix`
  (what to do, e.g. "delete it to evaluate again") when it is empty, truncated or not JSON."""
  try:
    with open_nofollow(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    if isinstance(e, UnsafePathError):
      raise
    size = os.path.getsize(path)
    why = "it is empty" if size == 0 else f"it is not valid JSON ({brief(str(e))})"
    raise UnreadableFileError(f"{path} cannot be read: {why}. {fix}") from None


def sha256(path: str) -> str:
  """The hex SHA-256 of a file's contents, read a megabyte at a time."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
