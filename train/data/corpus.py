"""Text from installed Debian packages, prepared once into plain-text documents split by whole documents.

    apt-get install -y --no-install-recommends bible-kjv bible-kjv-text perl-doc    # 3 packages (+ perl)
    python -m train.data.corpus prepare --out data/corpus        # ~13 MB of text, nothing fetched
    python -m train.data.corpus info --dir data/corpus

Sources (a document is a whole book or a whole manual page):
  * `kjv` (default): the 66 books of the King James Bible (public domain, ~4.3 MB), printed by the `bible`
    program of `bible-kjv` from the data of `bible-kjv-text`: a book is its chapters ("Genesis 1") and their
    numbered verses, one verse a line.
  * `perl` (default): the ~200 pages of Perl's reference documentation (`perl-doc`, ~8.8 MB of English
    prose and code in POD markup, kept as written), one document a page (`perlfunc`, `perlre`, ...).
  * `austen`: Jane Austen's six novels (~4.5 MB), from `r-cran-janeaustenr`. The package keeps them
    R-serialized in `data/Rdata.rdb` (one compressed block per novel, a character vector of lines) indexed by
    `Rdata.rdx` (gzip); `read_r_character_vectors` reads them without running R, but the package depends on R
    (`--no-install-recommends` keeps that to 8 packages). Not a default for that reason.
  * `stdlib`: docstrings of Python standard-library modules: a tiny English text found on every machine, for
    smoke runs and tests when the packages are absent (not for results).

`prepare` checks every source's packages before it reads anything, and names all the missing ones in one
message with the one `apt-get install` line that installs them.

A prepared corpus is `<out>/{train,eval}/<source>/<name>.txt` (UTF-8, one document a file) and
`<out>/manifest.json` (every document's name, split, characters and bytes; the packages' versions). The split
is by whole documents and deterministic: a document is held out when the hash of its name falls below
`eval_fraction`, and each source with more than one document holds out at least one (its smallest hash).
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import glob
import gzip
import hashlib
import importlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from typing import Callable

MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
DEFAULT_SOURCES = ("kjv", "perl")
DEFAULT_EVAL_FRACTION = 0.1
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
KJV_DATA = "usr/lib/bible.data"
KJV_PROGRAM = "usr/bin/bible"
PERL_PODS = "usr/share/perl/*/pod"                   # perl-doc; the folder is named by Perl's version


class MissingPackageError(FileNotFoundError):
  """Debian packages are not installed; the message names every one and the one command installing them."""

  def __init__(self, packages, missing):
    packages = [packages] if isinstance(packages, str) else list(packages)
    missing = [missing] if isinstance(missing, str) else list(missing)
    super().__init__(f"missing Debian package{'s' if len(packages) > 1 else ''} {', '.join(packages)} "
                     f"({', '.join(missing)} not found). Install with one line (as root): "
                     f"{install_command(packages)} ; then prepare the corpus again.")
    self.packages = packages


def install_command(packages) -> str:
  """The apt-get line installing `packages` (no recommended extras: r-cran-janeaustenr would pull ~700)."""
  return "apt-get install -y --no-install-recommends " + " ".join(packages)


# ------------------------------------------------------------------------------------- R serialization
class _RReader:
  """Reads R's XDR serialization ('X' format, versions 2 and 3) for the types a data package holds: character,
  integer, logical and double vectors, lists, pairlists (attributes) and symbols."""

  def __init__(self, data: bytes):
    if data[:2] != b"X\n":
      raise ValueError(f"not R XDR serialization (starts with {data[:2]!r})")
    self.data, self.pos, self.refs = data, 2, []
    version = self.int()
    self.int(), self.int()                            # writer's and minimal reader's R versions
    if version == 3:
      n = self.int()
      self.pos += n                                   # native encoding name

  def int(self) -> int:
    (value,) = struct.unpack_from(">i", self.data, self.pos)
    self.pos += 4
    return value

  def vector(self, fmt: str, n: int) -> list:
    values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
    self.pos += n * struct.calcsize(fmt)
    return values

  def item(self):
    flags = self.int()
    kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if kind == 254:                                   # NULL
      return None
    if kind == 255:                                   # reference to an earlier symbol
      return self.refs[(flags >> 8 or self.int()) - 1]
    if kind == 1:                                     # symbol: its name
      name = self.item()
      self.refs.append(name)
      return name
    if kind == 9:                                     # CHARSXP: one string (length -1 is NA)
      n = self.int()
      if n == -1:
        return None
      text = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
      self.pos += n
      return text
    if kind == 2:                                     # pairlist node: [(tag, value), ...]
      if has_attr:
        self.item()                                   # the node's own attributes: not needed
      tag = self.item() if has_tag else None
      head = [(tag, self.item())]
      return head + (self.item() or [])
    if kind in (10, 13, 14, 16, 19, 20):              # logical, integer, double, character, list, expression
      n = self.int()
      if kind in (10, 13):
        values = self.vector("i", n)
      elif kind == 14:
        values = self.vector("d", n)
      else:
        values = [self.item() for _ in range(n)]
      if has_attr:
        names = dict(self.item() or []).get("names")
        if names is not None:
          return dict(zip(names, values))
      return values
    raise ValueError(f"R serialization type {kind} is not supported by this reader")


def _unpack_block(block: bytes, compression: int) -> bytes:
  """One object of a lazy-load database: 4-byte length, then zlib (compression 1) or a type byte and data."""
  if compression == 1:
    return zlib.decompress(block[4:])
  kind, body = block[4:5], block[5:]
  return {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)


def read_r_character_vectors(rdb: str, rdx: str) -> dict[str, list[str]]:
  """The character vectors of an R lazy-load database (`Rdata.rdb` with its index `Rdata.rdx`), by name."""
  with open(rdx, "rb") as f:
    index = _RReader(gzip.decompress(f.read())).item()
  compression = int(index["compressed"][0]) if index.get("compressed") else 1
  out = {}
  with open(rdb, "rb") as f:
    data = f.read()
  for name, (offset, length) in index["variables"].items():
    value = _RReader(_unpack_block(data[offset:offset + length], compression)).item()
    if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
      out[name] = ["" if v is None else v for v in value]
  return out


# ------------------------------------------------------------------------------------------ sources
def clean_text(text: str) -> str:
  """Unix newlines, no trailing spaces, at most two blank lines in a row, no blank lines at either end."""
  lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
  return re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n") + "\n"


def _drop_editor_note(text: str) -> str:
  """Northanger Abbey ends with the edition's note on the text; it is not Austen's."""
  head, sep, _ = text.partition("\nA NOTE ON THE TEXT\n")
  return head if sep else text


def austen_documents(root: str = "/") -> dict[str, str]:
  """Austen's novels from r-cran-janeaustenr: {"austen/<novel>": text}."""
  data = os.path.join(root, AUSTEN_DATA)
  rdb, rdx = os.path.join(data, "Rdata.rdb"), os.path.join(data, "Rdata.rdx")
  for path in (rdb, rdx):
    if not os.path.exists(path):
      raise MissingPackageError("r-cran-janeaustenr", path)
  novels = read_r_character_vectors(rdb, rdx)
  return {f"austen/{name}": clean_text(_drop_editor_note("\n".join(lines))) for name, lines in novels.items()}


def _slug(title: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def kjv_documents(root: str = "/") -> dict[str, str]:
  """The King James Bible's books through `bible` (bible-kjv) on bible-kjv-text's data: {"kjv/<book>": text}.

  `bible` prints each chapter as a heading "<Book> <n>" and its verses as "  <v> <text>"; a book is the
  chapters up to the next book's first heading, with the verse indentation dropped."""
  program, data = os.path.join(root, KJV_PROGRAM), os.path.join(root, KJV_DATA)
  if not os.path.exists(program):
    raise MissingPackageError("bible-kjv", program)
  if not os.path.exists(data):
    raise MissingPackageError("bible-kjv-text", data)
  out = subprocess.run([program, "-p", os.path.dirname(data), "-l100000", "Gen1:1-Rev22:21"],
                       capture_output=True, text=True, check=True).stdout
  books: dict[str, list[str]] = {}
  current = None
  for line in out.split("\n"):
    heading = re.fullmatch(r"(\S.*) (\d+)", line)
    if heading:
      current = heading.group(1)
      books.setdefault(current, [])
    if current is not None:
      books[current].append(line.strip())
  if not books:
    raise ValueError(f"{program} printed no chapter headings; is {data} the KJV text of bible-kjv-text?")
  return {f"kjv/{_slug(title)}": clean_text("\n".join(lines)) for title, lines in books.items()}


def perl_documents(root: str = "/") -> dict[str, str]:
  """Perl's reference documentation from perl-doc, one page a document: {"perl/<page>": text} (POD as written).

  The pod folder is `usr/share/perl/<version>/pod`; Debian also links `<major.minor>` to it, so folders are
  taken once by their real path, and a page found under two versions is taken from the newest."""
  folders = sorted({os.path.realpath(f) for f in glob.glob(os.path.join(root, PERL_PODS))})
  pages = {}
  for folder in folders:                         # sorted by version string: later folders overwrite earlier
    for path in sorted(glob.glob(os.path.join(folder, "*.pod"))):
      pages[os.path.basename(path)[:-len(".pod")]] = path
  if not pages:
    raise MissingPackageError("perl-doc", os.path.join(root, PERL_PODS, "*.pod"))
  docs = {}
  for page, path in sorted(pages.items()):
    with open(path, encoding="utf-8") as f:
      text = clean_text(f.read())
    if text.strip():
      docs[f"perl/{_slug(page)}"] = text
  return docs


STDLIB_MODULES = ("abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
                  "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
                  "functools", "heapq", "html", "http", "inspect", "io", "itertools", "json", "logging",
                  "mailbox", "math", "operator", "os", "pathlib", "pickle", "random", "re", "shutil",
                  "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
                  "unittest", "urllib", "uuid", "zipfile")


def stdlib_documents(root: str = "/") -> dict[str, str]:
  """Docstrings of standard-library modules and their public functions and classes: {"stdlib/<module>": text}.

  A stand-in corpus (~0.3 MB) for smoke runs and tests on machines without the packages."""
  del root
  docs = {}
  for name in STDLIB_MODULES:
    module = importlib.import_module(name)
    parts = [module.__doc__ or ""]
    for attr in sorted(dir(module)):
      obj = getattr(module, attr, None)
      if not attr.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == name and obj.__doc__:
        parts.append(f"{attr}\n\n{obj.__doc__}")
    text = clean_text("\n\n".join(p.strip() for p in parts if p.strip()))
    if text.strip():
      docs[f"stdlib/{name}"] = text
  return docs


@dataclasses.dataclass(frozen=True)
class Source:
  packages: tuple[str, ...]                     # Debian packages it reads (apt-get install -y ...)
  read: Callable[[str], dict[str, str]]         # root -> {name: text}
  needs: tuple[tuple[str, str], ...] = ()       # (package, path under root, glob allowed) checked up front


SOURCES = {
    "kjv": Source(("bible-kjv", "bible-kjv-text"), kjv_documents,
                  (("bible-kjv", KJV_PROGRAM), ("bible-kjv-text", KJV_DATA))),
    "perl": Source(("perl-doc",), perl_documents, (("perl-doc", PERL_PODS + "/perlfunc.pod"),)),
    "austen": Source(("r-cran-janeaustenr",), austen_documents,
                     (("r-cran-janeaustenr", AUSTEN_DATA + "/Rdata.rdb"),
                      ("r-cran-janeaustenr", AUSTEN_DATA + "/Rdata.rdx"))),
    "stdlib": Source((), stdlib_documents),
}


def missing_packages(sources, root: str = "/") -> dict[str, str]:
  """{package: the path it would install, not found} for every package that `sources` need and `root` lacks."""
  missing = {}
  for source in sources:
    for package, path in SOURCES[source].needs:
      if package not in missing and not glob.glob(os.path.join(root, path)):
        missing[package] = os.path.join(root, path)
  return missing


# -------------------------------------------------------------------------------------------- split
def name_hash(name: str) -> float:
  """A document name's position in [0, 1): the first 8 bytes of its SHA-256."""
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(names, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> dict[str, str]:
  """{name: "train" | "eval"} by whole documents: held out when name_hash < eval_fraction; a source (the part
  of a name before "/") with more than one document and none held out holds out its smallest hash."""
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1).")
  names = sorted(set(names))
  split = {n: "eval" if name_hash(n) < eval_fraction else "train" for n in names}
  by_source: dict[str, list[str]] = {}
  for n in names:
    by_source.setdefault(n.split("/")[0], []).append(n)
  for members in by_source.values():
    if len(members) > 1 and all(split[n] == "train" for n in members):
      split[min(members, key=name_hash)] = "eval"
  return split


# -------------------------------------------------------------------------------------- prepare / read
def _package_versions(packages) -> dict[str, str]:
  versions = {}
  for package in packages:
    try:
      out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
      versions[package] = out.stdout.strip() if out.returncode == 0 else "unknown"
    except FileNotFoundError:
      versions[package] = "unknown"
  return versions


def prepare(out: str, sources=DEFAULT_SOURCES, *, eval_fraction: float = DEFAULT_EVAL_FRACTION,
            root: str = "/") -> dict:
  """Reads `sources`, writes the split documents and manifest.json under `out` (replacing an earlier corpus
  there; any other non-empty folder is refused); returns the manifest. Every source is read before anything is
  written."""
  unknown = [s for s in sources if s not in SOURCES]
  if unknown:
    raise ValueError(f"unknown corpus source(s) {unknown}; choose from {sorted(SOURCES)}.")
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MANIFEST)):
    raise ValueError(f"{out} is not empty and holds no prepared corpus ({MANIFEST}); choose a new folder.")
  missing = missing_packages(sources, root)
  if missing:
    raise MissingPackageError(list(missing), list(missing.values()))
  documents = {}
  for source in sources:
    documents.update(SOURCES[source].read(root))
  split = split_documents(documents, eval_fraction)
  for name in SPLITS:
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
  entries = []
  for name in sorted(documents):
    text = documents[name]
    path = os.path.join(out, split[name], name + ".txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    entries.append({"name": name, "split": split[name], "chars": len(text), "bytes": len(text.encode("utf-8"))})
  packages = [p for s in sources for p in SOURCES[s].packages]
  manifest = {"sources": list(sources), "packages": _package_versions(packages), "eval_fraction": eval_fraction,
              "split_rule": "eval when sha256(name)[:8] / 2^64 < eval_fraction; each source holds out >= 1",
              "documents": entries,
              "totals": {s: {"documents": sum(e["split"] == s for e in entries),
                             "bytes": sum(e["bytes"] for e in entries if e["split"] == s)} for s in SPLITS}}
  with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def load_manifest(corpus_dir: str) -> dict:
  """The manifest of a prepared corpus; FileNotFoundError saying how to prepare one when there is none."""
  path = os.path.join(corpus_dir, MANIFEST)
  if not os.path.exists(path):
    packages = [p for s in DEFAULT_SOURCES for p in SOURCES[s].packages]
    raise FileNotFoundError(f"No prepared corpus in {corpus_dir!r} ({MANIFEST} missing): run "
                            f"`{install_command(packages)}` and `python -m train.data.corpus prepare --out "
                            f"{corpus_dir}`.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def split_dir(corpus_dir: str, split: str) -> str:
  """The folder of one split of a prepared corpus (checked)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; choose one of {SPLITS}.")
  manifest = load_manifest(corpus_dir)
  if not manifest["totals"][split]["documents"]:
    raise ValueError(f"The corpus in {corpus_dir} has no {split} documents.")
  return os.path.join(corpus_dir, split)


def read_split(corpus_dir: str, split: str) -> dict[str, str]:
  """{name: text} of one split, in name order."""
  manifest = load_manifest(corpus_dir)
  folder = split_dir(corpus_dir, split)
  docs = {}
  for entry in manifest["documents"]:
    if entry["split"] == split:
      with open(os.path.join(folder, entry["name"] + ".txt"), encoding="utf-8") as f:
        docs[entry["name"]] = f.read()
  return docs


def summary(manifest: dict) -> str:
  t = manifest["totals"]
  held = [e["name"] for e in manifest["documents"] if e["split"] == "eval"]
  return (f"{len(manifest['documents'])} documents, {(t['train']['bytes'] + t['eval']['bytes']) / 1e6:.2f} MB: "
          f"train {t['train']['documents']} ({t['train']['bytes']:,} bytes), eval {t['eval']['documents']} "
          f"({t['eval']['bytes']:,} bytes): {', '.join(held)}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m train.data.corpus", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="write the split documents and manifest.json")
  p.add_argument("--out", default="data/corpus", help="corpus folder (default data/corpus)")
  p.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help=f"comma-separated, of {sorted(SOURCES)}")
  p.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION)
  p.add_argument("--root", default="/", help="where the packages are installed (tests use a fake tree)")
  i = sub.add_parser("info", help="print a prepared corpus's size and held-out documents")
  i.add_argument("--dir", default="data/corpus")
  args = parser.parse_args(argv)
  try:
    if args.command == "prepare":
      sources = [s.strip() for s in args.sources.split(",") if s.strip()]
      manifest = prepare(args.out, sources, eval_fraction=args.eval_fraction, root=args.root)
      print(f"{args.out}: {summary(manifest)}")
    else:
      print(f"{args.dir}: {summary(load_manifest(args.dir))}")
  except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as e:
    sys.exit(f"train.data.corpus: {e}")


if __name__ == "__main__":
  main()
