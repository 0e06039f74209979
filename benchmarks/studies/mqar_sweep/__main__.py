"""`python3 -m benchmarks.studies.mqar_sweep`: the sweep's command line (cli.py)."""

from benchmarks.studies.mqar_sweep.cli import main

main()
