"""``python -m finetune`` (and ``torchrun -m finetune run RECIPE``): the command line."""

from finetune.cli import main

main()
