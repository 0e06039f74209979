"""What a run builds from its config before the first step: `build(config) -> Setup`.

`Setup` holds the model config, the device mesh, the data task, the model's graph definition, the optimizer
and its schedule, and the train state's shardings and abstract shapes (a dict of pure pytrees {"params",
"opt_state", "step", "rng"}, placed by the logical-axis rules of `train/sharding.py`) with a jitted
`init_state` (`fresh_state`, the one initialization: a population vmaps it over its runs' seeds).
`validate_config` refuses a training setting that cannot work before anything is built; `restore_state` reads
a checkpoint into a Setup's shardings.
"""

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bmojo_jax import LanguageModel, ModelConfig
from bmojo_jax.kernel_layout import kernel_moves, kernels_to_layout
from bmojo_jax.model import stack_blocks, unstack_blocks
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import faults
from bmojo_jax.train import optim as optim_lib
from bmojo_jax.train import sharding as shard_lib
from bmojo_jax.train import tasks as tasks_lib
from bmojo_jax.train.data import packing


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """ModelConfig from `config.model` (raises bmojo_jax.ConfigError on impossible models)."""
  return ModelConfig(**config.model.to_dict())


def validate_config(config: ml_collections.ConfigDict, mesh, task: tasks_lib.Task, cfg: ModelConfig) -> None:
  """Raises ValueError naming the first training setting that cannot work."""
  t = config.train
  dp, procs = shard_lib.batch_parallelism(mesh), jax.process_count()
  for name in ("num_steps", "batch_size", "grad_accum_steps", "eval_batch_size", "log_every",
               "checkpoint_every", "keep_checkpoints"):
    if int(t[name]) < 1:
      raise ValueError(f"train.{name}={t[name]} must be >= 1.")
  for name in ("eval_every", "data_workers"):
    if int(t.get(name, 0)) < 0:
      raise ValueError(f"train.{name}={t[name]} must be >= 0.")
  shard_lib.axis_rules_of(config.mesh)   # raises ValueError naming a bad rule
  if int(config.get("seed", 0)) < 0:
    raise ValueError(f"seed={config.seed} must be >= 0.")
  if t.batch_size % t.grad_accum_steps:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps="
                     f"{t.grad_accum_steps}.")
  micro = t.batch_size // t.grad_accum_steps
  if micro % dp:
    raise ValueError(f"train.batch_size={t.batch_size} (micro-batch {micro} with grad_accum_steps="
                     f"{t.grad_accum_steps}) is not divisible by the data-parallel size {dp} "
                     f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}).")
  for name in ("batch_size", "eval_batch_size"):
    if t[name] % procs or t[name] % dp:
      raise ValueError(f"train.{name}={t[name]} is not divisible by the data-parallel size {dp} and the "
                       f"process count {procs}.")
  if not 0.0 <= t.target_accuracy <= 1.0:
    raise ValueError(f"train.target_accuracy={t.target_accuracy} must be in [0, 1].")
  optim_lib.validate(config.optim)
  faults.validate(t)
  if task.vocab_size > cfg.vocab_size:
    raise ValueError(f"The data has token ids up to {task.vocab_size - 1} but model.vocab_size="
                     f"{cfg.vocab_size}; set --config.model.vocab_size>={task.vocab_size}.")
  if isinstance(task.train_source, packing.OnTheFlySource):
    # documents packed on the fly: one document can fill many sequences, so only every host needs a document
    # of its own
    if len(task.train_source) < procs:
      raise ValueError(f"The training set has {len(task.train_source)} documents, fewer than the {procs} "
                       "processes that each read their own share of them.")
  elif len(task.train_source) // procs < t.batch_size // procs:
    raise ValueError(f"The training set has {len(task.train_source)} examples, fewer than one batch "
                     f"(train.batch_size={t.batch_size}).")


def fresh_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed) -> dict[str, Any]:
  """The train state before the first update, {"params", "opt_state", "step", "rng"}: the model initialized from
  `seed` (an int, or an int32 scalar under `jax.vmap`: a population's runs), its optimizer state, step 0."""
  model = LanguageModel(cfg, rngs=nnx.Rngs(jax.random.key(seed)))   # what nnx.Rngs(seed) does with an int
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(seed + 1))}


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step."""
  config: ml_collections.ConfigDict
  cfg: ModelConfig
  mesh: Any
  task: tasks_lib.Task
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  abstract_state: Any
  init_state: Callable[[], Any]

  @property
  def rules(self) -> shard_lib.Rules:
    """The run's logical-axis rules (`mesh.logical_axis_rules`, `train/sharding.py`)."""
    return shard_lib.axis_rules_of(self.config.mesh)


def build(config: ml_collections.ConfigDict, devices=None, task: tasks_lib.Task | None = None) -> Setup:
  """The Setup of `config` on `devices` (default: every device); `task` (default: `tasks.make_task(config)`)
  is the data. Validates first (`validate_config`)."""
  cfg = model_config(config)
  mesh = shard_lib.make_mesh(config.mesh, devices)
  task = task or tasks_lib.make_task(config)
  validate_config(config, mesh, task, cfg)
  tx, schedule = optim_lib.make_optimizer(config.optim, int(config.train.num_steps))
  seed = int(config.seed)
  init_state = lambda: fresh_state(cfg, tx, seed)
  abstract_model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(seed)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  abstract = jax.eval_shape(init_state)
  p_sh = shard_lib.param_shardings(logical, abstract["params"], mesh, shard_lib.axis_rules_of(config.mesh))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = {"params": p_sh,
               "opt_state": shard_lib.opt_state_shardings(tx, abstract["opt_state"], p_sh, mesh,
                                                          bool(config.mesh.get("shard_optimizer", False))),
               "step": replicated, "rng": replicated}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return Setup(config, cfg, mesh, task, graphdef, tx, schedule, shardings, abstract,
               jax.jit(init_state, out_shardings=shardings))


def restore_state(ckpt: ckpt_lib.Checkpointer, step: int, setup: Setup, iterator) -> Any:
  """The train state of checkpoint `step` (checked with `check_compatible`) in `setup`'s shardings.

  A checkpoint written with the other block layout (scan_layers) or the other kernel layout (kernel_layout; in_out
  for checkpoints written before the field) is restored as written and converted, so runs from before scanned
  blocks resume and evaluate as they are."""
  meta = ckpt.check_compatible(step, ckpt_lib.model_config_dict(setup.cfg))
  saved_scan = bool(meta["model"]["compute"]["scan_layers"])
  saved_layout = str(meta["model"]["compute"].get("kernel_layout", "in_out"))
  compute = setup.cfg.compute
  if saved_scan == compute.scan_layers and saved_layout == compute.kernel_layout:
    return ckpt.restore(step, setup.abstract_state, iterator)
  config = ml_collections.ConfigDict(setup.config.to_dict())
  config.model.compute.scan_layers = saved_scan
  config.model.compute.kernel_layout = saved_layout
  written = build(config, list(setup.mesh.devices.flat), setup.task)
  state = ckpt.restore(step, written.abstract_state, iterator)
  convert = []
  if saved_layout != compute.kernel_layout:    # in the written block layout: its modules give the kernels' paths
    moves = kernel_moves(nnx.eval_shape(lambda: LanguageModel(written.cfg, rngs=nnx.Rngs(0))), compute.kernel_layout)
    convert.append(lambda t: kernels_to_layout(t, moves))
  if saved_scan != compute.scan_layers:
    convert.append(stack_blocks if compute.scan_layers else (lambda t: unstack_blocks(t, setup.cfg.n_blocks)))
  for fn in convert:
    state = {**state, "params": fn(state["params"]), "opt_state": fn(state["opt_state"])}
  return jax.device_put(state, setup.state_shardings)
