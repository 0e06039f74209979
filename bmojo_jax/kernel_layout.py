"""A model's projection kernels in either `KernelLayout` (`compute.kernel_layout`): in_out, contracted dims first,
the training layout; out_in, output dims first, the one a GEMV at one token reads fastest on a GPU
(`bmojo_jax.layers.Projection`, docs/inference.md "Kernel layout"). `to_kernel_layout` converts a model (the
`Decoder` does, once); `kernel_moves` and `kernels_to_layout` convert parameter trees, an optimizer state's too
(`train/setup.py`'s `restore_state`: a checkpoint restores under either layout).
"""

from __future__ import annotations

import jax
from flax import nnx

from bmojo_jax.config import KernelLayout
from bmojo_jax.layers import Projection, transpose_kernel
from bmojo_jax.model import LanguageModel


def to_kernel_layout(model: LanguageModel, layout: KernelLayout | str) -> LanguageModel:
  """`model` with every projection kernel stored in `layout` (`KernelLayout`): a new model of config
  `cfg.with_compute(kernel_layout=layout)` holding the same parameters, each `Projection`'s kernel transposed
  (how many of its dims are contracted is the module's, not guessed from names; a scanned model's layers axis
  stays first). The map is the same, so the logits agree to rounding (the einsums sum in another order);
  converting back gives the parameters bit for bit. `model` itself when already in `layout`. A bad layout is a
  ConfigError naming compute.kernel_layout."""
  cfg = model.cfg.with_compute(kernel_layout=layout)
  if cfg.compute.kernel_layout == model.cfg.compute.kernel_layout:
    return model
  params = kernels_to_layout(nnx.to_pure_dict(nnx.state(model)), kernel_moves(model, cfg.compute.kernel_layout))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def kernel_moves(model: nnx.Module, layout: KernelLayout | str) -> dict[tuple, tuple[int, int]]:
  """{path of a `Projection`'s kernel in the model's pure-dict state: (n_first, n_dims) of the `transpose_kernel`
  that takes it to `layout`}, read from the modules (an abstract model from `nnx.eval_shape` will do)."""
  moves = {}
  for path, module in nnx.iter_graph(model):
    if isinstance(module, Projection) and (move := module.move_to(layout)) is not None:
      moves[(*path, "kernel")] = move
  return moves


def kernels_to_layout(tree, moves: dict[tuple, tuple[int, int]]):
  """A tree of pure dicts holding a model's parameters (as params, or as the param-shaped parts of an optimizer
  state: each dict with a "blocks" key is such a root, as in `stack_blocks`) with the kernels at the paths of
  `moves` (`kernel_moves`) transposed."""
  def convert_root(root):
    def leaf(path, x):
      move = moves.get(tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path))
      return x if move is None or not hasattr(x, "ndim") else transpose_kernel(x, *move)
    return jax.tree_util.tree_map_with_path(leaf, root)
  is_root = lambda x: isinstance(x, dict) and "blocks" in x
  return jax.tree.map(lambda x: convert_root(x) if is_root(x) else x, tree, is_leaf=is_root)
