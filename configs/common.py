"""Fields shared by every training config; `configs/mqar.py` and `configs/lm.py` fill in model and data.

Every field can be overridden on the command line, e.g. `--config.train.num_steps=200`.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from bmojo_jax import ComputeConfig, Family, ModelConfig
from bmojo_jax.train import sharding as shard_lib

FAMILIES = tuple(f.value for f in Family)


def family_preset(config_file: str, preset: str | None) -> str:
  """The `:<preset>` of a config file names a model family; the default is B'MOJO."""
  preset = preset or Family.BMOJO.value
  if preset not in FAMILIES:
    raise ValueError(f"{config_file} preset {preset!r} is unknown; choose one of {FAMILIES}.")
  return preset


def model_fields(cfg: ModelConfig | ComputeConfig) -> ml_collections.ConfigDict:
  """Every ModelConfig field (documented in bmojo_jax/config.py), overridable as --config.model.<field>; the
  ComputeConfig under `compute`, overridable as --config.model.compute.<field>.

  Fields whose value is None become typed placeholders so they can still be set from the command line.
  """
  types = {"n_kv_heads": int, "head_dim": int, "window": int, "chunk_size": int, "dt_rank": int, "d_ff": int}
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if value is None:
      value = config_dict.placeholder(types.get(f.name, int))
    elif hasattr(value, "value"):  # enums -> their string values
      value = value.value
    elif isinstance(value, ComputeConfig):
      value = model_fields(value)
    out[f.name] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Seed, train loop, optimizer, mesh and checkpoint fields (model and data are left to the preset)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                           # model init and the training shuffle derive from it

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 1000                   # optimizer updates in the whole run (resume continues up to it)
  t.batch_size = 64                    # global batch (all processes, all micro-batches)
  t.grad_accum_steps = 1               # micro-batches per update (batch_size / grad_accum_steps each)
  t.eval_batch_size = 128              # global eval batch; the last one is padded with masked rows
  t.log_every = 25                     # steps between train-metric records (loss, accuracy, tokens/s, lr, grad norm)
  t.eval_every = 250                   # steps between evaluations on the test set (0: only at the end)
  t.checkpoint_every = 250             # steps between checkpoints (and one at the end / on SIGTERM, SIGINT)
  t.keep_checkpoints = 3               # checkpoints kept (older ones deleted by Orbax)
  t.async_checkpointing = True         # write checkpoints in a background thread
  t.target_accuracy = 0.0              # stop early once eval accuracy >= this (0: never; Zoology 0.99); with a
                                       # validation split (MQAR data.num_val) the validation accuracy
  t.patience = 0                       # stop once this many evaluations in a row leave the validation accuracy
                                       # no better than its best + min_delta (0: never; needs data.num_val)
  t.min_delta = 0.001                  # the improvement in validation accuracy that resets the patience
  t.progress_bar = True                # tqdm bar on process 0
  t.data_workers = 0                   # grain worker processes for the training stream (0: threads)
  t.plot = True                        # write curves.png (loss and accuracy curves) at the end
  t.on_nonfinite = "stop"              # a NaN / inf update: stop | rollback | skip (docs/faults.md)
  t.rollback_lr_factor = 0.5           # learning-rate multiplier at each rollback (on_nonfinite=rollback)
  t.nonfinite_limit = 3                # rollbacks per run / dropped updates in a row, then stop anyway
  t.resume_from = config_dict.placeholder(int)  # resume from this checkpoint step, not the latest; newer ones
                                                # are moved to checkpoints_set_aside/

  c.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 1e-3               # peak learning rate
  o.warmup_steps = 0                   # linear warmup from 0 to the peak
  o.decay = "cosine"                   # after warmup: cosine | linear | constant
  o.end_lr_ratio = 0.0                 # final learning rate as a fraction of the peak
  o.weight_decay = 0.1                 # AdamW decoupled decay; not on norm scales, biases, A_log, D
  o.b1 = 0.9                           # Adam beta1
  o.b2 = 0.999                         # Adam beta2
  o.eps = 1e-8                         # Adam epsilon
  o.grad_clip_norm = 1.0               # global-norm clipping (0: none)

  c.mesh = m = ml_collections.ConfigDict()
  m.data = -1                          # data-parallel size (-1: all devices left)
  m.fsdp = 1                           # parameters sharded on "embed" over this many devices
  m.tensor = 1                         # heads / MLP / inner / vocab sharded over this many devices
  m.shard_optimizer = False            # ZeRO-1: Adam moments also split over "data" (1/data of them per device),
                                       # for one all-gather of the parameters more a step (docs/multi_device.md)
  m.logical_axis_rules = shard_lib.rules_config()  # logical axis -> "mesh,axes" ("" replicated), e.g.
                                       # --config.mesh.logical_axis_rules.embed= (train/sharding.py)
  return c
