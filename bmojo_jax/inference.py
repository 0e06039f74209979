"""Inference: sampling, a compiled decoder over a constant-size cache, and `generate`.

Prefill runs the parallel pass and hands its final states to the step path (`LanguageModel.prefill`);
`Decoder.step` is compiled once and reused for every token, with the cache donated; `Decoder.decode` runs the
same step in a `lax.scan` on device, sampling included, so no Python dispatch sits between tokens: the path of
`generate` and `generate_stream` (which yields the tokens every few steps). Prompts of different lengths are
batched exactly: the common prefix is prefilled, then each row is teacher-forced through the rest of its prompt
while rows past their prompt sample, all in the same scanned step. A long prompt can be prefilled in pieces
(`Decoder`'s prefill_chunk: bounded memory, the same cache), and the step and loop compiled with given XLA
options (`Decoder`'s compiler_options).
"""

from __future__ import annotations

import functools
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmojo_jax.config import KernelLayout
from bmojo_jax.kernel_layout import to_kernel_layout
from bmojo_jax.model import LanguageModel, cache_slots, check_cache_room, stack_blocks


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
  """logits [B, V] -> tokens [B] int32. temperature 0 is greedy; top_k / top_p restrict the support."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_k is not None and not 0 < top_k <= vocab_size:
    raise ValueError(f"top_k={top_k} must be in 1..vocab_size={vocab_size}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")


# The compiled functions are module-level, keyed by the model's graphdef (static: its structure and config)
# and given the parameters as an argument: jit's cache then holds no parameters, a Decoder is freed with its
# last reference, and decoders of the same configuration share their compiled code.

@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _prefill(graphdef, params, tokens, max_len, last_only, n_unstack):
  """The model's prefill; n_unstack > 0: a scanned model's stacked cache is cut into that many blocks' caches,
  the layout of the unscanned step."""
  logits, cache = nnx.merge(graphdef, params).prefill(tokens, max_len, last_only=last_only)
  if n_unstack:
    cache = [jax.tree.map(lambda x: x[i], cache) for i in range(n_unstack)]
  return logits, cache


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(3,))
def _continue(graphdef, params, tokens, cache, last_only):
  return nnx.merge(graphdef, params).prefill(tokens, cache=cache, last_only=last_only)


STEP_JIT = dict(static_argnums=(0,), donate_argnums=(3,))              # how `_step` is jitted
LOOP_JIT = dict(static_argnums=(0, 8, 9, 10), donate_argnums=(3,))     # how `_decode_loop` is jitted


@functools.partial(jax.jit, **STEP_JIT)
def _step(graphdef, params, token, cache):
  return nnx.merge(graphdef, params).step(token, cache)


@functools.partial(jax.jit, **LOOP_JIT)
def _decode_loop(graphdef, params, logits, cache, forced, use_forced, key, start, temperature, top_k, top_p):
  """Decode forced.shape[1] tokens on device (a lax.scan over the step).

  logits [B, V] predict the first position; forced, use_forced [B, n]: where use_forced, the token is the
  forced one (the rest of a prompt), else it is sampled with key fold_in(key, start + i) at step i, so the
  samples do not depend on how the steps are split into calls. Returns (tokens [B, n], logits, cache).
  """
  model = nnx.merge(graphdef, params)

  def body(carry, xs):
    logits, cache = carry
    forced_t, use_t, i = xs
    drawn = sample(logits, jax.random.fold_in(key, i), temperature=temperature, top_k=top_k, top_p=top_p)
    token = jnp.where(use_t, forced_t, drawn)
    logits, cache = model.step(token, cache)
    return (logits, cache), token

  steps = start + jnp.arange(forced.shape[1], dtype=jnp.int32)
  (logits, cache), tokens = jax.lax.scan(body, (logits, cache), (forced.T, use_forced.T, steps))
  return tokens.T, logits, cache


CompilerOptions = tuple[tuple[str, str | bool | int | float], ...]   # XLA options as sorted (name, value) pairs


@functools.cache
def _decode_fns(options: CompilerOptions):
  """(step, loop): `_step` and `_decode_loop` compiled with these XLA options (jax.jit's compiler_options),
  each pair jitted once per set of options and shared by every decoder that asks for it; () is the default."""
  if not options:
    return _step, _decode_loop
  kw = dict(compiler_options=dict(options))
  return jax.jit(_step.__wrapped__, **STEP_JIT, **kw), jax.jit(_decode_loop.__wrapped__, **LOOP_JIT, **kw)


def check_compiler_options(options) -> CompilerOptions:
  """A mapping of XLA option names to values (e.g. {"xla_gpu_enable_command_buffer": "FUSION,WHILE"}) or None
  -> sorted pairs, checked by compiling a one-op function with them: an unknown name or a bad value is a
  ValueError naming it here, not at the first decode."""
  if not options:
    return ()
  if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
    raise ValueError(f"compiler_options must map XLA option names (str) to values; got {options!r}")
  bad = {k: v for k, v in options.items() if not isinstance(v, (str, bool, int, float))}
  if bad:
    raise ValueError(f"compiler_options values must be str, bool, int or float; got {bad!r}")
  pairs = tuple(sorted(options.items()))
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(pairs)).lower(jnp.zeros((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f"compiler_options {dict(pairs)} rejected by XLA: {str(e).splitlines()[0]}") from None
  return pairs


MATMUL_WEIGHTS = ("kernel", "embed", "lm_head")  # parameter names whose every use casts them to the compute dtype


def decode_weights(state: nnx.State, compute_dtype) -> nnx.State:
  """The model state a decoder reads: every matmul weight (`MATMUL_WEIGHTS`: the projections' kernels, the
  embedding and head) stored in a wider float than the compute dtype is cast to it once, here. Each use casts
  them to the compute dtype anyway, so the logits are the same bit for bit, and a token reads half the bytes of
  fp32 weights (decoding at small batch is bound by reading the weights). The rest (norm scales, the SSM's
  A_log, D, dt_bias, conv taps) stays as stored: it is small, and the scan reads some of it in fp32."""
  compute_dtype = jnp.dtype(compute_dtype)

  def cast(path, x):
    name = next((str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)), "")
    narrower = jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > compute_dtype.itemsize
    return x.astype(compute_dtype) if name in MATMUL_WEIGHTS and narrower else x
  return jax.tree_util.tree_map_with_path(cast, state)


def default_kernel_layout() -> KernelLayout:
  """The layout a `Decoder` stores the projection kernels in unless told: out_in on a GPU, where a GEMV at one
  token a row reads an [N, D] weight up to 5x faster than a [D, N] one (measured on one H100, docs/inference.md
  "Kernel layout"); in_out (the training layout, no conversion) on CPU and TPU, where it was not measured."""
  return KernelLayout.OUT_IN if jax.default_backend() == "gpu" else KernelLayout.IN_OUT


def prefill_pieces(length: int, chunk: int | None) -> list[tuple[int, int]]:
  """[lo, hi) of the pieces a prompt of `length` tokens is prefilled in: the whole prompt without a chunk or
  when it fits one; else the remainder length % chunk first (if any), then whole chunks, so that every piece
  but the first has one shape, [B, chunk]: one compile whatever the length. (The last piece is not padded to
  the chunk instead: padding tokens would move the SSM, ring and memory states on.)"""
  if chunk is None or length <= chunk:
    return [(0, length)]
  first = length % chunk or chunk
  return [(0, first)] + [(lo, lo + chunk) for lo in range(first, length, chunk)]


def check_prefill_chunk(chunk: int | None) -> None:
  if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
    raise ValueError(f"prefill_chunk={chunk!r} must be a positive int or None (the whole prompt at once)")


class Decoder:
  """Compiled prefill and step functions for one model.

  `prefill(tokens [B, T], max_len, cache=None) -> (logits [B, T, V], cache)` compiles once per prompt shape
  (with a cache: continues its sequence, e.g. a second turn);
  `step(token [B], cache) -> (logits [B, V], cache)` compiles once and donates the cache;
  `decode(logits [B, V], cache, n) -> (tokens [B, n], logits, cache)` runs n steps on device in one `lax.scan`
  (sampling included) and compiles once per (B, n) and sampling settings.

  prefill_chunk C: a prompt longer than C tokens is prefilled in pieces of C (`prefill_pieces`), each
  continuing the cache of the one before (ring KV cache, conv and SSM states, fading and eidetic memory), so
  a piece's activations are O(C), not O(T); the cache then goes to `step` / `decode` as it is. The logits and
  cache are those of one prefill of the whole prompt. Every sublayer continues a piece in parallel (the Mamba
  scan from its states; attention over the ring cache and the piece, with the memory attention's chunks built
  from the cache's fading tokens, store and candidates: `bmojo_jax.continuation.continue_memory`), at any phase
  of the memory chunks. None (the default) prefills the prompt in one parallel pass; a chunk bounds the activations
  held when a whole prompt's do not fit (or a latency measure says pieces are faster).

  scan_prefill: the first prefill runs the blocks in one `lax.scan` (`cfg.compute.scan_layers`: one block traced and
  compiled whatever the depth) from a stacked copy of the parameters made here, and hands the step the
  per-block cache it reads. The step keeps the block loop: scanned, each token would copy every block's cache
  through the scan's inputs and outputs.

  The decoder holds the model's parameters with its matmul weights in the compute dtype (`decode_weights`):
  a model trained with fp32 parameters and bf16 compute decodes reading bf16 weights, with the same logits.

  kernel_layout (`KernelLayout`, or its string): how the decoder stores the projection kernels, converted once
  here (`to_kernel_layout`, after the cast) when the model's differ; the step, the loop and the prefill (and
  scan_prefill's stacked copy) all read that one copy. None: `default_kernel_layout()`, out_in on a GPU (a GEMV
  at one token reads it up to 5x faster, measured on one H100), in_out elsewhere (not measured there). The
  logits are the model's to rounding (the same products, summed in another order). A converted copy is the
  decoder's own: while the model is alive too, the projection weights are held twice (pass kernel_layout="in_out"
  to share the model's arrays where memory is tight).

  compiler_options: XLA options (jax.jit's `compiler_options`, e.g. {"xla_gpu_enable_command_buffer":
  "FUSION,WHILE"}) that `step` and `decode` are compiled with; None or {} compiles them as jax does by default.
  Checked here (`check_compiler_options`): a name or value XLA does not take is a ValueError.
  """

  def __init__(self, model: LanguageModel, *, scan_prefill: bool = False, prefill_chunk: int | None = None,
               compiler_options=None, kernel_layout: KernelLayout | str | None = None):
    check_prefill_chunk(prefill_chunk)
    self.prefill_chunk = prefill_chunk
    self.compiler_options = check_compiler_options(compiler_options)
    self._step_fn, self._loop_fn = _decode_fns(self.compiler_options)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, decode_weights(state, model.cfg.compute.jnp_dtype))   # cast, then transpose
    model = to_kernel_layout(model, default_kernel_layout() if kernel_layout is None else kernel_layout)
    self.cfg = model.cfg
    self.kernel_layout = self.cfg.compute.kernel_layout
    self.graphdef, self.state = nnx.split(model)
    self.prefill_graphdef, self.prefill_state = self.graphdef, self.state
    self.n_unstack = 0
    if scan_prefill and not self.cfg.compute.scan_layers:
      scanned = nnx.eval_shape(lambda: LanguageModel(self.cfg.with_compute(scan_layers=True), rngs=nnx.Rngs(0)))
      self.prefill_graphdef, self.prefill_state = nnx.split(scanned)
      nnx.replace_by_pure_dict(self.prefill_state, stack_blocks(nnx.to_pure_dict(self.state)))
      self.n_unstack = self.cfg.n_blocks

  def prefill(self, tokens: jax.Array, max_len: int | None = None, cache=None, *, last_only: bool = False,
              chunk: int | None = None):
    """(logits [B, T, V], cache) of the prompt; with `cache` (donated) it continues that sequence. last_only:
    logits [B, 1, V] of the last position alone (all decoding needs). chunk: prefill in pieces of this many
    tokens (default: the decoder's prefill_chunk; see the class)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    check_prefill_chunk(chunk)
    t = tokens.shape[1]
    if cache is None:
      cache_slots(self.cfg, t, max_len)          # full attention: max_len must hold the whole prompt
    else:
      check_cache_room(self.cfg, cache, t)      # before the jitted calls: the cache is concrete
    pieces, out = prefill_pieces(t, self.prefill_chunk if chunk is None else chunk), []
    for lo, hi in pieces:
      if cache is None:
        logits, cache = _prefill(self.prefill_graphdef, self.prefill_state, tokens[:, lo:hi], max_len, last_only,
                                 self.n_unstack)
      else:
        logits, cache = _continue(self.graphdef, self.state, tokens[:, lo:hi], cache, last_only)
      if not last_only or hi == t:
        out.append(logits)
    return (out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)), cache

  def step(self, token: jax.Array, cache):
    """One token per row, token [B] -> (logits [B, V], cache); the cache is donated."""
    return self._step_fn(self.graphdef, self.state, jnp.asarray(token, jnp.int32), cache)

  def decode(self, logits, cache, n: int, *, key=None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, forced=None, use_forced=None, start: int = 0):
    """Sample n tokens after `logits` [B, V] on device. Where `use_forced` [B, n] is set, the token is
    `forced` [B, n] instead of a sample (the rest of a longer prompt). Step i samples with
    fold_in(key, start + i): a sequence decoded in several calls, each given the steps done before as
    `start`, draws what one call would. Returns (tokens [B, n], logits, cache); the cache is donated."""
    b = logits.shape[0]
    key = jax.random.key(0) if key is None else key
    forced = jnp.zeros((b, n), jnp.int32) if forced is None else jnp.asarray(forced, jnp.int32)
    use_forced = jnp.zeros((b, n), bool) if use_forced is None else jnp.asarray(use_forced, bool)
    return self._loop_fn(self.graphdef, self.state, logits, cache, forced, use_forced, key,
                         jnp.asarray(start, jnp.int32), float(temperature), top_k, top_p)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  lo, hi = min(min(p) for p in prompts), max(max(p) for p in prompts)
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"prompt token ids span [{lo}, {hi}] but the model's vocab_size is {vocab_size}")
  return prompts


def generate_stream(model: LanguageModel | Decoder, prompt_tokens: Sequence[Sequence[int]] | np.ndarray, *,
                    max_new_tokens: int, block: int = 16, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
                    prefill_chunk: int | None = None) -> Iterator[list[list[int]]]:
  """Continue each prompt by up to max_new_tokens tokens, yielding as they come: after every `block` decode
  steps (one `Decoder.decode` call on device), each row's new tokens of those steps (a list per row, empty
  while the row is still in its prompt or done). A row is done after max_new_tokens tokens or its eos_id
  (included); the stream ends when every row is. The tokens are those of `generate` whatever `block` is.

  Prompts of different lengths share the batch exactly: the common prefix is prefilled (in pieces of
  prefill_chunk tokens if given, else the decoder's `prefill_chunk`), then each row is teacher-forced through
  the rest of its prompt while rows past their prompt sample, in the same steps.
  """
  decoder = model if isinstance(model, Decoder) else Decoder(model)
  cfg = decoder.cfg
  prompts = _check_prompts(prompt_tokens, cfg.vocab_size)
  validate_sampling(temperature, top_k, top_p, cfg.vocab_size)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if block < 1:
    raise ValueError(f"block={block} must be >= 1")
  lengths = np.array([len(p) for p in prompts])
  start, total = int(lengths.min()), int(lengths.max()) + max_new_tokens
  n_steps = -(-(total - start) // block) * block          # whole blocks: every call has the same shape
  padded = np.zeros((len(prompts), start + n_steps), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  use_forced = np.arange(start, start + n_steps)[None, :] < lengths[:, None]        # [B, n_steps]

  logits, cache = decoder.prefill(padded[:, :start], start + n_steps, last_only=True, chunk=prefill_chunk)
  logits, key = logits[:, -1], jax.random.key(seed)
  produced = [0] * len(prompts)                            # new tokens so far per row; -1 once done
  for lo in range(0, n_steps, block):
    tokens, logits, cache = decoder.decode(
        logits, cache, block, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
        forced=padded[:, start + lo:start + lo + block], use_forced=use_forced[:, lo:lo + block], start=lo)
    tokens = np.asarray(tokens)
    out = []
    for i, n in enumerate(lengths):
      first = max(0, n - start - lo)                       # the row's first new token in this block
      new = [] if produced[i] < 0 else tokens[i, first:].tolist()[:max_new_tokens - produced[i]]
      if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id) + 1]
        produced[i] = -1
      elif produced[i] >= 0:
        produced[i] = -1 if produced[i] + len(new) == max_new_tokens else produced[i] + len(new)
      out.append(new)
    yield out
    if all(p < 0 for p in produced):
      return


def generate(model: LanguageModel | Decoder, prompt_tokens: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             prefill_chunk: int | None = None) -> list[list[int]]:
  """Continue each prompt by max_new_tokens tokens (cut after eos_id if given), all on device in one
  `Decoder.decode` call after the prefill (`generate_stream` in one block; prefill_chunk as there). Returns
  the new tokens."""
  lengths = [len(p) for p in prompt_tokens]
  block = max(1, max(lengths) - min(lengths) + max_new_tokens) if lengths else 1
  results = None
  for part in generate_stream(model, prompt_tokens, max_new_tokens=max_new_tokens, block=block,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id,
                              prefill_chunk=prefill_chunk):
    results = part if results is None else [r + p for r, p in zip(results, part)]
  return results


def cache_bytes(model: LanguageModel, batch: int, context: int) -> int:
  """Bytes of the decode cache after `context` tokens (shapes only; nothing is allocated)."""
  shapes = jax.eval_shape(lambda: model.init_cache(batch, context))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
