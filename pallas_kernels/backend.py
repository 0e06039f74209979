"""Which implementation of a kernel runs: the GPU kernels (Triton / Mosaic GPU) or the TPU ones (Mosaic TPU),
compiled or in Pallas' interpreter. Each kernel package's public entry asks `resolve_backend` once."""

from __future__ import annotations

import jax

BACKENDS = ("gpu", "tpu")


def resolve_backend(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
  """(backend, interpret). backend None: "tpu" on a TPU backend, else "gpu" (`jax.default_backend()`);
  interpret None: True on a CPU backend, where the kernels only run in Pallas' interpreters (the GPU kernels',
  or the TPU interpreter with backend="tpu")."""
  default = jax.default_backend()
  backend = backend or ("tpu" if default == "tpu" else "gpu")
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: the kernels run on one of {list(BACKENDS)} (None: by "
                     f"jax.default_backend(), now {default!r})")
  return backend, default == "cpu" if interpret is None else bool(interpret)
