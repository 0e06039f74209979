"""Pallas kernels for bmojo_jax. Each kernel package holds the kernel, its custom VJP and a plain-jnp reference."""
