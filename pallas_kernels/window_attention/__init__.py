"""Memory attention: sliding window + per-chunk memory tokens. `reference.py` holds the plain-jnp reference."""

from pallas_kernels.window_attention.reference import memory_attention_reference

__all__ = ["memory_attention_reference"]
