"""MQAR (Zoology protocol, docs/evals.md) for each model family.

    bmojo-train --config configs/mqar.py --workdir runs/default            # the default: CPU-sized B'MOJO
    bmojo-train --config configs/mqar.py:hybrid --workdir runs/hybrid      # presets: one per family
    bmojo-train --config configs/mqar.py:bmojo_f --config.model.d_model=128 --workdir runs/x

Presets: transformer, mamba, hybrid, bmojo_f, bmojo (the default). The model comes from
`bmojo_jax.mqar_config(family, d_model)` with the CPU-sized settings below; `data.vocab_size`
follows `model.vocab_size` unless set explicitly.
"""

import ml_collections
from ml_collections import config_dict

from bmojo_jax import ComputeConfig, mqar_config
from bmojo_jax.configs import common


def get_config(preset: str = "bmojo") -> ml_collections.ConfigDict:
  preset = common.family_preset("configs/mqar.py", preset)
  c = common.base_config()
  # CPU-sized default: window 8 at L=64, N=8, so 92% of the queries' values lie beyond the window and recall
  # must come from memory. The eidetic store keeps k_e=8 tokens per 8-token chunk for the last 7 chunks (the
  # whole sequence); k_e=6 reached 91% and k_e=4 77% in the same budget (docs/results.md). Implementations are
  # "auto": on a CPU the sequential scan (the fastest there) and reference attention, on a GPU or TPU the Pallas
  # kernels; d_state 8 halves the scan's cost.
  window = None if preset == "transformer" else 8
  c.model = common.model_fields(mqar_config(
      preset, d_model=64, vocab_size=256, window=window, chunk_size=8, n_fading=2, n_eidetic=56,
      eidetic_per_chunk=8, d_state=8, compute=ComputeConfig(scan_impl="auto", attn_impl="auto")))

  c.data = d = ml_collections.ConfigDict()
  d.kind = "mqar"                          # mqar | text
  d.vocab_size = config_dict.placeholder(int)  # V (unset: model.vocab_size); keys 1..V/2-1, values V/2..V-1
  d.seq_len = 64                           # L, tokens per example
  d.num_kv_pairs = 8                       # N key-value pairs per example (4N <= L)
  d.power_a = 0.01                         # power-law exponent of the query positions
  d.num_train = 100_000                    # training examples (Zoology: 100k)
  d.num_test = 500                         # test examples (Zoology: 3k)
  d.train_seed = 0                         # generator seed of the training set
  d.test_seed = 1                          # generator seed of the test set (differs from train)
  d.num_val = 0                            # held-out validation examples (0: none; the study's protocol: 3000)
  d.val_seed = 2                           # generator seed of the validation set (differs from train and test)

  t = c.train
  # Sized for under 10 minutes on 2 CPU cores; scale up on a GPU.
  t.num_steps = 1000
  t.batch_size = 64
  t.eval_every = 100
  t.checkpoint_every = 250
  t.target_accuracy = 0.99                 # Zoology stops once test accuracy > 0.99
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 50
  return c
