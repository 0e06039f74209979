"""Chunked selective scan (Mamba-1 / S6). `reference.py` holds the plain-jnp reference."""

from pallas_kernels.selective_scan.reference import selective_scan_reference

__all__ = ["selective_scan_reference"]
