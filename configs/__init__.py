"""Training configs: `get_config(preset)` files for `bmojo-train --config configs/<file>.py[:<preset>]`."""

if __name__ != "bmojo_jax.configs":   # e.g. `import configs` from the repository root: a second copy of every module
  raise ImportError(f"{__name__}: this folder is the package bmojo_jax.configs; import it as bmojo_jax.configs")
