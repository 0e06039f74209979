"""Continuation of a prompt from a trained run: the latest checkpoint's parameters and the run's tokenizer."""

import sys
import time

from bmojo_jax.train import runs


def generate_from_run(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                      prefill_chunk: int | None = None) -> str:
  """Text of the continuation (or space-separated ids for runs without a tokenizer, e.g. MQAR). prefill_chunk:
  the prompt is prefilled in pieces of this many tokens (`Decoder`'s prefill_chunk)."""
  from bmojo_jax import inference  # pylint: disable=g-import-not-at-top
  model, tokenizer, _, _ = runs.load_model(workdir)
  if tokenizer is None:
    try:
      ids = [int(x) for x in prompt.split()]
    except ValueError:
      raise ValueError(f"This run has no tokenizer (token-id task): give the prompt as token ids separated "
                       f"by spaces, got {prompt!r}.") from None
  else:
    ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
  # `generate` checks the ids against the vocabulary and returns the continuation alone.
  start = time.perf_counter()
  new = inference.generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, prefill_chunk=prefill_chunk)[0]
  seconds = time.perf_counter() - start
  print(f"{len(new)} tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s (prefill and compiling "
        f"included)", file=sys.stderr)
  if tokenizer is None:
    return " ".join(str(int(i)) for i in new)
  return tokenizer.decode(new)
