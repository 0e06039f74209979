#!/usr/bin/env bash
# Installs bmojo_jax with its test extras and runs the whole test suite (CPU; slow tests included): what CI runs.
# Two tiers (issue 37's targets on 2 cores: <= 12 and <= 5 minutes): this, every test, and the inner loop
# `scripts/test.sh -m "not slow"`, every module and invariant at its smallest case: `slow` marks end-to-end runs
# (training, subprocesses, populations), the kernels' further interpret-mode cases and the further cases of an
# invariant (more prefill lengths, selections, dtypes, the families past B'MOJO and the Transformer:
# tests/conftest.py's FAMILY_TIERS), each a compile. Tests compile at XLA's backend optimization level 0 with
# XLA:CPU's elemental fusion emitter (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[dev]"
export JAX_PLATFORMS=cpu
python3 -m pytest -n 2 --timeout=1800 -q tests "$@"
