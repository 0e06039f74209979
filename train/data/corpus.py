"""Text from installed Debian packages, prepared once into plain-text documents split by whole documents.

    apt-get install -y --no-install-recommends bible-kjv bible-kjv-text perl-doc    # 3 packages (+ perl)
    python -m bmojo_jax.train.data.corpus prepare --out data/corpus  # ~13 MB of text, nothing fetched
    python -m bmojo_jax.train.data.corpus info --dir data/corpus

Sources (`debian_texts.py`; a document is a whole book or a whole manual page): `kjv` (default; the King James
Bible), `perl` (default; Perl's reference documentation), `austen` (Jane Austen's novels; its package depends on
R, so not a default), `stdlib` (Python docstrings, for smoke runs and tests when the packages are absent).

`prepare` checks every source's packages before it reads anything, and names all the missing ones in one
message with the one `apt-get install` line that installs them.

A prepared corpus is `<out>/{train,eval}/<source>/<name>.txt` (UTF-8, one document a file) and
`<out>/manifest.json` (every document's name, split, characters and bytes; the packages' versions). The split
is by whole documents and deterministic: a document is held out when the hash of its name falls below
`eval_fraction`, and each source with more than one document holds out at least one (its smallest hash).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

from bmojo_jax.train.data import debian_texts

MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
DEFAULT_SOURCES = ("kjv", "perl")
DEFAULT_EVAL_FRACTION = 0.1


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
  unknown = [s for s in sources if s not in debian_texts.SOURCES]
  if unknown:
    raise ValueError(f"unknown corpus source(s) {unknown}; choose from {sorted(debian_texts.SOURCES)}.")
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MANIFEST)):
    raise ValueError(f"{out} is not empty and holds no prepared corpus ({MANIFEST}); choose a new folder.")
  missing = debian_texts.missing_packages(sources, root)
  if missing:
    raise debian_texts.MissingPackageError(list(missing), list(missing.values()))
  documents = {}
  for source in sources:
    documents.update(debian_texts.SOURCES[source].read(root))
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
  packages = [p for s in sources for p in debian_texts.SOURCES[s].packages]
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
    packages = [p for s in DEFAULT_SOURCES for p in debian_texts.SOURCES[s].packages]
    raise FileNotFoundError(f"No prepared corpus in {corpus_dir!r} ({MANIFEST} missing): run "
                            f"`{debian_texts.install_command(packages)}` and "
                            f"`python -m bmojo_jax.train.data.corpus prepare --out {corpus_dir}`.")
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
  parser = argparse.ArgumentParser(prog="python -m bmojo_jax.train.data.corpus", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="write the split documents and manifest.json")
  p.add_argument("--out", default="data/corpus", help="corpus folder (default data/corpus)")
  p.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                 help=f"comma-separated, of {sorted(debian_texts.SOURCES)}")
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
    sys.exit(f"bmojo_jax.train.data.corpus: {e}")


if __name__ == "__main__":
  main()
