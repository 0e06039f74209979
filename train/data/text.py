"""Local text files as documents: found, read strictly, and packed (`packing.py`) into a source of examples.

Documents come from local files/directories (`read_text_files`). Files are read as strict UTF-8 unless an
encoding and an error policy are named (`data.encoding`, `data.errors`): a file that does not decode raises
`TextDecodeError` naming the file and the byte offset, so no text is altered silently. Empty files found in a
directory are skipped; an empty file named on its own, or no text at all, raises `EmptyTextError` naming it.
"""

import glob
import os
from typing import Sequence

from bmojo_jax.train.data import packing
from bmojo_jax.train.data.tokenizers import ByteTokenizer
from bmojo_jax.train.data.tokenizers import Tokenizer

DEFAULT_PATTERNS = ("*.txt", "*.md", "*.rst", "*.py")
DEFAULT_ENCODING = "utf-8"
DEFAULT_ERRORS = "strict"          # or "replace" (U+FFFD), "ignore", ... (Python's codec error handlers)


class TextDecodeError(ValueError):
  """A text file is not valid in the encoding it is read with; the message names the file and byte offset."""


class EmptyTextError(ValueError):
  """A named text file, or every file found, is empty."""


def _check_paths_exist(paths: Sequence[str]) -> None:
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"Text path does not exist: {path}")


def list_text_files(paths: Sequence[str] | str,
                    patterns: Sequence[str] = DEFAULT_PATTERNS) -> list[str]:
  """Files named by `paths`: files as given, directories searched recursively for `patterns`.

  Every path is checked first: a missing one raises FileNotFoundError naming it. A directory with no
  matching file raises FileNotFoundError naming the directory and patterns. Empty files found in a directory
  are skipped; an empty file named in `paths`, or a directory whose matching files are all empty, raises
  EmptyTextError naming it. Returns a sorted, de-duplicated list (directory contents sorted; explicit files
  keep their given order first).
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [os.fspath(p) for p in paths]
  _check_paths_exist(paths)
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = set()
      for pattern in patterns:
        found.update(glob.glob(os.path.join(path, "**", pattern), recursive=True))
      found = sorted(f for f in found if os.path.isfile(f))
      if not found:
        raise FileNotFoundError(f"No files matching {list(patterns)} under directory: {path}")
      with_text = [f for f in found if os.path.getsize(f) > 0]
      if not with_text:
        raise EmptyTextError(f"No text under directory {path}: its {len(found)} file(s) matching "
                             f"{list(patterns)} are all empty.")
      files.extend(with_text)
    else:
      if os.path.getsize(path) == 0:
        raise EmptyTextError(f"Text file is empty: {path}")
      files.append(path)
  return list(dict.fromkeys(files))


def read_text_file(path: str, encoding: str = DEFAULT_ENCODING, errors: str = DEFAULT_ERRORS) -> str:
  """One file's text. Strict UTF-8 by default: bytes that do not decode raise TextDecodeError naming the file
  and the byte offset (give `encoding`, e.g. "latin-1", or `errors="replace"` to read such a file)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode(encoding, errors)
  except UnicodeDecodeError as e:
    raise TextDecodeError(
        f"{path}: not valid {encoding} at byte {e.start} ({e.reason}, bytes {data[e.start:e.end]!r}); "
        f"convert it to UTF-8 (iconv -f latin1 -t utf-8), or in training name its encoding "
        f"(--config.data.encoding=latin-1) or replace what does not decode (--config.data.errors=replace).") from None
  except LookupError as e:
    raise ValueError(f"Reading {path}: {e} (data.encoding={encoding!r}, data.errors={errors!r}).") from None


def read_text_files(paths: Sequence[str] | str, patterns: Sequence[str] = DEFAULT_PATTERNS, *,
                    encoding: str = DEFAULT_ENCODING, errors: str = DEFAULT_ERRORS) -> list[str]:
  """One document per file (see `list_text_files` and `read_text_file`)."""
  return [read_text_file(name, encoding, errors) for name in list_text_files(paths, patterns)]


def make_text_source(paths: Sequence[str] | str, seq_len: int, tokenizer: Tokenizer | None = None,
                     patterns: Sequence[str] = DEFAULT_PATTERNS, *, encoding: str = DEFAULT_ENCODING,
                     errors: str = DEFAULT_ERRORS) -> packing.PackedTextSource:
  """Local files/directories → packed source (byte tokenizer unless one is given)."""
  # Raises FileNotFoundError / EmptyTextError / TextDecodeError naming the file before any work.
  documents = read_text_files(paths, patterns, encoding=encoding, errors=errors)
  return packing.pack_documents(documents, tokenizer or ByteTokenizer(), seq_len)
