"""Continuation of a prompt from a trained run: the latest checkpoint's parameters and the run's tokenizer."""

import sys
import time
from typing import TextIO

from bmojo_jax.train import runs


def generate_from_run(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                      prefill_chunk: int | None = None, stream_to: TextIO | None = None,
                      stream_block: int = 16, kernel_layout: str | None = None) -> str:
  """Text of the continuation (or space-separated ids for runs without a tokenizer, e.g. MQAR). prefill_chunk:
  the prompt is prefilled in pieces of this many tokens (`Decoder`'s prefill_chunk). stream_to: a text stream
  that gets the continuation as it is produced, every stream_block decode steps (`generate_stream`; the same
  tokens as `generate`), flushed each time; None: all at once on device (`generate`). kernel_layout: how the
  decoder stores the projection kernels (`Decoder`'s kernel_layout; None: its default, out_in on a GPU)."""
  from bmojo_jax import inference  # pylint: disable=g-import-not-at-top
  model, tokenizer, _, _ = runs.load_model(workdir)
  decoder = inference.Decoder(model, kernel_layout=kernel_layout)
  if tokenizer is None:
    try:
      ids = [int(x) for x in prompt.split()]
    except ValueError:
      raise ValueError(f"This run has no tokenizer (token-id task): give the prompt as token ids separated "
                       f"by spaces, got {prompt!r}.") from None
  else:
    ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
  render = (lambda new: " ".join(str(int(i)) for i in new)) if tokenizer is None else tokenizer.decode
  # `generate` / `generate_stream` check the ids against the vocabulary and return the continuation alone.
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            prefill_chunk=prefill_chunk)
  start = time.perf_counter()
  if stream_to is None:
    new = inference.generate(decoder, [ids], **kw)[0]
  else:
    new, shown = [], ""
    for part in inference.generate_stream(decoder, [ids], block=stream_block, **kw):
      new += part[0]
      shown = _show(stream_to, shown, render(new), final=False)
    _show(stream_to, shown, render(new), final=True)
  seconds = time.perf_counter() - start
  print(f"{len(new)} tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s (prefill and compiling "
        f"included; kernel_layout {decoder.kernel_layout})", file=sys.stderr)
  return render(new)


def _show(out: TextIO, shown: str, text: str, *, final: bool) -> str:
  """Write what text adds to what was shown (the text so far) and flush; returns what is shown now. A text whose
  end is an incomplete character (U+FFFD: a byte-level token cut mid-character) or that rewrote what was shown
  waits for more tokens, until the final call, which writes the rest (on a line of its own if it rewrote)."""
  if text.startswith(shown) and (final or not text.endswith("\ufffd")):
    out.write(text[len(shown):])
  elif final:
    out.write("\n" + text)
  else:
    return shown
  out.flush()
  return text
