"""Language modeling on local text files (byte-level by default), one preset per family.

    bmojo-train --config configs/lm.py:bmojo --config.data.paths=/path/to/texts --workdir runs/lm
    bmojo-train --config configs/lm.py:bmojo,cpu --config.data.paths=/path/to/texts --workdir runs/lm_cpu

Presets: transformer, mamba, hybrid, bmojo_f, bmojo (default), sized for one GPU (d_model 256, 4 layers, 32 x 512
tokens per step; on a 2-core CPU that takes ~13 GB and 20-40 s a step). Add ",cpu" (e.g. `bmojo,cpu`) for a
CPU-sized run: d_model 128, 8 x 256 tokens per step. `data.paths` has no default: name your text. Scale with
--config.model.d_model / n_layers, or use `bmojo_jax.paper_config` sizes through the same fields. The byte tokenizer (vocab 259) needs model.vocab_size >= 259; with
`data.tokenizer=<file>.model` (SentencePiece) set model.vocab_size to its size.
"""

import ml_collections

from bmojo_jax import ModelConfig
from configs import common


def get_config(preset: str = "bmojo") -> ml_collections.ConfigDict:
  preset, _, size = (preset or "bmojo").partition(",")
  if size not in ("", "cpu"):
    raise ValueError(f"configs/lm.py preset suffix {size!r} is unknown; the only one is ',cpu'.")
  preset = common.family_preset("configs/lm.py", preset)
  c = common.base_config()
  window = None if preset == "transformer" else 128
  chunk = 128
  c.model = common.model_fields(ModelConfig(
      family=preset, d_model=256, vocab_size=259, n_layers=4, n_heads=4, window=window, chunk_size=chunk,
      n_fading=8, n_eidetic=32, eidetic_per_chunk=8))

  c.data = d = ml_collections.ConfigDict()
  d.kind = "text"                          # mqar | text
  d.paths = ""                             # comma-separated files / directories of training text (required)
  d.eval_paths = ""                        # comma-separated eval files; empty: hold out eval_fraction
  d.eval_fraction = 0.05                   # last fraction of packed sequences held out when no eval_paths
  d.patterns = "*.txt,*.md,*.rst,*.py"     # file patterns searched in directories
  d.tokenizer = "byte"                     # byte | path to a SentencePiece .model file
  d.seq_len = 512                          # tokens per training sequence

  t = c.train
  t.num_steps = 5000
  t.batch_size = 32
  t.eval_batch_size = 32
  t.log_every = 50
  t.eval_every = 500
  t.checkpoint_every = 500
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 200
  c.optim.end_lr_ratio = 0.1
  if size == "cpu":
    c.model.d_model, d.seq_len, t.batch_size, t.eval_batch_size = 128, 256, 8, 8
    c.model.n_heads = 2
  return c
