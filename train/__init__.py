"""Training system for bmojo_jax: data, optimizer, sharding, checkpoints, metrics, loop and CLI."""
