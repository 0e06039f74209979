"""One language-model skeleton for all five families: embed -> blocks -> RMSNorm -> logits.

A block holds two pre-norm residual sublayers of the kinds `cfg.sublayers` names (`Sublayer`):

    s = mixer_1(norm_1(x));  h = x + s;  out = h + mixer_2(norm_2(h) [, fading = norm_2(s)])

`MIXERS` maps each kind to its class, and every class follows one protocol (`Mixer`: `__call__` for the
parallel pass, `step` for one token, `init_state` for the decode state before any token), so `Block` runs its
two sublayers without knowing their kinds; `bmojo_jax.param_count.SUBLAYER_PARAMS` counts each kind's
parameters. With `cfg.fading_source` (B'MOJO-F, B'MOJO; validated in `ModelConfig`) the first sublayer's
output s, a read-out of the SSM state, is handed to the second (the memory attention) as the source of its
fading tokens, with norm_2, which the attention applies only to the M_f rows per chunk it reads: of all T in
the parallel pass (`Attention.fading_parts`), of the last M_f read-outs once a chunk in decoding (`start_chunk`).

With `cfg.compute.scan_layers` the n_blocks identical blocks are one `Block` whose parameters carry a leading
"layers" axis, run by one `lax.scan`: the step is traced and compiled once whatever the depth (or, with
`cfg.compute.scan_unroll` k, k blocks per iteration: XLA schedules and fuses across them). Otherwise (the
default: its steps ran faster, docs/train_speed.md) they are a list of blocks run by a Python loop. Both run
the same block function (`_block_fn`), rematerialized by `cfg.compute.remat`; `stack_blocks` / `unstack_blocks`
convert parameter trees between the two layouts (`bmojo_jax.kernel_layout`: between kernel layouts).

A training row may pack several documents (`segment_ids`, `positions`; `bmojo_jax.segments`): every mixer
gets the row's `Packing` and keeps the documents apart, so the row computes what its documents would alone.

`LanguageModel.__call__` is the parallel (training) pass; `prefill` runs the same pass and returns the decode
cache; `step` decodes one token from the cache. See `bmojo_jax.inference` for sampling and generation.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from bmojo_jax import segments
from bmojo_jax import typing as tp
from bmojo_jax.attention import Attention, AttnState, chunk_boundary, run_if
from bmojo_jax.config import ModelConfig, RematPolicy, Sublayer
from bmojo_jax.layers import RMSNorm, SwiGLU, logits_einsum, param
from bmojo_jax.mamba import Mamba, MambaState
from bmojo_jax.segments import Packing
from bmojo_jax.pallas_kernels.sharding import constrain
from bmojo_jax.pallas_kernels.window_attention.ops import KERNEL_OUTPUTS as ATTENTION_OUTPUTS

BlockCache = tuple[Any, Any]  # (state of sublayer 1, state of sublayer 2); None for an MLP
Norm = Callable[[jax.Array], jax.Array]   # a norm of rows [..., D]: the fading source's (`Block`'s norm2)
RESIDUAL = (tp.BATCH, tp.SEQ, tp.EMBED)  # logical axes of the residual stream x [B, T, D]


@runtime_checkable
class Mixer(Protocol):
  """What `Block` needs of a sublayer. A mixer is built as `cls(cfg, rngs=rngs)`; its state is its own decode
  state (`MambaState`, `AttnState`; None for the stateless MLP). `fading` [B, T, D] is the fading-token source
  (`cfg.fading_source`), which only the memory attention reads; `packing` marks the documents of a packed row."""

  def __call__(self, x: jax.Array, state: Any = None, *, fading: jax.Array | None = None,
               fading_norm: Norm | None = None, cache_size: int | None = None,
               packing: Packing | None = None) -> tuple[jax.Array, Any]:
    """Parallel pass x [B, T, D] -> (y [B, T, D], state after the last token). `state` continues the sequence
    it holds; cache_size (attention ring slots) asks for the decode state. With fading_norm, fading is the
    read-out before its norm, and fading_norm(rows [..., D]) normalizes the rows that are read of it."""
    ...

  def step(self, x: jax.Array, state: Any, *, fading: jax.Array | None = None, fading_norm: Norm | None = None,
           entered: bool = False) -> tuple[jax.Array, Any]:
    """One token per row: x [B, 1, D] -> (y [B, 1, D], state); fading, fading_norm as in `__call__`; entered:
    `start_chunk` already ran (`LanguageModel.enter_chunk`), which a mixer without memory ignores."""
    ...

  def start_chunk(self, state: Any, fading_norm: Norm | None = None) -> Any:
    """The decode state at a memory-chunk boundary: the memory attention's candidates enter its store, its last
    M_f read-outs (normed by fading_norm, as the steps got them) become its fading tokens; as it is without memory."""
    ...

  def init_state(self, batch: int, cache_size: int | None) -> Any:
    """The decode state before any token."""
    ...


MIXERS: dict[Sublayer, Callable[..., Mixer]] = {
    Sublayer.MAMBA: Mamba, Sublayer.ATTENTION: Attention, Sublayer.MLP: SwiGLU}


SCAN_KERNELS = "selective_scan"  # the name prefix of every selective-scan pallas_call (pallas_kernels/selective_scan)
REMAT_OPT = "remat_opt"  # under remat, the scan's VJP forward (the kernel writing hc) as its own equation
                         # (`optimize_remat`, pallas_kernels/selective_scan/ops.py)


# Matmuls that contract over at most this many elements are recomputed rather than kept (Mamba's dt_proj,
# K = dt_rank: 128 at 1.4B). Rerunning one costs 2K flops an output element; keeping it costs its bytes written
# and read again, twice over in the scanned layout, where each kept array is copied into and out of the stacked
# [n_blocks, ...] buffer: at ~700 TFLOP/s against ~3 TB/s the rerun is the cheaper below K of about 900.
RECOMPUTE_DOTS_UP_TO = 256


def _dot_worth_keeping(prim, *avals, **params) -> bool:
  """A matmul without batch dimensions whose contraction is longer than `RECOMPUTE_DOTS_UP_TO`."""
  if not jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params):
    return False
  (lhs_contract, _), _ = params["dimension_numbers"]
  return math.prod(avals[0].shape[d] for d in lhs_contract) > RECOMPUTE_DOTS_UP_TO


def _save_dots_and_kernels(prim, *avals, **params) -> bool:
  """Saves what is costly to recompute: matmul outputs (`_dot_worth_keeping`) and the outputs of the Pallas
  kernels and of cuDNN attention (the scan's state checkpoints, from its `remat_opt` equation, and the
  attention's logsumexp included), so the backward does not rerun the scan. The memory attention's outputs are
  saved by their name (`KERNEL_OUTPUTS`): its Mosaic forward is a custom_vmap_call, not a pallas_call."""
  return (prim.name in ("pallas_call", REMAT_OPT) or "dot_product_attention" in prim.name
          or (prim.name == "name" and params.get("name") == ATTENTION_OUTPUTS)
          or _dot_worth_keeping(prim, *avals, **params))


def _save_dots_and_attention(prim, *avals, **params) -> bool:
  """`_save_dots_and_kernels` less the selective scan's kernels: its outputs (y, the last state and the fp32
  state checkpoints hc that its backward reads) are recomputed by rerunning the scan forward in the backward
  (y and hc leave the same pallas_call, so keeping y alone would save nothing). Its `remat_opt` equation is not
  saved either, so the forward pass runs the kernel without hc: 1.07 GB of unread fp32 writes a Mamba sublayer
  at 1.4B, 16k tokens."""
  if prim.name == REMAT_OPT or (prim.name == "pallas_call" and str(params.get("name", "")).startswith(SCAN_KERNELS)):
    return False
  return _save_dots_and_kernels(prim, *avals, **params)


REMAT_POLICIES = {RematPolicy.FULL: None, RematPolicy.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  RematPolicy.DOTS_KERNELS: _save_dots_and_kernels,
                  RematPolicy.DOTS_ATTENTION: _save_dots_and_attention}


class Block(nnx.Module):
  """Two pre-norm residual sublayers; which ones is the family's choice (`cfg.sublayers`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    first, second = cfg.sublayers
    self.fading_source = cfg.fading_source
    # Attribute names are parameter paths (blocks/<i>/mixer1/...): checkpoints depend on them.
    self.norm1 = RMSNorm(cfg, rngs=rngs)
    self.mixer1: Mixer = MIXERS[first](cfg, rngs=rngs)
    self.norm2 = RMSNorm(cfg, rngs=rngs)
    self.mixer2: Mixer = MIXERS[second](cfg, rngs=rngs)

  def __call__(self, x: jax.Array, cache: BlockCache | None = None, *, cache_size: int | None = None,
               decode: bool = False, packing: Packing | None = None) -> tuple[jax.Array, BlockCache]:
    """x [B, T, D] -> (out [B, T, D], cache). decode: one token from `cache`, whose memory chunk the model has
    entered (`LanguageModel.enter_chunk`); else the parallel pass."""
    state1, state2 = cache if cache is not None else (None, None)

    s, state1 = (self.mixer1.step(self.norm1(x), state1, entered=True) if decode else
                 self.mixer1(self.norm1(x), state1, cache_size=cache_size, packing=packing))
    h = x + s
    # the fading source norm2(s): the mixer normalizes only the rows it reads (M_f per chunk)
    fading = dict(fading=s, fading_norm=self.norm2) if self.fading_source else {}
    y, state2 = (self.mixer2.step(self.norm2(h), state2, entered=True, **fading) if decode else
                 self.mixer2(self.norm2(h), state2, cache_size=cache_size, packing=packing, **fading))
    return h + y, (state1, state2)

  def init_state(self, batch: int, cache_size: int | None) -> BlockCache:
    return self.mixer1.init_state(batch, cache_size), self.mixer2.init_state(batch, cache_size)

  def start_chunk(self, cache: BlockCache) -> BlockCache:
    """Both sublayers' states at a memory-chunk boundary (`Mixer.start_chunk`)."""
    norm = self.norm2 if self.fading_source else None
    return self.mixer1.start_chunk(cache[0]), self.mixer2.start_chunk(cache[1], norm)


def _block_fn(graphdef, cache_size: int | None, decode: bool, keep_cache: bool, remat: RematPolicy,
              in_scan: bool, packing: Packing | None):
  """(x, (block params, cache)) -> (x, cache): one block, the body of both the scan and the loop."""
  def body(x, xs):
    params, cache = xs
    x = constrain(x, RESIDUAL)            # under a mesh: the residual stream enters and leaves split by rows
    y, cache = nnx.merge(graphdef, params)(x, cache, cache_size=cache_size, decode=decode, packing=packing)
    return constrain(y, RESIDUAL), (cache if keep_cache else None)
  if remat == RematPolicy.NONE or decode:
    return body
  # Inside lax.scan nothing can be CSE'd across iterations anyway (jax.checkpoint's documentation).
  return jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not in_scan)


def _stack_dict(blocks: dict) -> dict:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in sorted(blocks)))


def _is_block_list(x) -> bool:
  return isinstance(x, dict) and bool(x) and all(isinstance(k, int) for k in x)


def stack_blocks(tree):
  """A tree of pure dicts holding unscanned blocks ({"blocks": {0: {...}, 1: {...}}}, as params or as the
  param-shaped parts of an optimizer state) -> the same with one stacked block ({"blocks": {...[n, ...]}})."""
  def convert(x):
    if isinstance(x, dict) and "blocks" in x and _is_block_list(x["blocks"]):
      return {**x, "blocks": _stack_dict(x["blocks"])}
    return x
  return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, dict) and "blocks" in x)


def unstack_blocks(tree, n_blocks: int):
  """The inverse of `stack_blocks`."""
  def convert(x):
    if isinstance(x, dict) and "blocks" in x and not _is_block_list(x["blocks"]):
      return {**x, "blocks": {i: jax.tree.map(lambda a: a[i], x["blocks"]) for i in range(n_blocks)}}
    return x
  return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, dict) and "blocks" in x)


def attention_state(cache) -> AttnState:
  """The first attention sublayer's state in a cache (list or scan_layers layout)."""
  return next(x for x in jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, AttnState))
              if isinstance(x, AttnState))


def check_cache_room(cfg: ModelConfig, cache, n_tokens: int) -> None:
  """Full attention's KV cache must hold the n_tokens that continue it: a ValueError if not. Checked when the
  cache is concrete (outside jit; `Decoder.prefill` checks before its jitted call)."""
  if not cfg.has_attention or cfg.window is not None:
    return
  attn = attention_state(cache)
  if isinstance(attn.pos, jax.core.Tracer):
    return
  pos, slots = int(jnp.max(attn.pos)), attn.k.shape[-3]
  if pos + n_tokens > slots:
    raise ValueError(f"the KV cache holds {slots} tokens (max_len of the first prefill); {pos} are in it "
                     f"and {n_tokens} more do not fit")


def cache_slots(cfg: ModelConfig, prompt_len: int, max_len: int | None) -> int | None:
  """Ring slots of the attention cache for a prompt of prompt_len tokens: the window, max_len for full
  attention (a ValueError if max_len does not hold the prompt), None without attention."""
  if not cfg.has_attention:
    return None
  if cfg.window is not None:
    return cfg.window
  if max_len is None or max_len < prompt_len:
    raise ValueError(f"full attention needs max_len >= the prompt length ({prompt_len}) to size its "
                     f"KV cache; got max_len={max_len}")
  return max_len


class LanguageModel(nnx.Module):
  """tokens [B, T] int -> logits [B, T, V] fp32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                       (tp.VOCAB, tp.EMBED), cfg.weight_dtype)
    # Block i draws from its own key in both layouts, so scanned and unscanned models initialize alike.
    keys = jax.random.split(rngs.params(), cfg.n_blocks)
    if cfg.compute.scan_layers:
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: tp.LAYERS})
      def stacked(key):
        return Block(cfg, rngs=nnx.Rngs(params=key))
      self.blocks = stacked(keys)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=nnx.Rngs(params=key)) for key in keys])
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                           (tp.EMBED, tp.VOCAB), cfg.weight_dtype)

  def block(self, i: int) -> Block:
    """Block i as a module of its own (a view of the stacked parameters when scanned)."""
    if not self.cfg.compute.scan_layers:
      return self.blocks[i]
    graphdef, state = nnx.split(self.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))

  def logits(self, x: jax.Array) -> jax.Array:
    """The head: the last block's output x [B, T, D] -> logits [B, T, V] fp32 (final norm, tied or own
    weights). `hidden` then `logits` is `__call__`; in between a loss may keep only the positions it scores."""
    x = self.final_norm(x)
    return logits_einsum(x, self.head_weight(x.dtype))

  def head_weight(self, dtype) -> jax.Array:
    """The head's weight [V, D] in `dtype` (the embedding when tied)."""
    w = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...].T
    return w.astype(dtype)

  def _run(self, tokens, caches, cache_size, decode, keep_cache, packing=None):
    cfg = self.cfg
    table = constrain(self.embed[...], (tp.VOCAB, None))   # under FSDP: gathered like every weight, then a
    x = jnp.take(table, tokens, axis=0).astype(cfg.compute.jnp_dtype)   # [B, T, D] lookup local to the rows
    if cfg.compute.scan_layers:
      graphdef, params = nnx.split(self.blocks)
      body = _block_fn(graphdef, cache_size, decode, keep_cache, cfg.compute.remat, in_scan=True, packing=packing)
      x, caches = jax.lax.scan(body, x, (params, caches), unroll=min(cfg.compute.scan_unroll, cfg.n_blocks))
    else:
      new_caches = []
      for i, block in enumerate(self.blocks):
        graphdef, params = nnx.split(block)
        body = _block_fn(graphdef, cache_size, decode, keep_cache, cfg.compute.remat, in_scan=False,
                         packing=packing)
        x, cache = body(x, (params, None if caches is None else caches[i]))
        new_caches.append(cache)
      caches = new_caches if keep_cache else None
    return x, caches

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Parallel forward pass. tokens [B, T] -> logits [B, T, V] fp32.

    segment_ids [B, T] int: a row packs several documents, one per run of equal ids (0 on padding, as
    `train/data/text.py` emits them); no document sees another. positions [B, T] int: RoPE positions (default:
    the position within the document).
    """
    return self.logits(self.hidden(tokens, segment_ids, positions))

  def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
             positions: jax.Array | None = None) -> jax.Array:
    """The last block's output [B, T, D] of the parallel pass (arguments as `__call__`)."""
    packing = segments.packing(segment_ids, positions, tokens.shape)
    return self._run(tokens, None, None, False, False, packing)[0]

  def prefill(self, tokens: jax.Array, max_len: int | None = None, cache=None, *, last_only: bool = False):
    """Parallel pass over the prompt that also returns the decode cache.

    max_len bounds prompt + generated tokens; only full attention (the Transformer) needs it, to size its KV
    cache. With `cache` (from `prefill`, `step` or `init_cache`) the prompt continues that sequence: a long
    prompt fed in pieces, or a second turn, gives the logits of one prefill of the whole (every sublayer runs in
    parallel from its state: `Mamba.__call__`, `Attention.__call__`). Returns
    (logits [B, T, V], cache); with last_only, logits [B, 1, V] of the last position alone (what decoding
    reads: the head over the whole prompt, [T, V] fp32, is the largest matmul and array of a long prefill).
    """
    if cache is not None:
      check_cache_room(self.cfg, cache, tokens.shape[1])
    size = None if cache is not None else self.cache_size(tokens.shape[1], max_len)
    x, cache = self._run(tokens, cache, size, False, True)
    return self.logits(x[:, -1:] if last_only else x), cache

  def step(self, token: jax.Array, cache):
    """Decode one token per row. token [B] -> (logits [B, V], cache)."""
    x, cache = self._run(token[:, None], self.enter_chunk(cache), None, True, True)
    return self.logits(x)[:, 0], cache

  def enter_chunk(self, cache):
    """The cache with every sublayer's memory chunk current for the next token: at a memory-chunk boundary
    (after chunk 0) each block's `start_chunk`, all layers under one condition on the device position (`run_if`);
    else the cache as it is. One condition a token, not one a layer: XLA:GPU reads a loop's or a conditional's
    predicate on the host (a copy to it and a wait for the stream), so every one stalls the GPU between its
    kernels."""
    cfg = self.cfg
    if not (cfg.eidetic or cfg.fading):
      return cache
    pos = attention_state(cache).pos.reshape(-1)[0]                                 # scan_layers: [n_blocks]
    if cfg.compute.scan_layers:                    # each block's own weights: its fading tokens are projected
      graphdef, params = nnx.split(self.blocks)
      start = lambda caches: jax.vmap(lambda p, c: nnx.merge(graphdef, p).start_chunk(c))(params, caches)
    else:
      start = lambda caches: [block.start_chunk(c) for block, c in zip(self.blocks, caches)]
    return run_if(chunk_boundary(pos, cfg.chunk), start, cache)

  def cache_size(self, prompt_len: int, max_len: int | None) -> int | None:
    """Ring slots of the attention cache: the window, or max_len for full attention (`cache_slots`)."""
    return cache_slots(self.cfg, prompt_len, max_len)

  def init_cache(self, batch: int, max_len: int | None = None):
    """The cache before any token (what `prefill` of an empty prompt would return): a list of BlockCaches,
    or with scan_layers one BlockCache whose leaves have a leading n_blocks axis."""
    size = self.cache_size(0, max_len)
    if not self.cfg.compute.scan_layers:
      return [block.init_state(batch, size) for block in self.blocks]
    one = self.blocks.init_state(batch, size)   # the states' shapes come from the config alone
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.cfg.n_blocks, *x.shape)), one)


__all__ = ["AttnState", "Block", "LanguageModel", "MIXERS", "MambaState", "Mixer", "stack_blocks", "unstack_blocks"]
