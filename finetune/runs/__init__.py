"""Workflows on a run: train it, evaluate it, write its report page, compare and sweep recipes; its directory and lock.

Each workflow builds its parts through :mod:`finetune.assembly` and owns the files it writes in the run directory
(:mod:`finetune.runs.rundir`).
"""
