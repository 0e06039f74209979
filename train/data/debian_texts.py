"""Text read from installed Debian packages, a document a whole book or a whole manual page: the corpus's sources.

  * `kjv`: the 66 books of the King James Bible (public domain, ~4.3 MB), printed by the `bible` program of
    `bible-kjv` from the data of `bible-kjv-text`: a book is its chapters ("Genesis 1") and their numbered
    verses, one verse a line.
  * `perl`: the ~200 pages of Perl's reference documentation (`perl-doc`, ~8.8 MB of English prose and code in
    POD markup, kept as written), one document a page (`perlfunc`, `perlre`, ...).
  * `austen`: Jane Austen's six novels (~4.5 MB), from `r-cran-janeaustenr`. The package keeps them
    R-serialized (`rdata.py` reads them without running R), but the package depends on R
    (`--no-install-recommends` keeps that to 8 packages).
  * `stdlib`: docstrings of Python standard-library modules: a tiny English text found on every machine, for
    smoke runs and tests when the packages are absent (not for results).

Each reader takes the root the packages are installed under (tests use a fake tree) and returns
{"<source>/<name>": text}; a missing package raises `MissingPackageError` naming it and the one `apt-get install`
line that installs it (`missing_packages` lists every missing one up front).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re
import subprocess
from typing import Callable

from bmojo_jax.train.data import rdata

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
  novels = rdata.read_r_character_vectors(rdb, rdx)
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
