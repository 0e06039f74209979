"""The MQAR sweep of docs/evals.md: families × d_model × learning rates × N at L=256, window 32, on one device.

    python3 -m benchmarks.studies.mqar_sweep --budget-s 480                # resumable; -> $OUT/mqar_sweep_<device>.json
    python3 -m benchmarks.studies.mqar_sweep --families bmojo,hybrid --d-models 128 --kv-pairs 32 --epochs 4
    python3 -m benchmarks.studies.mqar_sweep --throughput --runs 1,4,8       # population vs single-run trainer tokens/s
    python3 -m benchmarks.studies.mqar_sweep --smoke                           # tiny; ~2 min on 2 CPU cores
    python3 -m benchmarks.studies.mqar_sweep --table benchmarks/results/mqar_sweep_h200.json  # best accuracies
    python3 -m benchmarks.studies.mqar_sweep --recheck benchmarks/results/mqar_sweep_h200.json [--only d_model=128]

One population (`train.population`) per (family, d_model, N) trains the learning rates (× `--seeds`) together
on the same data stream, each run stopping at test accuracy 0.99. The model and training settings are
`benchmarks/studies/mqar_zoology.py`'s (Zoology: vocab 8192, batch 256, 100k train / 3k test, AdamW wd 0.1, cosine,
no warmup, evaluation every half epoch); `--set key=value` overrides any config field. Families: the five,
plus the equal-memory baseline of docs/evals.md, a Hybrid whose window is B'MOJO's w + M_f + M_e
(`hybrid` with `variant` "equal_memory"); the Transformer is the full-attention reference.

`--selection` picks B'MOJO's selection score (`bmojo_jax.config.Selection`; docs/mqar.md, "Selection variants"),
recorded, like the store policy, in each record and its key; `--selections a,b,...` trains one B'MOJO population
per score (the families without an eidetic store once); `--save-checkpoints` keeps every run's final state
for `benchmarks/studies/mqar_selection.py`.

`--patience P` (docs/mqar.md, "To convergence"): each run also evaluates a validation split of `--num-val`
examples (its own seed) and stops once P evaluations in a row leave its validation accuracy no better than its
best + `--min-delta`; its record holds the test figures of its best validation evaluation (`best_step`,
`val_accuracy`), and `--epochs` is the cap. `patience` is a key field (records written before it: 0).

Results: one record per run in `<out>/mqar_sweep_<device>.json` (out: --out, else $OUT, else
benchmarks/results), written after each population. A rerun skips the runs already recorded there or in
`benchmarks/results/mqar_sweep_<device>.json` (copy a returned file there to resume). `--budget-s` stops
starting populations once the elapsed time plus the longest population so far would pass it. The figure
(`mqar_sweep_<device>.png`, like Zoology's figure 2: best accuracy over learning rates against state bytes,
a line per family, a panel per N) is redrawn from all records at the end, and the same values are printed as a
markdown table (`table`: per model, d_model and N the best learning rate's mean over seeds, its run count and
range).

`--gpus 0,1` spreads the populations over those GPUs: one worker process per GPU (`CUDA_VISIBLE_DEVICES`; a
population on a GPU of its own, since two sharing one ran much slower), each taking the next population that
no worker has claimed (`<out>/claims/`), so the fast and slow populations balance themselves. Workers write
`mqar_sweep_<device>.worker<i>.json`; the launcher merges them into the results file when they end, and a rerun
merges what a cut run's workers left.
"""
