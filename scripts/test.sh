#!/usr/bin/env bash
# Installs bmojo_jax with its test extras and runs the whole test suite (CPU; slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[dev]"
export JAX_PLATFORMS=cpu
python3 -m pytest -n 2 --timeout=1800 -q tests "$@"
