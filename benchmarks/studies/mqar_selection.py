"""Which tokens B'MOJO's selection picks in MQAR, and what recall would need it to pick (issue #15).

    python3 -m benchmarks.studies.mqar_selection --workdir RUN                  # a trained B'MOJO MQAR run (checkpoint)
    python3 -m benchmarks.studies.mqar_selection --train-steps 400 [--selection learned] [--set model.d_model=32]

RUN is a `bmojo-train` workdir or a run folder of `python3 -m benchmarks.studies.mqar_sweep --save-checkpoints`
(read only).
With --train-steps a tiny B'MOJO is first trained on MQAR on this machine by the library's trainer
(`train.trainer.train`; `TINY` below: L 64, N 8, window 8, chunk 8, k_e 4 of 8 per chunk, a score store of 16)
into --train-dir. The model then runs on --examples test examples and, for every attention layer, we report:

* `selected`: of the eidetic selections (k_e per chunk, every chunk), the fraction on each token type of an MQAR
  example (train/data/mqar.py): `key` and `value` of the key-value prefix, `query` (a queried key in the query
  region), `answer_slot` (the filler right after a query, where the answer belongs), `filler` (every other 0);
  `base_rate`: each type's share of all positions; `selection_rate`: P(selected | type).
* the oracle need: a query whose value lies outside its window (p_q − p_v ≥ w) can only be answered exactly
  from memory. `value_in_store`: the fraction of those values in the eidetic store at the query's chunk;
  `value_at_fading`: at a fading-token position of that chunk (a read-out of the state there, not the token);
  `value_in_memory`: either; `value_in_some_store`: in the store of at least one layer (each layer's recall
  writes into the residual stream). `oracle_value_in_store`: the same for a selection that knew the answer (it scores
  the needed values 1, everything else 0) under the same k_e, M_e and store policy: the best any score could do.

Writes JSON (--out, default benchmarks/results/mqar_selection_<device>.json) and a bar plot next to it (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import RESULTS, append_results, apply_overrides, device_name, device_tag, save_figure
from bmojo_jax.config import Family, Selection
from bmojo_jax.memory.parallel_store import stores_before_chunks
from bmojo_jax.memory.scoring import selection_scores
from bmojo_jax.memory.selection import select_per_chunk
from bmojo_jax.probe import attention_inputs
from bmojo_jax.train.data import mqar

# The tiny CPU model of --train-steps: configs/mqar.py's B'MOJO (d 64, L 64, N 8, w 8, chunk 8, batch 64) with a
# store that must choose: k_e 4 of each 8-token chunk into a score store of 16 (room for the 8 values).
TINY = ["model.eidetic_per_chunk=4", "model.n_eidetic=16", "model.store_policy=score", "train.eval_every=0",
        "train.checkpoint_every=100000", "train.progress_bar=False", "train.plot=False", "train.target_accuracy=0.0",
        "data.num_test=256"]


def analyse_layer(attn, a, fading, types, queries, oracle_scores) -> dict:
  """The selection counts and memory coverage of one attention sublayer on one batch (counts, not fractions)."""
  cfg = attn.cfg
  k, v, fk, fv = attn.wk(a), attn.wv(a), attn.wk(fading), attn.wv(fading)
  scores, _ = selection_scores(cfg.selection, attn.score_inputs(a, k, v, fk, fv))
  rows, query, value = queries
  chunk = query // cfg.chunk
  beyond = query - value >= cfg.window

  def in_store(scores):
    sel = select_per_chunk(scores, k, v, cfg.chunk, cfg.eidetic_per_chunk)
    stores = stores_before_chunks(sel, cfg.eidetic, cfg.store_policy)                 # [B, C, M_e]
    pos = np.where(np.asarray(stores.valid), np.asarray(stores.pos), -1)
    return np.asarray(sel.pos), np.asarray(sel.valid), (pos[rows, chunk] == value[:, None]).any(-1)

  sel_pos, sel_valid, stored = in_store(scores)
  oracle = in_store(jnp.asarray(oracle_scores))[2]
  fading_lo = chunk * cfg.chunk - cfg.fading                                         # chunk c's fading positions
  at_fading = (chunk > 0) & (value >= fading_lo) & (value < chunk * cfg.chunk)
  picked = np.take_along_axis(types, np.where(sel_valid, sel_pos, 0).reshape(len(types), -1), 1)
  picked = picked[sel_valid.reshape(len(types), -1)]
  return {"selected": np.bincount(picked, minlength=len(mqar.TOKEN_TYPES)),
          "positions": np.bincount(types.ravel(), minlength=len(mqar.TOKEN_TYPES)), "stored": stored & beyond,
          "queries": len(query), "beyond": int(beyond.sum()), "in_store": int((stored & beyond).sum()),
          "at_fading": int((at_fading & beyond).sum()), "in_memory": int(((stored | at_fading) & beyond).sum()),
          "oracle_in_store": int((oracle & beyond).sum())}


def analyse(model, mq: mqar.MQARConfig, test_seed: int, examples: int, batch: int = 64) -> list[dict]:
  """One dict per attention layer (the module docstring's figures); each also holds `value_in_some_store`, the
  fraction of needed values that the store of at least one layer holds at the query (the same for every layer)."""
  cfg = model.cfg
  if cfg.family != Family.BMOJO:
    raise SystemExit(f"the run is a {cfg.family.value} model: only B'MOJO has eidetic selections")
  totals, some_store = [None] * cfg.n_blocks, 0
  for lo in range(0, examples, batch):
    data = mqar.generate_examples(mq, test_seed, np.arange(lo, min(lo + batch, examples)))
    inputs, targets = data["inputs"], data["targets"]
    types = mqar.token_types(inputs, targets, mq.num_kv_pairs)
    queries = mqar.needed_values(inputs, targets, mq.num_kv_pairs)
    oracle = np.zeros(inputs.shape, np.float32)
    oracle[queries[0], queries[2]] = 1.0
    stored = []
    for i, (attn, a, fading) in enumerate(attention_inputs(model, jnp.asarray(inputs))):
      counts = analyse_layer(attn, a, fading, types, queries, oracle)
      stored.append(counts.pop("stored"))
      totals[i] = counts if totals[i] is None else {k: totals[i][k] + counts[k] for k in counts}
    some_store += int(np.any(stored, axis=0).sum())
  layers = []
  for i, c in enumerate(totals):
    share = lambda x: dict(zip(mqar.TOKEN_TYPES, (x / max(1, x.sum())).round(4).tolist()))
    beyond = max(1, c["beyond"])
    layers.append({
        "layer": i, "selected": share(c["selected"]), "base_rate": share(c["positions"]),
        "selection_rate": dict(zip(mqar.TOKEN_TYPES,
                                   (c["selected"] / np.maximum(1, c["positions"])).round(4).tolist())),
        "selections": int(c["selected"].sum()), "queries": c["queries"],
        "queries_beyond_window": c["beyond"], "value_in_store": round(c["in_store"] / beyond, 4),
        "value_at_fading": round(c["at_fading"] / beyond, 4), "value_in_memory": round(c["in_memory"] / beyond, 4),
        "oracle_value_in_store": round(c["oracle_in_store"] / beyond, 4),
        "value_in_some_store": round(some_store / beyond, 4)})
  return layers


def plot(record: dict, path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = record["layers"]
  fig, axes = plt.subplots(1, len(layers) + 1, figsize=(4.2 * (len(layers) + 1), 3.6), squeeze=False)
  x = np.arange(len(mqar.TOKEN_TYPES))
  for ax, layer in zip(axes[0], layers):
    ax.bar(x - 0.2, [layer["base_rate"][t] for t in mqar.TOKEN_TYPES], 0.4, label="base rate", color="0.7")
    ax.bar(x + 0.2, [layer["selected"][t] for t in mqar.TOKEN_TYPES], 0.4, label=f"{record['selection']} picks")
    ax.set(xticks=x, ylim=(0, 1), title=f"attention layer {layer['layer']}: share of selections")
    ax.set_xticklabels([t.replace("_", "\n") for t in mqar.TOKEN_TYPES], fontsize=8)
    ax.legend(fontsize=8)
  ax = axes[0][-1]
  names = ("value_in_store", "value_at_fading", "value_in_memory", "value_in_some_store", "oracle_value_in_store")
  width = 0.8 / len(layers)
  for j, layer in enumerate(layers):
    ax.bar(np.arange(len(names)) + (j - (len(layers) - 1) / 2) * width, [layer[n] for n in names], width,
           label=f"layer {layer['layer']}")
  ax.set(xticks=np.arange(len(names)), ylim=(0, 1), title="needed values (beyond the window) held")
  ax.set_xticklabels(["store", "fading\nposition", "store or\nfading", "some layer's\nstore", "oracle\nstore"],
                     fontsize=8)
  ax.legend(fontsize=8)
  fig.suptitle(record["title"], fontsize=9)
  return save_figure(fig, path, dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", help="a trained B'MOJO MQAR run (its latest checkpoint is read)")
  p.add_argument("--train-steps", type=int, default=0, help="first train a tiny B'MOJO for this many steps")
  p.add_argument("--train-dir", help="--train-steps: the trainer's workdir (default <tmp>/mqar_selection_<selection>;"
                                     " a finished run of the same config there is reused)")
  p.add_argument("--selection", default=Selection.INNOVATION.value, choices=[s.value for s in Selection],
                 help="--train-steps: the selection score to train with")
  p.add_argument("--set", action="append", default=[], help="--train-steps: config override key=value")
  p.add_argument("--examples", type=int, default=256, help="test examples analysed")
  p.add_argument("--out", help="JSON path (default benchmarks/results/mqar_selection_<device>.json)")
  p.add_argument("--note", default="", help="stored in the record")
  args = p.parse_args(argv)
  if bool(args.workdir) == bool(args.train_steps):
    p.error("give one of --workdir RUN or --train-steps N")

  from bmojo_jax.train import runs, trainer  # pylint: disable=g-import-not-at-top
  workdir = args.workdir
  if args.train_steps:
    from bmojo_jax.configs import mqar as mqar_config  # pylint: disable=g-import-not-at-top
    sets = TINY + [f"model.selection={args.selection}", f"train.num_steps={args.train_steps}"] + args.set
    config = mqar_config.get_config("bmojo")
    apply_overrides(config, sets)
    workdir = args.train_dir or os.path.join(tempfile.gettempdir(), f"mqar_selection_{args.selection}")
    trainer.train(config, workdir)
  config = runs.load_config(workdir)
  setup, params, step = runs.load_run(workdir, config)
  model = nnx.merge(setup.graphdef, params)
  d = config.data
  mq = mqar.MQARConfig(int(d.vocab_size or config.model.vocab_size), int(d.seq_len), int(d.num_kv_pairs),
                       float(d.power_a))
  layers = analyse(model, mq, int(d.test_seed), args.examples)
  cfg = model.cfg
  results = {}
  if os.path.exists(os.path.join(workdir, "results.json")):
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
  record = {"workdir": os.path.abspath(workdir), "step": int(step), "selection": cfg.selection.value,
            "store_policy": cfg.store_policy.value, "test_accuracy": results.get("test_accuracy"),
            "test_loss": results.get("test_loss"), "collapsed": results.get("collapsed"),
            "d_model": cfg.d_model, "L": mq.seq_len, "N": mq.num_kv_pairs, "vocab_size": mq.vocab_size,
            "window": cfg.window, "chunk": cfg.chunk, "n_fading": cfg.fading, "n_eidetic": cfg.eidetic,
            "eidetic_per_chunk": cfg.eidetic_per_chunk, "examples": args.examples, "layers": layers,
            "note": args.note, "device": device_name(), "jax": jax.__version__}
  record["title"] = (f"{cfg.selection.value} selection, {cfg.store_policy.value} store: d {cfg.d_model}, "
                     f"L {mq.seq_len}, N {mq.num_kv_pairs}, w {cfg.window}, k_e {cfg.eidetic_per_chunk}/{cfg.chunk}, "
                     f"M_e {cfg.eidetic}, step {step}, test acc {results.get('test_accuracy', float('nan')):.3f}")
  out = args.out or os.path.join(RESULTS, f"mqar_selection_{device_tag()}.json")
  append_results([record], out)
  figure = plot(record, out.replace(".json", f"_{cfg.selection.value}.png"))
  for layer in layers:
    print(f"layer {layer['layer']}: selected {layer['selected']} (base {layer['base_rate']}); needed values "
          f"beyond the window in store {layer['value_in_store']:.3f}, at fading {layer['value_at_fading']:.3f}, "
          f"some layer's store {layer['value_in_some_store']:.3f}, oracle store {layer['oracle_value_in_store']:.3f}")
  print(f"-> {out}, {figure}")
  return record


if __name__ == "__main__":
  main()
