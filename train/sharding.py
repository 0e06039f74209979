"""Device mesh and logical-axis sharding: one table maps the model's logical axis names to mesh axes.

Mesh axes: "data" (pure data parallel: parameters replicated), "fsdp" (data parallel with parameters and
optimizer state sharded along "embed"), "tensor" (model parallel over heads / MLP / inner / vocab).
Batches are split over ("data", "fsdp"). A logical axis whose size the mesh axis does not divide, or whose
mesh axis an earlier dimension of the same array already uses, stays replicated.

ZeRO-1 (`mesh.shard_optimizer`, off by default): the Adam moments are also split over "data", where their
parameters are replicated, so optimizer bytes per device fall as 1/data (`zero_spec`); each device updates its
1/data of the parameters and the step all-gathers the new ones (docs/multi_device.md: the collectives it adds).

The rules are the run config's `mesh.logical_axis_rules` (MaxText style, overridable on the command line:
`--config.mesh.logical_axis_rules.embed=` leaves the parameters' "embed" replicated, `...heads=tensor,fsdp`
splits heads over both), one entry per logical axis name, a comma-separated list of mesh axes ("" for
replicated); the default is `LOGICAL_RULES` (`rules_config`). `axis_rules_of` reads them back. The default
table and `logical_to_mesh` live in `pallas_kernels/sharding.py`, where the model's activation constraints and
the Pallas kernels read the context's rules too; the train and eval steps are traced `in_mesh`, so those see
the mesh and the run's rules.
"""

import functools
from typing import Any, Callable, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from bmojo_jax.pallas_kernels.sharding import (BATCH_AXES, LOGICAL_RULES, MESH_AXES, Rules, axis_rules, logical_to_mesh,
                                     use_mesh)

__all__ = ["BATCH_AXES", "LOGICAL_RULES", "MESH_AXES", "Rules", "axis_rules_of", "batch_parallelism",
           "batch_sharding", "in_mesh", "logical_to_mesh", "make_mesh", "mesh_shape", "opt_state_shardings",
           "param_shardings", "rules_config", "shard_batch", "zero_spec"]


def rules_config(rules: Rules = LOGICAL_RULES) -> ml_collections.ConfigDict:
  """`rules` as the run config's mesh.logical_axis_rules: {logical name: "mesh,axes" ("" replicated)}."""
  as_text = lambda axes: ",".join((axes,) if isinstance(axes, str) else axes or ())
  return ml_collections.ConfigDict({name: as_text(axes) for name, axes in rules.items()})


def axis_rules_of(mesh_cfg: ml_collections.ConfigDict) -> Rules:
  """The logical-axis rules of a run config's `mesh` section (`rules_config`'s form; the defaults,
  `LOGICAL_RULES`, for a config without them); ValueError naming a logical axis that is not the model's or a
  mesh axis that does not exist."""
  text = mesh_cfg.get("logical_axis_rules")
  if text is None:
    return LOGICAL_RULES
  text = dict(text)
  unknown = sorted(set(text) - set(LOGICAL_RULES))
  missing = sorted(set(LOGICAL_RULES) - set(text))
  if unknown or missing:
    raise ValueError(f"mesh.logical_axis_rules: {'unknown' if unknown else 'missing'} logical axes "
                     f"{unknown or missing}; the model's are {sorted(LOGICAL_RULES)}.")
  rules = {}
  for name, value in text.items():
    axes = tuple(a.strip() for a in str(value or "").split(",") if a.strip())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or len(set(axes)) != len(axes):
      raise ValueError(f"mesh.logical_axis_rules.{name}={value!r}: give distinct mesh axes of {MESH_AXES}, "
                       "comma-separated (empty: replicated).")
    rules[name] = None if not axes else axes[0] if len(axes) == 1 else axes
  return rules


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with at most one -1 filled in; raises ValueError if it does not fit."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes (data, fsdp, tensor)={tuple(sizes)}: each must be positive, at most one -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh (data, fsdp, tensor)={tuple(sizes)}: {num_devices} devices are not divisible "
                       f"by {known}.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh (data, fsdp, tensor)={tuple(sizes)} needs {int(np.prod(sizes))} devices, "
                     f"have {num_devices}.")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def param_shardings(logical_specs, abstract_params, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """NamedShardings for a params tree from its tree of logical PartitionSpecs (same structure) under `rules`."""
  def one(spec, x):
    return NamedSharding(mesh, logical_to_mesh(tuple(spec), x.shape, mesh))
  with axis_rules(rules):
    return jax.tree.map(one, logical_specs, abstract_params, is_leaf=lambda s: isinstance(s, P))


def zero_spec(spec: P, shape: Sequence[int], mesh: Mesh, axis: str = "data") -> P:
  """`spec` with `axis` added to the dimension it splits best (ZeRO-1): among the dimensions whose size per
  device under `spec` the axis size divides, the largest (the first of equal ones). `spec` unchanged when `axis`
  has one device, is already used, or divides no dimension (small vectors stay replicated over it)."""
  n = int(mesh.shape[axis])
  entries = list(tuple(spec)) + [None] * (len(shape) - len(tuple(spec)))
  as_tuple = [() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in entries]
  if n == 1 or any(axis in t for t in as_tuple):
    return spec
  local = [size // int(np.prod([mesh.shape[a] for a in t])) for size, t in zip(shape, as_tuple)]
  fits = [i for i, m in enumerate(local) if m % n == 0]
  if not fits:
    return spec
  best = max(fits, key=lambda i: (local[i], -i))
  axes = as_tuple[best] + (axis,)
  entries[best] = axes[0] if len(axes) == 1 else axes
  return P(*entries)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_shardings, mesh: Mesh,
                        shard_over_data: bool = False):
  """Optimizer-state shardings: parameter-shaped leaves follow their parameter, the rest is replicated.

  shard_over_data (ZeRO-1): the parameter-shaped leaves are also split over "data" (`zero_spec`)."""
  replicated = NamedSharding(mesh, P())

  def follow(leaf, param_sharding):
    if not shard_over_data or not hasattr(leaf, "shape"):
      return param_sharding
    return NamedSharding(mesh, zero_spec(param_sharding.spec, leaf.shape, mesh))

  return optax.tree_map_params(tx, follow, abstract_opt_state, params_shardings,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_parallelism(mesh: Mesh) -> int:
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded on the batch axes (works on one or many hosts)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def in_mesh(fn: Callable, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Callable:
  """fn run (and traced) with `mesh` as the context mesh and `rules` as the logical-axis rules: the kernels
  then run per shard (`shard_map`) and the residual stream is constrained at block boundaries
  (`pallas_kernels.sharding`)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with use_mesh(mesh), axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped
