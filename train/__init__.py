"""Training system for bmojo_jax: data, optimizer, sharding, checkpoints, metrics, loop and CLI."""

if __name__ != "bmojo_jax.train":   # e.g. `import train` from the repository root: a second copy of every module
  raise ImportError(f"{__name__}: this folder is the package bmojo_jax.train; import it as bmojo_jax.train")
