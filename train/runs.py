"""A run's files in its workdir, written the same way by the trainer and a population, and read back.

Written: config.json and tokenizer.json (`write_run_files`), each checkpoint's meta (`checkpoint_meta`), and
results.json (`results_record`, `write_results`) and eval.json as strict JSON (`write_strict_json`: JSON has no
NaN, so a non-finite figure is written as null, listed under "nonfinite" and warned about).
Read: `load_config`, `load_run` (setup, params, step of the latest checkpoint, for evaluation on the run's
data), `load_model` (the trained model and its tokenizer, for generation and language-model evaluation) and
`evaluate_run` (eval.json).
"""

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple
import warnings

from flax import nnx
import jax
import ml_collections

from bmojo_jax import LanguageModel
from bmojo_jax.config import COMPUTE_FIELDS, nest_compute

from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import faults
from bmojo_jax.train import files
from bmojo_jax.train import sharding as shard_lib
from bmojo_jax.train import steps as steps_lib
from bmojo_jax.train import tasks as tasks_lib
from bmojo_jax.train.data import mqar
from bmojo_jax.train.data import tokenizers
from bmojo_jax.train.setup import Setup, build, restore_state

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
RESULTS_FILE = "results.json"


def checkpoint_meta(setup: Setup, record: faults.FaultRecord | None = None) -> dict[str, Any]:
  """What a checkpoint records besides the state: the model config, the data config, the fault record."""
  return {"model": ckpt_lib.model_config_dict(setup.cfg), "data": setup.config.data.to_dict(),
          "faults": (record or faults.FaultRecord()).to_meta()}


def write_run_files(workdir: str, config: ml_collections.ConfigDict, tokenizer) -> None:
  """config.json (`config`, the run's own) and tokenizer.json in `workdir` (what `load_run` and `load_model`
  read back)."""
  files.write_json(files.inside(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort(sort_keys=True)))
  files.write_json(files.inside(workdir, TOKENIZER_FILE), tokenizers.save(tokenizer, workdir))


# --------------------------------------------------------------------------------------------- results
class NonFiniteResultWarning(RuntimeWarning):
  """A result (results.json, eval.json) is NaN or inf; it is written as null (and bmojo-eval exits with 1)."""


def strict_json(record: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
  """(a copy of `record` with NaN / inf floats as None, the dotted keys replaced): JSON has no NaN."""
  out, bad = {}, []
  for k, v in record.items():
    if isinstance(v, dict):
      out[k], inner = strict_json(v, f"{prefix}{k}.")
      bad += inner
    elif isinstance(v, float) and not math.isfinite(v):
      out[k] = None
      bad.append(f"{prefix}{k}")
    else:
      out[k] = v
  return out, bad


def write_strict_json(path: str, record: dict[str, Any], what: str) -> dict[str, Any]:
  """Writes `record` to `path` (by rename, `files.write_json`) as strict JSON, non-finite floats as null and
  listed under "nonfinite" (with a NonFiniteResultWarning naming `what`, e.g. "checkpoint 8"); returns what
  was written. Call on process 0."""
  record, nonfinite = strict_json(record)
  if nonfinite:
    record["nonfinite"] = nonfinite
    warnings.warn(f"{what} gives non-finite {', '.join(nonfinite)}; written as null in {path}.",
                  NonFiniteResultWarning, stacklevel=2)
  files.write_json(path, record)
  return record


def results_record(setup: Setup, *, step: int, stopped_by: str | None, wall_s: float, tokens_per_s: float,
                   evaluation: dict[str, float] | None = None, eval_step: int | None = None,
                   record: faults.FaultRecord | None = None, **extra: Any) -> dict[str, Any]:
  """results.json's record of a run that stopped after `step` updates (`stopped_by`: why before
  train.num_steps, or None): its speed, model family, task and data, devices (`setup.mesh`'s), and `extra`
  (a population's learning_rate, seed, population); with `evaluation` ({"accuracy", "loss", ...} of step
  `eval_step`) the test_* figures and whether the model collapsed (`steps.collapsed`); the fault record when
  something was done about non-finite updates; for MQAR the window and the fraction of test queries whose
  value lies beyond it."""
  devices = setup.mesh.devices.flat
  out = {"step": step, "stopped_by": stopped_by, "wall_s": wall_s, "tokens_per_s": tokens_per_s,
         "family": setup.cfg.family.value, "task": setup.task.kind, "data": dict(setup.task.info),
         "device": f"{setup.mesh.devices.size} x {devices[0].device_kind}", "platform": devices[0].platform,
         "jax_version": jax.__version__, **extra}
  if evaluation is not None:
    out.update({f"test_{k}": v for k, v in evaluation.items()}, test_step=eval_step)
    out["collapsed"] = steps_lib.collapsed(evaluation["loss"], setup.cfg.vocab_size)
  if record is not None and record != faults.FaultRecord():
    out["faults"] = record.to_meta()
  if setup.task.kind == "mqar":
    out["window"] = setup.cfg.window
    if setup.cfg.window is not None:
      out["data"]["fraction_beyond_window"] = mqar.fraction_beyond_window(setup.task.eval_source,
                                                                          setup.cfg.window)
  return out


def write_results(workdir: str, record: dict[str, Any], what: str) -> dict[str, Any]:
  """`record` (`results_record`) as `workdir`/results.json in strict JSON (`write_strict_json`; `what` names
  the evaluated state in its warning); returns what was written."""
  return write_strict_json(files.inside(workdir, RESULTS_FILE), record, what)


# --------------------------------------------------------------------------------------------- reading


def read_tokenizer_info(workdir: str) -> dict[str, Any]:
  """The run's tokenizer.json ({"kind": "none"} when absent: runs written before it, MQAR)."""
  path = files.inside(workdir, TOKENIZER_FILE)
  if not os.path.lexists(path):
    return {"kind": "none"}
  return files.read_json(path, "Rerun bmojo-train with the run's --config: it writes tokenizer.json again.")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json; one written before `ModelConfig.compute`
  or `mesh.logical_axis_rules` is read in the current layout: `upgrade_config`)."""
  path = files.inside(workdir, CONFIG_FILE)
  if not os.path.lexists(path):
    raise FileNotFoundError(f"No {CONFIG_FILE} in {workdir}: not a bmojo-train workdir (or it never started).")
  config = files.read_json(path, "Rerun bmojo-train with the run's --config (it writes config.json again), or "
                                 "pass --config to bmojo-eval.")
  _check_data_unchanged(workdir, config)
  return ml_collections.ConfigDict(upgrade_config(config))


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
  """A run config dict (config.json) of an earlier layout in the current one: the model's compute fields under
  model.compute (`nest_compute`), mesh.logical_axis_rules (the default rules where absent). A copy."""
  config = dict(config)
  if "model" in config:
    config["model"] = nest_compute(config["model"])
  if "mesh" in config:
    config["mesh"] = {"logical_axis_rules": shard_lib.rules_config(), **config["mesh"]}
  return config


def _check_data_unchanged(workdir: str, config: dict[str, Any]) -> None:
  """ValueError when config.json's data settings differ from those its latest checkpoint was trained with
  (checkpoint meta["data"]): the file was changed after training, and its data.paths could name anything (/etc).
  What a workdir leads evaluation to read is what the run trained on, or what --config names explicitly."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return
  ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=1 << 30, async_save=False)
  try:
    step = ckpt.latest_step()
    trained = None if step is None else ckpt.meta_or_none(step, "data")
  finally:
    ckpt.close()
  if trained is None:
    return
  normal = lambda d: json.loads(json.dumps(d, sort_keys=True))
  now, trained = normal(config.get("data", {})), normal(trained)
  diffs = [f"data.{k}: {now.get(k)!r} here, {trained.get(k)!r} in training" for k in sorted(set(now) | set(trained))
           if now.get(k) != trained.get(k)]
  if diffs:
    raise ValueError(f"{os.path.join(workdir, CONFIG_FILE)} was changed after training: {'; '.join(diffs[:3])}. "
                     "Put it back, or pass --config FILE to evaluate on other data.")


def _shapes(tree) -> list[tuple[str, tuple[int, ...]]]:
  return [(jax.tree_util.keystr(path), tuple(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def load_run(workdir: str, config: ml_collections.ConfigDict | None = None, devices=None, with_task: bool = True,
             overrides: dict[str, Any] | None = None):
  """(setup, params, step) of the latest checkpoint in `workdir`; raises CheckpointError / FileNotFoundError.

  `overrides` change model fields at evaluation: how it computes ("compute.scan_impl", "compute.attn_impl",
  "compute.dtype", ...: ComputeConfig fields) or sizes without parameters (n_eidetic: B'MOJO's store grown at
  inference); the parameters are the trained ones, and setup.cfg / setup.graphdef are the overridden model's.
  An override that names no field or would change the parameters raises ValueError."""
  workdir = os.path.abspath(workdir)
  config = ml_collections.ConfigDict((config or load_config(workdir)).to_dict())   # a copy: the caller's stays
  overrides = dict(overrides or {})
  config.model.compute.update(_compute_overrides(overrides))
  task = None if with_task else tasks_lib.Task("none", range(1 << 30), range(1), 1, 0)
  if not with_task:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    config.train.batch_size = config.train.eval_batch_size = jax.device_count()
    config.train.grad_accum_steps = 1
  setup = build(config, devices, task)
  ckpt = ckpt_lib.Checkpointer(files.inside(workdir, "checkpoints"), max_to_keep=int(config.train.keep_checkpoints),
                               async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"No checkpoint in {ckpt.directory}: train first (bmojo-train).")
    state = restore_state(ckpt, step, setup, None)
  finally:
    ckpt.close()
  return with_overrides(setup, state["params"], overrides), state["params"], step


def _compute_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
  """The "compute.<field>" entries of `overrides`, popped, as {field: value}; ValueError for a ComputeConfig field
  named flat (the layout before `ModelConfig.compute`) or a compute field that does not exist."""
  moved = [k for k in overrides if k in COMPUTE_FIELDS]
  if moved:
    raise ValueError(f"model override {moved[0]!r} is now compute.{moved[0]} (how the model computes).")
  compute = {k.partition(".")[2]: overrides.pop(k) for k in list(overrides) if k.startswith("compute.")}
  unknown = [k for k in compute if k not in COMPUTE_FIELDS]
  if unknown:
    raise ValueError(f"model override compute.{unknown[0]} names no ComputeConfig field; choose one of "
                     f"{list(COMPUTE_FIELDS)}.")
  return compute


def with_overrides(setup: Setup, params, overrides: dict[str, Any]) -> Setup:
  """`setup` with model fields that have no parameters changed (n_eidetic: B'MOJO's store grown at inference):
  its cfg, graphdef and config.model; ValueError if a field is unknown or would change `params`' shapes."""
  if not overrides:
    return setup
  unknown = [k for k in overrides if not hasattr(setup.cfg, k)]
  if unknown:
    raise ValueError(f"model overrides {unknown} name no ModelConfig field.")
  cfg = setup.cfg.replace(**overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  if _shapes(nnx.to_pure_dict(abstract)) != _shapes(params):
    raise ValueError(f"model overrides {overrides} change the parameters; only fields without parameters "
                     "(e.g. n_eidetic) can differ from training.")
  config = ml_collections.ConfigDict(setup.config.to_dict())
  config.model.update(overrides)
  return dataclasses.replace(setup, cfg=cfg, graphdef=graphdef, config=config)


class TrainedModel(NamedTuple):
  """A trained run's latest checkpoint as a model (`load_model`)."""
  model: LanguageModel
  tokenizer: Any                        # None for token-id runs (MQAR)
  config: ml_collections.ConfigDict     # the run's config (or the one given), without the overrides
  step: int


def load_model(workdir: str, overrides: dict[str, Any] | None = None,
               config: ml_collections.ConfigDict | None = None) -> TrainedModel:
  """The latest checkpoint of the run in `workdir` as a model on every device, with its tokenizer; no data is
  read. `overrides` change model fields as in `load_run`; `config` replaces the workdir's config.json."""
  config = config or load_config(workdir)
  setup, params, step = load_run(workdir, config, with_task=False, overrides=overrides)
  tokenizer = tokenizers.from_description(read_tokenizer_info(workdir), workdir)
  return TrainedModel(nnx.merge(setup.graphdef, params), tokenizer, config, step)


def evaluate_run(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir`; writes and returns eval.json's contents (strict JSON,
  `write_strict_json`)."""
  setup, params, step = load_run(workdir, config)
  result = {"step": step, **{f"test_{k}": v for k, v in steps_lib.evaluate(setup, params).items()}}
  if jax.process_index() == 0:
    return write_strict_json(files.inside(workdir, "eval.json"), result, f"checkpoint {step} of {workdir}")
  return strict_json(result)[0]
