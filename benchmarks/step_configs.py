"""The train step's config as the speed benchmarks and the scaling study build it: a paper preset (or a tiny
model for CPU smoke runs) in bf16 compute on a chosen mesh, trained on a synthetic task."""

from __future__ import annotations

from bmojo_jax import mqar_config, paper_config
from bmojo_jax.configs import common as config_common
from bmojo_jax.train import sharding as shard_lib
from bmojo_jax.train import tasks as tasks_lib

TINY = "tiny"  # a size for CPU smoke runs: the MQAR-sized model of `mqar_config` with a small vocabulary


def model_config(family: str, size: str, **overrides):
  """The paper preset `family`-`size` (or the TINY model) with overrides."""
  if size == TINY:
    return mqar_config(family, d_model=64, vocab_size=512, **overrides)
  return paper_config(family, size, **overrides)


def step_config(family: str, size: str, seq_len: int, batch: int, attn_impl: str, scan_impl: str = "pallas",
                mesh: dict[str, int] | None = None, compute: dict | None = None, **model_overrides):
  """A training config for the paper preset `family`-`size` in bf16 compute (`compute`: more ComputeConfig
  fields); `mesh` {axis: size} (unnamed axes 1) or None: the default mesh (data parallel over every device)."""
  c = config_common.base_config()
  c.model = config_common.model_fields(model_config(
      family, size, **model_overrides,
      compute=dict(dtype="bfloat16", scan_impl=scan_impl, attn_impl=attn_impl, **(compute or {}))))
  c.train.batch_size = c.train.eval_batch_size = batch
  c.train.progress_bar = False
  if mesh is not None:
    c.mesh.update({axis: int(mesh.get(axis, 1)) for axis in shard_lib.MESH_AXES})
  return c


def synthetic_task(seq_len: int, vocab: int) -> tasks_lib.Task:
  return tasks_lib.Task("synthetic", range(1 << 30), range(1), seq_len, vocab)
