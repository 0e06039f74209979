"""The corpus of Debian packages (on a fake package tree) and its split by whole documents
(train/data/corpus.py, train/data/debian_texts.py)."""

import glob
import os

import pytest

from bmojo_jax.train import lm_eval
from bmojo_jax.train import tasks
from bmojo_jax.train.data import corpus
from bmojo_jax.train.data import debian_texts
from tests.lm_documents import EMMA, lm_config, write_austen, write_package_tree, write_perl_doc


@pytest.fixture
def package_tree(tmp_path):
  root = tmp_path / "root"
  write_package_tree(root)
  return root


def test_corpus_reads_the_packages_and_prepares_documents(package_tree, tmp_path):
  docs = {**debian_texts.austen_documents(str(package_tree)), **debian_texts.kjv_documents(str(package_tree))}
  assert sorted(docs) == ["austen/emma", "austen/northangerabbey", "kjv/1-samuel", "kjv/genesis",
                          "kjv/song-of-solomon"]
  emma = docs["austen/emma"]
  assert emma.startswith("EMMA\n\nBy Jane Austen\n\n\nCHAPTER I\n") and emma.endswith("\n\n\nFINIS\n")
  assert "rich,\nwith" in emma                                        # trailing spaces dropped
  assert "NOTE ON THE TEXT" not in docs["austen/northangerabbey"]    # the edition's note is not Austen's
  assert docs["kjv/genesis"] == ("Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n"
                                 "2 And the earth was without form, and void.\n\nGenesis 2\n\n"
                                 "1 Thus the heavens and the earth were finished.\n")
  out = tmp_path / "corpus"
  sources = ("austen", "kjv")
  manifest = corpus.prepare(str(out), sources, root=str(package_tree), eval_fraction=0.3)
  assert corpus.prepare(str(out), sources, root=str(package_tree), eval_fraction=0.3) == manifest   # replaces itself
  with pytest.raises(ValueError, match="holds no prepared corpus"):
    corpus.prepare(str(tmp_path), sources, root=str(package_tree))   # a folder with other things in it is left alone
  for entry in manifest["documents"]:
    path = out / entry["split"] / (entry["name"] + ".txt")
    assert path.read_text(encoding="utf-8") == docs[entry["name"]]   # whole documents, unchanged
    assert not (out / ("eval" if entry["split"] == "train" else "train") / (entry["name"] + ".txt")).exists()
  totals = manifest["totals"]
  assert totals["train"]["documents"] + totals["eval"]["documents"] == 5
  held = corpus.read_split(str(out), "eval")
  assert totals["eval"]["bytes"] == sum(len(t.encode()) for n, t in docs.items() if n in held)
  # The trainer's corpus task reads the two folders; data.paths alongside it is refused.
  config = lm_config(str(out))
  task = tasks.make_task(config)
  assert task.info["corpus_dir"] == str(out) and len(task.eval_source) >= 2
  assert lm_eval.heldout_documents(config) == corpus.read_split(str(out), "eval")
  config.data.max_eval_sequences = 1                                  # evenly spaced test sequences kept
  assert len(tasks.make_task(config).eval_source) == 1
  config.data.paths = "elsewhere"
  with pytest.raises(ValueError, match="data.kind=corpus reads data.corpus_dir"):
    tasks.make_task(config)


def test_split_is_by_whole_documents_and_deterministic():
  names = [f"kjv/book-{i}" for i in range(60)] + [f"austen/novel-{i}" for i in range(6)]
  split = corpus.split_documents(names, 0.1)
  assert split == corpus.split_documents(list(reversed(names)), 0.1)          # order does not matter
  assert set(split) == set(names) and set(split.values()) == {"train", "eval"}
  assert any(split[n] == "eval" for n in names if n.startswith("austen/"))    # each source holds one out
  held = [n for n in names if split[n] == "eval"]
  assert all(corpus.name_hash(n) < 0.1 or n == min((m for m in names if m.startswith(n.split("/")[0])),
                                                   key=corpus.name_hash) for n in held)
  # A document's side depends on its own name only (adding documents does not move it).
  more = corpus.split_documents(names + [f"kjv/extra-{i}" for i in range(20)], 0.1)
  assert all(more[n] == split[n] for n in names if n.startswith("kjv/"))
  with pytest.raises(ValueError, match="eval_fraction"):
    corpus.split_documents(names, 1.0)

def test_perl_doc_pages_are_documents(tmp_path):
  write_perl_doc(tmp_path, {"perlfunc": "=head1 NAME\n\nperlfunc - Perl builtin functions   \n",
                            "perlre": "=head1 NAME\n\nperlre - Perl regular expressions\n"})
  docs = debian_texts.perl_documents(str(tmp_path))
  assert docs == {"perl/perlfunc": "=head1 NAME\n\nperlfunc - Perl builtin functions\n",
                  "perl/perlre": "=head1 NAME\n\nperlre - Perl regular expressions\n"}   # the link read once


def test_missing_packages_are_named(tmp_path):
  # Every missing package of every source in one message, with one install line; nothing written.
  with pytest.raises(debian_texts.MissingPackageError) as err:
    corpus.prepare(str(tmp_path / "out"), root=str(tmp_path))
  assert err.value.packages == ["bible-kjv", "bible-kjv-text", "perl-doc"]
  assert "apt-get install -y --no-install-recommends bible-kjv bible-kjv-text perl-doc ;" in str(err.value)
  assert "\n" not in str(err.value)
  with pytest.raises(debian_texts.MissingPackageError,
                     match=r"apt-get install -y --no-install-recommends r-cran-janeaustenr bible-kjv bible-kjv-text ;"):
    corpus.prepare(str(tmp_path / "out"), ("austen", "kjv"), root=str(tmp_path))
  write_austen(tmp_path, {"emma": EMMA})
  with pytest.raises(debian_texts.MissingPackageError, match=r"--no-install-recommends bible-kjv bible-kjv-text ;"):
    corpus.prepare(str(tmp_path / "out"), ("austen", "kjv"), root=str(tmp_path))
  (tmp_path / debian_texts.KJV_PROGRAM).parent.mkdir(parents=True)
  (tmp_path / debian_texts.KJV_PROGRAM).write_text("")
  with pytest.raises(debian_texts.MissingPackageError, match=r"--no-install-recommends bible-kjv-text ;"):
    corpus.prepare(str(tmp_path / "out"), ("austen", "kjv"), root=str(tmp_path))
  with pytest.raises(debian_texts.MissingPackageError, match=r"--no-install-recommends bible-kjv-text perl-doc ;"):
    corpus.prepare(str(tmp_path / "out"), root=str(tmp_path))
  assert not (tmp_path / "out").exists()                       # nothing written before every source reads
  with pytest.raises(FileNotFoundError, match=r"python -m bmojo_jax.train.data.corpus prepare --out .*nowhere"):
    tasks.make_task(lm_config(str(tmp_path / "nowhere")))


@pytest.mark.skipif(not os.path.exists("/" + debian_texts.KJV_PROGRAM) or not glob.glob("/" + debian_texts.PERL_PODS),
                    reason="bible-kjv or perl-doc not installed")
def test_installed_default_packages_read():
  kjv, perl = debian_texts.kjv_documents(), debian_texts.perl_documents()
  assert len(kjv) == 66 and "In the beginning God created the heaven and the earth." in kjv["kjv/genesis"]
  assert len(perl) > 150 and "perl/perlfunc" in perl
  assert sum(len(t.encode()) for t in (*kjv.values(), *perl.values())) > 8e6


@pytest.mark.skipif(not os.path.exists("/" + debian_texts.AUSTEN_DATA), reason="r-cran-janeaustenr not installed")
def test_installed_austen_package_reads():
  docs = debian_texts.austen_documents()
  assert len(docs) == 6 and "Emma Woodhouse, handsome, clever, and rich" in docs["austen/emma"]

