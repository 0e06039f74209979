"""Language-model evaluation of a trained run: perplexity against context length, and RULER's NIAH tasks.

Perplexity (`context_perplexity`). The held-out documents are cut into windows of the longest context,
`max(factors) x T` tokens (T the training length): BOS + the document's tokens, window j holding tokens
[jC, jC + C] of a document, whole windows only. Only when no document is that long is the held-out text
concatenated (documents joined by a blank line, one BOS) and cut the same way; the result says which
(`eval_text`). One forward pass over these windows scores every position; as every family is causal, the
first c tokens of a window give what a window of c tokens alone gives, so for each context c = f x T:
  * `eval[c]`: the perplexity of every token of the windows' first c tokens (windows of c tokens, loss on all);
  * `eval_last[c]`: the perplexity of their last T tokens, positions [c - T, c) (how well position c - 1 is
    predicted with c tokens of context);
  * `bits_per_token[c]`: eval[c] in bits (bits per byte with the byte tokenizer).
One compile per model, and every context is measured on the same windows.

NIAH: `train/niah.py` (RULER's tasks, after docs/evals.md).

Documents (`documents_from`): the run's held-out documents by default, or any text files / folders (`text`,
`bmojo-eval --lm_text`) or prepared token stream (`stream`, `--lm_stream`) as perplexity windows and NIAH essay.

`evaluate_lm_run(workdir, ...)` runs both on a bmojo-train run and writes `<workdir>/lm_eval.json`, one record
{family, params, tokens_trained, eval: {context: ppl}, niah: {task: {length: score}}, ...}; `plot_records` draws
perplexity against context and NIAH score against length for records of several runs.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bmojo_jax import LanguageModel
from bmojo_jax.param_count import count_params
from bmojo_jax.train.data import text as text_lib
from bmojo_jax.train import files
from bmojo_jax.train import niah as niah_lib
from bmojo_jax.train import runs
from bmojo_jax.train import tasks as tasks_lib

RESULT_FILE = "lm_eval.json"


# ----------------------------------------------------------------------------------------------- perplexity
def document_windows(documents: Sequence[str | np.ndarray], tokenizer, length: int,
                     max_windows: int | None = None) -> tuple[np.ndarray, str]:
  """(int32[W, length + 1] windows, "documents" | "concatenated"); see the module docstring.

  A document is text (tokenized here) or its token ids (a stream's document, `stream.StreamDocuments`; read only
  where a window is kept). With more than max_windows windows, max_windows evenly spaced ones are kept
  (deterministic)."""
  docs = [np.asarray(tokenizer.encode(d), np.int32) if isinstance(d, str) else d for d in documents]
  source = "documents"
  if not any(len(d) >= length for d in docs):
    if all(isinstance(d, str) for d in documents):
      docs = [np.asarray(tokenizer.encode("\n\n".join(documents)), np.int32)]
    else:                                     # token ids: joined by the blank line's ids
      blank = np.asarray(tokenizer.encode("\n\n"), np.int32)
      docs = [np.concatenate([x for d in docs for x in (blank, np.asarray(d, np.int32))][1:])]
    source = "concatenated"
  spans = [(i, j) for i, d in enumerate(docs) for j in range(len(d) // length)]   # BOS + n ids: n // length
  if not spans:
    raise ValueError(f"The evaluation documents (held-out text, --lm_text or --lm_stream) are shorter than one "
                     f"window of {length} + 1 tokens: lower the context lengths or give more text.")
  if max_windows is not None and len(spans) > max_windows:
    spans = [spans[i] for i in np.unique(np.linspace(0, len(spans) - 1, max_windows).round().astype(int))]

  def window(doc, j: int) -> np.ndarray:                 # [BOS, *doc][j * length : (j + 1) * length + 1]
    if j == 0:
      return np.concatenate([[tokenizer.bos_id], np.asarray(doc[:length], np.int32)]).astype(np.int32)
    return np.asarray(doc[j * length - 1:(j + 1) * length], np.int32)

  return np.stack([window(docs[i], j) for i, j in spans]), source


def position_nll(model: LanguageModel, windows: np.ndarray, batch_size: int) -> np.ndarray:
  """The NLL at each position averaged over the windows, fp64 [C], of windows [W, C + 1]: the model reads
  tokens [0, C) and predicts tokens [1, C]. One compile: the last batch is padded."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, tokens):                                                           # [B, C + 1] -> [B, C]
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

  n, c = windows.shape[0], windows.shape[1] - 1
  total = np.zeros((c,), np.float64)
  for start in range(0, n, batch_size):
    batch = windows[start:start + batch_size]
    rows = batch.shape[0]
    if rows < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - rows, axis=0)])
    total += np.asarray(jax.device_get(nll(state, jnp.asarray(batch))), np.float64)[:rows].sum(axis=0)
  return total / n


def context_perplexity(model: LanguageModel, tokenizer, documents: Sequence[str | np.ndarray], *, seq_len: int,
                       factors: Sequence[int] = (1, 2, 4, 8, 16), max_windows: int | None = 64,
                       batch_tokens: int = 65536) -> dict[str, Any]:
  """Perplexity at contexts f x seq_len for f in factors, on the same windows; see the module docstring."""
  factors = sorted({int(f) for f in factors})
  if not factors or factors[0] < 1:
    raise ValueError(f"context factors must be positive integers, got {factors}.")
  longest = factors[-1] * seq_len
  windows, source = document_windows(documents, tokenizer, longest, max_windows)
  nll = position_nll(model, windows, max(1, batch_tokens // longest))
  out = {"eval": {}, "eval_last": {}, "bits_per_token": {}}
  for f in factors:
    c = f * seq_len
    every, last = nll[:c].mean(), nll[c - seq_len:c].mean()
    out["eval"][str(c)] = float(np.exp(min(every, 80.0)))
    out["eval_last"][str(c)] = float(np.exp(min(last, 80.0)))
    out["bits_per_token"][str(c)] = float(every / math.log(2))
  out.update(eval_text=source, eval_windows=int(windows.shape[0]), eval_window_tokens=longest)
  return out


# ------------------------------------------------------------------------------------------------ runs
def heldout_documents(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{name: text} of a run's held-out documents, in name order: the eval split of its corpus (data.kind=corpus)
  or its data.eval_paths files; whole documents are needed, so a run that held out a fraction of its packed
  sequences instead is refused."""
  d = config.data
  if d.kind == "corpus":
    from bmojo_jax.train.data import corpus  # pylint: disable=g-import-not-at-top
    return corpus.read_split(str(d.corpus_dir), "eval")
  if d.kind == "text":
    _, eval_paths, patterns = tasks_lib.text_paths(config)
    if eval_paths:
      files = text_lib.list_text_files(eval_paths, patterns)
      decoding = tasks_lib.text_decoding(config)
      return {f: t for f, t in zip(files, text_lib.read_text_files(files, patterns, **decoding))}
  raise ValueError(f"data.kind={d.kind!r} without data.eval_paths has no held-out documents; length and NIAH "
                   "evaluation needs data.kind=corpus or data.eval_paths.")


def documents_from(config: ml_collections.ConfigDict, tokenizer, *, text: str | Sequence[str] | None = None,
                   stream: str | None = None) -> tuple[Sequence[str | np.ndarray], str, list[str]]:
  """(documents, what they are, their names) to evaluate on: the run's held-out documents
  (`heldout_documents`), or the files of `text` (files or folders, comma-separated or a list; read as the run
  reads text: data.patterns, data.encoding, data.errors), or the documents of the token stream `stream`
  (`bmojo-prepare`; its tokenizer must be the run's). Missing paths, folders without text, and a stream of
  another tokenizer raise one-line errors naming them."""
  if text is not None and stream is not None:
    raise ValueError("give the evaluation documents as text files or as a token stream, not both "
                     "(--lm_text or --lm_stream).")
  if stream is not None:
    from bmojo_jax.train.data import stream as stream_lib  # pylint: disable=g-import-not-at-top
    from bmojo_jax.train.data import tokenizers  # pylint: disable=g-import-not-at-top
    docs = stream_lib.StreamDocuments(str(stream))
    recorded = docs.meta["tokenizer"]
    tokenizers.check(recorded, tokenizer, f"The token stream in {stream} was prepared with another tokenizer "
                     "than the run's", f"Prepare the text again with the run's: bmojo-prepare --out <new folder> "
                     f"--tokenizer {config.data.tokenizer} --text <files>.")
    return docs, f"token stream {os.path.abspath(stream)} ({len(docs)} documents, in stream order)", []
  if text is not None:
    paths = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else [str(p) for p in text]
    if not paths:
      raise ValueError(f"no text files or folders named (got {text!r}).")
    patterns = tasks_lib.text_patterns(config)
    found = text_lib.list_text_files(paths, patterns)
    texts = text_lib.read_text_files(found, patterns, **tasks_lib.text_decoding(config))
    return texts, f"text files {', '.join(os.path.abspath(p) for p in paths)} (a folder's files in name order)", found
  documents = heldout_documents(config)
  return list(documents.values()), "the run's held-out documents (in name order)", list(documents)


def _decoded(documents: Sequence[str | np.ndarray], tokenizer):
  """The documents as text, one at a time (a stream's token ids decoded when reached)."""
  for doc in documents:
    yield doc if isinstance(doc, str) else tokenizer.decode(np.asarray(doc))


def parse_multiples(flag: str, text: str) -> list[int]:
  """"1,2,4" -> [1, 2, 4], the multiples of the training length of --lm_lengths / --niah_lengths (named `flag`)."""
  values = [x.strip() for x in text.split(",") if x.strip()]
  if not all(re.fullmatch(r"\d+", x) and int(x) >= 1 for x in values):
    raise ValueError(f"--{flag}={text!r}: give multiples of the training length as positive integers, e.g. 1,2,4.")
  return [int(x) for x in values]


def parse_overrides(spec: str) -> dict[str, Any]:
  """"n_eidetic=256,compute.attn_impl=reference" -> {"n_eidetic": 256, "compute.attn_impl": "reference"}."""
  out = {}
  for item in (s.strip() for s in (spec or "").split(",")):
    if item:
      name, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"model override {item!r} is not field=value.")
      out[name.strip()] = int(value) if re.fullmatch(r"-?\d+", value.strip()) else value.strip()
  return out


def evaluate_lm_run(workdir: str, *, factors: Sequence[int] = (1, 2, 4, 8, 16), niah: bool = False,
                    niah_factors: Sequence[int] = (1, 2, 4), niah_samples: int = 50, gen_tokens: int = 128,
                    max_windows: int | None = 64, batch_tokens: int = 65536, overrides: dict | None = None,
                    seed: int = 0, out: str | None = None, config: ml_collections.ConfigDict | None = None,
                    text: str | Sequence[str] | None = None, stream: str | None = None) -> dict[str, Any]:
  """Perplexity at factors x T and (with niah) the NIAH tasks at niah_factors x T for the run in `workdir`
  (with `config` instead of its config.json if given), on its held-out documents or on those of `text` / `stream`
  (`documents_from`); the record is written to `out` (default <workdir>/lm_eval.json) and returned."""
  model, tokenizer, config, step = runs.load_model(workdir, overrides, config)
  if tokenizer is None:
    raise ValueError(f"{workdir} is not a text run (no tokenizer): language-model evaluation needs one.")
  cfg, seq_len = model.cfg, int(config.data.seq_len)
  documents, about, names = documents_from(config, tokenizer, text=text, stream=stream)
  record = {"family": cfg.family.value, "variant": ",".join(f"{k}={v}" for k, v in (overrides or {}).items()),
            "params": count_params(cfg), "tokens_trained": int(step) * int(config.train.batch_size) * seq_len,
            "step": int(step), "seq_len": seq_len, "workdir": os.path.abspath(workdir),
            "tokenizer": str(config.data.tokenizer), "eval_documents": about, "heldout_documents": names, "notes": []}
  if factors:
    try:
      record.update(context_perplexity(model, tokenizer, documents, seq_len=seq_len,
                                       factors=factors, max_windows=max_windows, batch_tokens=batch_tokens))
    except (ValueError, jax.errors.JaxRuntimeError) as e:   # no text that long; out of device memory
      record["notes"].append(f"perplexity not run: {str(e).splitlines()[0]}")
  if niah:
    lengths = [int(f) * seq_len for f in niah_factors]
    essay = niah_lib.essay_haystack(_decoded(documents, tokenizer), max(lengths, default=0))
    scores, notes = niah_lib.run_niah(model, tokenizer, essay, lengths=lengths, samples=niah_samples,
                                      gen_tokens=gen_tokens, seed=seed)
    record.update(niah=scores, niah_samples=niah_samples, niah_gen_tokens=gen_tokens,
                  niah_haystack=f"essay: {about}, whitespace collapsed; noise; needles")
    record["notes"] += notes
  out = out or files.inside(workdir, RESULT_FILE)
  if jax.process_index() == 0:
    files.write_json(out, record, indent=1)
  return record


# ----------------------------------------------------------------------------------------------- plots
def _label(record: dict) -> str:
  return record["family"] + (f" ({record['variant']})" if record.get("variant") else "")


def plot_records(records: Sequence[dict], ppl_path: str | None, niah_path: str | None) -> list[str]:
  """Perplexity against context (one line per record) and NIAH score against length (one panel per task);
  returns the files written (a figure with nothing to draw is skipped). ImportError without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the plots need matplotlib: pip install matplotlib") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  with_ppl = [r for r in records if r.get("eval")]
  if ppl_path and with_ppl:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("eval", "eval_last"), ("every token of the window", "last T tokens")):
      contexts = sorted({int(c) for r in with_ppl for c in r[key]})
      for r in with_ppl:
        x = sorted(int(c) for c in r[key])
        ax.plot(x, [r[key][str(c)] for c in x], marker="o", label=_label(r))
      ax.axvline(with_ppl[0]["seq_len"], color="gray", ls=":", lw=1)
      ax.set_xscale("log", base=2)
      ax.set_xticks(contexts, [str(c) for c in contexts])
      ax.set(xlabel="context (tokens; dotted: training length)", ylabel="perplexity", title=title)
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ppl_path, dpi=120)
    plt.close(fig)
    written.append(ppl_path)
  with_niah = [r for r in records if r.get("niah")]
  if niah_path and with_niah:
    names = [t for t in niah_lib.TASK_NAMES if any(t in r["niah"] for r in with_niah)]
    cols = 4
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(13, 3 * ((len(names) + 3) // 4)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
      for r in with_niah:
        points = sorted((int(k), v) for k, v in r["niah"].get(name, {}).items() if v is not None)
        if points:
          ax.plot(*zip(*points), marker="o", label=_label(r))
      lengths = sorted({int(k) for r in with_niah for k in r["niah"].get(name, {})})
      ax.set_xscale("log", base=2)
      ax.set_xticks(lengths, [str(n) for n in lengths])
      ax.set(title=name, xlabel="length (tokens)", ylabel="score", ylim=(-3, 103))
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
      ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(niah_path, dpi=120)
    plt.close(fig)
    written.append(niah_path)
  return written
