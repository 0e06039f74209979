"""Byte-level language modeling, one preset per family at ~20M parameters and one token budget (docs/lm.md).

    python -m bmojo_jax.train.data.corpus prepare --out data/corpus  # once: the KJV Bible + Perl docs, 13 MB
    bmojo-train --config configs/lm.py:bmojo --config.data.kind=corpus --workdir runs/lm/bmojo       # GPU
    bmojo-train --config configs/lm.py:bmojo,cpu --config.data.kind=corpus --workdir runs/lm_cpu    # CPU
    bmojo-train --config configs/lm.py:hybrid --config.data.paths=/path/to/texts --workdir runs/lm   # own text

Presets `<family>[,<size>]`, family in transformer, mamba, hybrid, bmojo_f, bmojo (default):
  * no size (GPU): d_model 512, head_dim 64; 12 sublayers (Transformer 19.4M parameters, Mamba 20.5M) or 14 for
    the families that pair a Mamba mixer with attention (19.3M); window 256, chunk 128, M_f 8, M_e 64, k_e 16;
    1200 steps of 32 x 1024 tokens = 39.3M tokens; bf16 compute, scanned blocks, scan and attention "auto"
    (the Pallas kernels on a GPU). Sized for a GPU: use ",cpu" on a CPU.
  * ",cpu": d_model 128, 4 sublayers, 8 x 256 tokens a step, fp32 ("auto" on a CPU: the sequential scan, faster
    there than the associative one, and reference attention): 0.3 (Transformer) to 1.5 s (Mamba) a step on 2
    shared cores.
  * ",smoke": d_model 32, one block, 8 x 128 tokens, 30 steps: end-to-end checks, under a minute a family on a
    CPU, mostly compiling.
`data.kind` is "text" (`data.paths` has no default: name your text), "corpus" (the prepared corpus in
`data.corpus_dir`, split by whole books), "stream" (tokens prepared once by `bmojo-prepare` into
`data.stream_dir`, read memory-mapped), "array_record" or "tfds" (documents tokenized and packed on the fly);
docs/data.md:
    bmojo-prepare --out data/stream/corpus --corpus data/corpus --split train
    bmojo-train --config configs/lm.py:bmojo,cpu --config.data.kind=stream
        --config.data.stream_dir=data/stream/corpus --workdir runs/lm_stream
    bmojo-train ... --config.data.kind=array_record --config.data.array_record_paths=/data/c4/train
    bmojo-train ... --config.data.kind=tfds --config.data.tfds_name=pg19 --config.data.tfds_eval_split=validation
The byte tokenizer (vocab 259) needs model.vocab_size >= 259; with
`data.tokenizer=<file>.model` (SentencePiece) set model.vocab_size to its size.
"""

import ml_collections

from bmojo_jax import ComputeConfig, ModelConfig
from bmojo_jax.configs import common

SIZES = ("", "cpu", "smoke")
MIXED = ("hybrid", "bmojo_f", "bmojo")  # a Mamba mixer and attention per block: 10 d^2 where the others have 12


def get_config(preset: str = "bmojo") -> ml_collections.ConfigDict:
  preset, _, size = (preset or "bmojo").partition(",")
  if size not in SIZES:
    raise ValueError(f"configs/lm.py preset suffix {size!r} is unknown; choose ',cpu' or ',smoke' (or none).")
  family = common.family_preset("configs/lm.py", preset)
  full = family == "transformer"
  c = common.base_config()
  if size == "":
    model = ModelConfig(
        family=family, d_model=512, vocab_size=259, n_layers=14 if family in MIXED else 12, n_heads=8,
        window=None if full else 256, chunk_size=128, n_fading=8, n_eidetic=64, eidetic_per_chunk=16,
        compute=ComputeConfig(dtype="bfloat16", scan_impl="auto", attn_impl="auto", scan_layers=True))
    seq_len, batch, steps, warmup = 1024, 32, 1200, 100
  elif size == "cpu":
    model = ModelConfig(
        family=family, d_model=128, vocab_size=259, n_layers=4, n_heads=2, window=None if full else 128,
        chunk_size=64, n_fading=4, n_eidetic=16, eidetic_per_chunk=4)
    seq_len, batch, steps, warmup = 256, 8, 500, 50
  else:
    model = ModelConfig(
        family=family, d_model=32, vocab_size=259, n_layers=2, n_heads=2, window=None if full else 32,
        chunk_size=16, n_fading=2, n_eidetic=8, eidetic_per_chunk=2, d_state=8)
    seq_len, batch, steps, warmup = 128, 8, 30, 5
  c.model = common.model_fields(model)

  c.data = d = ml_collections.ConfigDict()
  d.kind = "text"                          # text | corpus | stream | array_record | tfds (docs/data.md)
  d.paths = ""                             # text: comma-separated files / directories of training text
  d.eval_paths = ""                        # text: comma-separated eval files; empty: hold out eval_fraction
  d.eval_fraction = 0.05                   # text: last fraction of packed sequences held out without eval_paths
  d.corpus_dir = "data/corpus"             # corpus: a folder of `python -m bmojo_jax.train.data.corpus prepare`
  d.patterns = "*.txt,*.md,*.rst,*.py"     # file patterns searched in directories
  d.encoding = "utf-8"                     # text: the files' encoding, e.g. latin-1 (converted to UTF-8 bytes)
  d.errors = "strict"                      # text: strict (an undecodable byte stops the run, naming file and
                                           # offset) | replace (U+FFFD) | ignore
  d.stream_dir = ""                        # stream: a folder written by `bmojo-prepare` (memory-mapped tokens)
  d.eval_stream_dir = ""                   # stream: eval stream folder; empty: hold out eval_fraction of sequences
  d.array_record_paths = ""                # array_record: comma-separated ArrayRecord files / folders (record = doc)
  d.eval_array_record_paths = ""           # array_record: eval files; empty: hold out eval_fraction of documents
  d.tfds_name = ""                         # tfds: a prepared dataset, e.g. pg19 (tfds.data_source; no download)
  d.tfds_split = "train"                   # tfds: training split
  d.tfds_eval_split = ""                   # tfds: eval split, e.g. validation; empty: hold out eval_fraction
  d.tfds_data_dir = ""                     # tfds: data_dir (empty: tfds' default)
  d.text_key = ""                          # tfds feature (empty: "text"); array_record: JSON records' text field
  d.max_eval_documents = 1000              # array_record / tfds: eval documents packed in memory (0: all)
  d.max_eval_sequences = {"": 0, "cpu": 256, "smoke": 16}[size]  # evenly spaced test sequences kept (0: all)
  d.tokenizer = "byte"                     # byte | path to a SentencePiece .model file
  d.seq_len = seq_len                      # tokens per training sequence (documents packed, kept apart)
  d.recall_fraction = 0.0                  # text / corpus: share of training sequences that are synthetic recall
                                           # documents (RULER's NIAH tasks on training text; train/data/recall.py)

  t = c.train
  t.num_steps = steps
  t.batch_size = batch
  t.eval_batch_size = batch
  t.log_every = 10 if size == "smoke" else 50
  t.eval_every = 0 if size == "smoke" else 400
  t.checkpoint_every = steps if size == "smoke" else 400
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = warmup
  c.optim.end_lr_ratio = 0.1
  return c
