"""bmojo_jax: B'MOJO and its baselines (Transformer, Mamba, Hybrid, B'MOJO-F) on one Flax NNX skeleton."""

import importlib
import importlib.abc
import importlib.util
import os
import sys

# train/, configs/ and pallas_kernels/ sit beside bmojo_jax/ in the repository and install as bmojo_jax.train,
# bmojo_jax.configs and bmojo_jax.pallas_kernels (pyproject.toml's package-dir; site-packages gets no generic
# top-level names). In a source checkout without an install (PYTHONPATH=<repo root>: tests, notebooks,
# benchmarks) the finder below gives those three names the sibling folders, as setuptools' editable finder
# does. Not `__path__.append(<repo root>)`: that would also make every other folder of the repository a
# subpackage, bmojo_jax.bmojo_jax.* a second copy of each module among them. It goes first on sys.meta_path, so
# an editable install of another checkout does not lend this one its siblings.
_SIBLINGS = ("train", "configs", "pallas_kernels")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _SiblingFinder(importlib.abc.MetaPathFinder):
  """Finds bmojo_jax.<sibling> in the repository root's <sibling>/ (their submodules follow their __path__)."""

  def find_spec(self, fullname, path=None, target=None):
    package, _, name = fullname.partition(".")
    if package != __name__ or name not in _SIBLINGS:
      return None
    folder = os.path.join(_ROOT, name)
    return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])


if (os.path.isfile(os.path.join(_ROOT, "pyproject.toml"))
    and all(os.path.isfile(os.path.join(_ROOT, name, "__init__.py")) for name in _SIBLINGS)
    and not any(type(f).__name__ == "_SiblingFinder" for f in sys.meta_path)):
  sys.meta_path.insert(0, _SiblingFinder())


# The public names, each imported from its module at first use (PEP 562), so that what needs none of them (a
# console script's --help or refusal, `python -m bmojo_jax.train.plots`, the corpus `prepare`) starts without
# importing jax and flax: {name: its module}.
_EXPORTS = {
    **dict.fromkeys(("AttnImpl", "ComputeConfig", "ConfigError", "ConvImpl", "DecodeAttnImpl", "Family",
                     "KernelLayout", "ModelConfig", "RematPolicy", "ScanImpl", "StorePolicy", "Sublayer"), "config"),
    **dict.fromkeys(("PRESET_NAMES", "mqar_config", "paper_config", "preset"), "presets"),
    "LanguageModel": "model",
    "to_kernel_layout": "kernel_layout",
    "count_params": "param_count",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
  if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
    return importlib.import_module(f"{__name__}.{name}")     # a submodule (bmojo_jax.config), imported on first use
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted({*globals(), *_EXPORTS})
