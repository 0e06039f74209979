"""Checks: whole-path correctness on the accelerator (kernels in a model, cuDNN training, a mesh run's restore)."""
