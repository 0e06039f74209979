"""Random-access document sources: `len(source)` documents, `source[i]` -> str. Nothing is read up front.

  * `TextFileDocuments(paths, patterns)`: one document per local file (as `text.read_text_files`, lazily).
  * `ArrayRecordDocuments(paths)`: one document per record of ArrayRecord files, read through grain's
    `ArrayRecordDataSource`; a record is UTF-8 text, or with `text_key` a JSON object whose `text_key` field
    is the text.
  * `TfdsDocuments(name, split, data_dir, text_key)`: a prepared tfds dataset through
    `tfds.data_source` (random access over its ArrayRecord files; needs `tensorflow_datasets`, never downloads).

All pickle (grain worker processes and `prepare`'s pool reopen them by their arguments).
"""

import json
import os
from typing import Any, Sequence

from bmojo_jax.train import files
from bmojo_jax.train.data import text as text_lib


def _decode(value: Any, where: str) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, str):
    return value
  if hasattr(value, "item"):   # numpy scalar / 0-d array of bytes or str
    return _decode(value.item(), where)
  raise ValueError(f"{where} is {type(value).__name__}, not text (bytes or str).")


class TextFileDocuments:
  """One document per file named by `paths` (files, or directories searched for `patterns`)."""

  def __init__(self, paths: Sequence[str] | str, patterns: Sequence[str] = text_lib.DEFAULT_PATTERNS):
    self.files = text_lib.list_text_files(paths, patterns)   # FileNotFoundError naming a missing path

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> str:
    return text_lib.read_text_file(self.files[int(i)])   # strict UTF-8: TextDecodeError names file and byte

  def describe(self) -> str:
    return f"{len(self.files)} text files"


def _array_record_files(paths: Sequence[str] | str) -> list[str]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path) if ".array_record" in f)
      if not found:
        raise FileNotFoundError(f"No *.array_record* files in directory: {path}")
      files.extend(found)
    elif not os.path.exists(path):
      raise FileNotFoundError(f"ArrayRecord file does not exist: {path}")
    else:
      files.append(path)
  if not files:
    raise ValueError("No ArrayRecord files given (data.array_record_paths is empty).")
  return files


class _Reopened:
  """A source over a file handle: pickled as its arguments (`_STATE`) and reopened where it is unpickled (in
  grain's worker processes), `_open` setting `_source`."""
  _STATE: tuple[str, ...] = ()

  def _open(self) -> None:
    raise NotImplementedError

  def __getstate__(self):
    return {k: getattr(self, k) for k in self._STATE}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._source)


class ArrayRecordDocuments(_Reopened):
  """One document per record of ArrayRecord files (grain.sources.ArrayRecordDataSource, random access)."""
  _STATE = ("files", "text_key")

  def __init__(self, paths: Sequence[str] | str, text_key: str = ""):
    self.files = _array_record_files(paths)
    self.text_key = text_key
    self._open()

  def _open(self) -> None:
    import grain  # pylint: disable=g-import-not-at-top
    self._source = grain.sources.ArrayRecordDataSource(self.files)

  def __getitem__(self, i: int) -> str:
    record = self._source[int(i)]
    if not self.text_key:
      return _decode(record, f"ArrayRecord record {i}")
    try:
      obj = json.loads(record)
    except ValueError as e:
      raise ValueError(f"ArrayRecord record {i} is not a JSON object (text_key={self.text_key!r} says it "
                       f"should be): {e}") from None
    if self.text_key not in obj:
      raise ValueError(f"ArrayRecord record {i} has no field {self.text_key!r}; fields: {sorted(obj)}.")
    return _decode(obj[self.text_key], f"ArrayRecord record {i} field {self.text_key!r}")

  def describe(self) -> str:
    return f"ArrayRecord {','.join(self.files)}"


def import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tfds sources need the optional `tensorflow_datasets` package: "
                      "pip install 'bmojo_jax[tfds]' (tensorflow itself is not needed for data_source).") from e
  return tfds


class TfdsDocuments(_Reopened):
  """Documents of a prepared tfds dataset through `tfds.data_source(name, split=..., data_dir=...)`.

  Never downloads: the dataset must be prepared (in ArrayRecord file format, tfds' default since 4.9) in
  `data_dir` or tfds' default directory. `record[text_key]` is the text.
  """
  _STATE = ("name", "split", "data_dir", "text_key")

  def __init__(self, name: str, split: str, *, data_dir: str | None = None, text_key: str = "text"):
    if data_dir and not os.path.exists(data_dir):
      raise FileNotFoundError(f"tfds data_dir does not exist: {data_dir}")
    self.name, self.split, self.data_dir, self.text_key = name, split, data_dir or None, text_key or "text"
    self._open()

  def _open(self) -> None:
    tfds = import_tfds()
    try:
      self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
    except Exception as e:  # tfds raises several types when data is absent.
      raise FileNotFoundError(
          f"tfds dataset {self.name!r} split {self.split!r} is not prepared (as ArrayRecord) in "
          f"{self.data_dir or 'the default tfds data_dir'} ({files.brief(e)}). Prepare it once with `tfds build "
          f"{self.name} --file_format=array_record` (needs network), or use `bmojo-prepare`.") from e

  def __getitem__(self, i: int) -> str:
    record = self._source[int(i)]
    if self.text_key not in record:
      raise ValueError(f"tfds {self.name!r} records have no feature {self.text_key!r}; features: "
                       f"{sorted(record)}; set data.text_key.")
    return _decode(record[self.text_key], f"tfds {self.name!r} record {i} feature {self.text_key!r}")

  def describe(self) -> str:
    return f"tfds {self.name}:{self.split}" + (f" in {self.data_dir}" if self.data_dir else "")


class DocumentSlice:
  """Documents [start, stop) of a document source (a held-out tail, a train head)."""

  def __init__(self, source, start: int, stop: int):
    if not 0 <= start <= stop <= len(source):
      raise ValueError(f"DocumentSlice [{start}, {stop}) out of range [0, {len(source)}].")
    self.source, self.start, self.stop = source, int(start), int(stop)

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int) -> str:
    if not 0 <= int(i) < len(self):
      raise IndexError(f"index {i} out of range [0, {len(self)}).")
    return self.source[self.start + int(i)]

  def describe(self) -> str:
    return f"documents [{self.start}, {self.stop}) of {self.source.describe()}"
