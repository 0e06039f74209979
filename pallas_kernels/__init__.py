"""Pallas kernels for bmojo_jax. Each kernel package holds the kernel, its custom VJP and a plain-jnp reference."""

if __name__ != "bmojo_jax.pallas_kernels":   # e.g. `import pallas_kernels` from the repository root: a second copy
  raise ImportError(f"{__name__}: this folder is the package bmojo_jax.pallas_kernels; "
                    "import it as bmojo_jax.pallas_kernels")
