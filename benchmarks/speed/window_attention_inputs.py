"""The memory-attention benchmark's inputs and the functions it times (also what profile_kernels.py runs): random
q, k, v (and memory) at a shape, packed rows like the model's, and jitted forward / forward+backward of the
Pallas kernels and of cuDNN."""

import jax
import jax.numpy as jnp
import numpy as np

from bmojo_jax.pallas_kernels.window_attention import memory_attention


def inputs(b, t, h, kh, p, m, chunk, dtype=jnp.bfloat16, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(ks[0], (b, t, h, p), dtype)
  k = jax.random.normal(ks[1], (b, t, kh, p), dtype)
  v = jax.random.normal(ks[2], (b, t, kh, p), dtype)
  ct = jax.random.normal(ks[6], (b, t, h, p), dtype)
  if not m:
    return (q, k, v), ct
  c = -(-t // chunk)
  mem = (jax.random.normal(ks[3], (b, c, m, kh, p), dtype), jax.random.normal(ks[4], (b, c, m, kh, p), dtype),
         jax.random.bernoulli(ks[5], 0.8, (b, c, m)).at[:, 0].set(False))
  return (q, k, v) + mem, ct


def packed_layout(b, t, chunk, m, seed=0):
  """Packed rows like the model's: segment_ids [B, T] int32, documents of random lengths uniform in
  [1, T/4] (mean ~T/8, fixed seed); with memory (m > 0) mem_span [B, C, 2, M] int32 with one boundary in each
  chunk, its first document start (the chunk's end when none): the first half of the slots visible before
  it, the second half from it on."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(b):
    lengths = []
    while sum(lengths) < t:
      lengths.append(int(rng.integers(1, t // 4 + 1)))
    rows.append(np.repeat(np.arange(len(lengths)), lengths)[:t])
  ids = np.stack(rows).astype(np.int32)
  if not m:
    return jnp.asarray(ids), None
  c = -(-t // chunk)
  per_chunk = np.pad(ids, ((0, 0), (0, c * chunk - t)), mode="edge").reshape(b, c, chunk)
  starts = per_chunk[:, :, 1:] != per_chunk[:, :, :-1]                       # [B, C, L - 1]
  boundary = np.where(starts.any(-1), starts.argmax(-1) + 1, chunk)          # [B, C]
  span = np.zeros((b, c, 2, m), np.int32)
  span[:, :, 1, :m // 2] = boundary[..., None]
  span[:, :, 0, m // 2:] = boundary[..., None]
  span[:, :, 1, m // 2:] = chunk
  return jnp.asarray(ids), jnp.asarray(span)


def fwd_and_fwdbwd(attn, n_diff):
  """attn(*args) -> o; returns jitted (fwd, fwd+bwd) taking (args, ct)."""
  fwd = jax.jit(lambda args, ct: attn(*args))

  @jax.jit
  def fwdbwd(args, ct):
    o, pull = jax.vjp(lambda *d: attn(*d, *args[n_diff:]), *args[:n_diff])
    return pull(ct)

  return fwd, fwdbwd


def pallas_fn(window, chunk, blocks=None, interpret=False):
  """attn(q, k, v, mem_k, mem_v, mem_valid, segment_ids, mem_span), the last five optional."""
  def attn(q, k, v, mem_k=None, mem_v=None, mem_valid=None, segment_ids=None, mem_span=None):
    return memory_attention(q, k, v, mem_k, mem_v, mem_valid, window=window, chunk=chunk, segment_ids=segment_ids,
                            mem_span=mem_span, block_sizes=blocks, interpret=interpret)
  return attn


def cudnn_fn(window):
  lws = None if window is None else (window - 1, 0)
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                                      local_window_size=lws)
