"""The device mesh seen from inside a model: one logical-axis table, activation constraints, kernels per shard.

Mesh axes: "data" (data parallel), "fsdp" (data parallel, parameters split along "embed") and "tensor"
(heads / MLP / inner / vocab). Logical-axis rules map the logical axis names of `bmojo_jax/typing.py` (plus
the activations' "batch" and "seq") to them, for the parameters (`train/sharding.py`), the activations at
block boundaries (`constrain`) and the inputs of the Pallas kernels (`per_shard`). The rules are the
context's (`axis_rules(rules)`, which the trainer's steps enter with the run config's
`mesh.logical_axis_rules`), `LOGICAL_RULES` without one. A logical axis whose size the mesh axes do not
divide, or whose mesh axis an earlier dimension of the same array already uses, stays replicated.

The mesh is the context's: `jax.sharding.get_abstract_mesh()`, set by `use_mesh(mesh)` (inside or outside a
traced function; the trainer's steps do it) or `jax.set_mesh(mesh)` (outside jit). Without one, or inside a
`shard_map` over its axes, `constrain` and `per_shard` do nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes (None: replicated): the default rules.
Rules = Mapping[str, str | tuple[str, ...] | None]
LOGICAL_RULES: Rules = {
    "batch": BATCH_AXES,     # activations' B
    "seq": None,             # activations' T
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "inner": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "state": None,
    "rank": None,
    "conv": None,
    "head_dim": None,
    "layers": None,          # the stacked blocks of a scanned model: every device holds every layer
}

Logical = Sequence[str | None]

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("logical_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Context manager making `rules` the logical-axis rules (`current_rules`) inside it, traced code included."""
  token = _RULES.set(dict(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> Rules:
  """The context's logical-axis rules (`axis_rules`), `LOGICAL_RULES` without one."""
  rules = _RULES.get()
  return LOGICAL_RULES if rules is None else rules


def use_mesh(mesh: Mesh | AbstractMesh):
  """Context manager making `mesh` the context mesh; works inside a traced function (jax.set_mesh does not).
  It sets the abstract mesh only: the jitted computation takes its devices from inputs placed on the mesh."""
  return jax.sharding.use_abstract_mesh(mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh)


def context_mesh() -> AbstractMesh | None:
  """The context's mesh, or None without one, with one device, or inside a shard_map (manual axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
    return None
  return mesh


def mesh_axes(name: str | None, size: int, mesh: Mesh | AbstractMesh,
              used: Sequence[str] = ()) -> str | tuple[str, ...] | None:
  """The mesh axes dimension `name` of `size` is split over: its rule's axes (`current_rules`) of the mesh with
  more than one device and not in `used`, if their product divides `size`; else None (replicated)."""
  axis = current_rules().get(name) if name is not None else None
  axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
  axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
  if not axes or size % int(np.prod([mesh.shape[a] for a in axes])):
    return None
  return axes[0] if len(axes) == 1 else axes


def logical_to_mesh(logical: Logical, shape: Sequence[int], mesh: Mesh | AbstractMesh) -> P:
  """PartitionSpec of mesh axes for an array with logical axes `logical` and `shape`."""
  used, out = set(), []
  for name, size in zip(logical, shape):
    axes = mesh_axes(name, size, mesh, tuple(used))
    used.update((axes,) if isinstance(axes, str) else axes or ())
    out.append(axes)
  return P(*out)


def constrain(x: jax.Array, logical: Logical) -> jax.Array:
  """x with its sharding constrained to `logical` (e.g. ("batch", "seq", "embed")); x itself without a mesh."""
  mesh = context_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(logical, x.shape, mesh))


def per_shard(fn: Callable, sizes: dict[str, int], in_logical: Sequence[Logical | None],
              out_logical: Logical | Sequence[Logical]) -> Callable:
  """fn, run per shard under the context mesh (`jax.shard_map`), or fn itself when there is nothing to split.

  sizes: {logical name: size} of the dimensions that may be split, the same in every argument (B, heads…); a
  name splits over its mesh axes when they divide its size (`mesh_axes`), every other dimension is replicated.
  in_logical: one logical tuple per positional argument of fn (anything for an argument that is None);
  out_logical: the same for fn's outputs (a tuple of tuples for several outputs). fn must compute each shard
  from its own rows and heads alone (a batch- and head-parallel kernel): XLA cannot split a `pallas_call` (or
  `lax.top_k`) and would gather its inputs onto every device.
  """
  mesh = context_mesh()
  if mesh is None:
    return fn
  split = {name: mesh_axes(name, size, mesh) for name, size in sizes.items()}
  if not any(split.values()):
    return fn

  def spec(logical):
    return P() if logical is None else P(*(split.get(n) if n is not None else None for n in logical))

  several = isinstance(out_logical[0], tuple)
  outs = tuple(spec(o) for o in out_logical) if several else spec(out_logical)
  # check_vma=False: pallas_call outputs carry no varying-axes type; the transpose then sums the cotangents of
  # replicated inputs (parameters) over the axes they are replicated on.
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(x) for x in in_logical), out_specs=outs,
                       check_vma=False)
