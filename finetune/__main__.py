"""``python -m finetune`` (and ``torchrun -m finetune run RECIPE``): the command line."""

from finetune.cli.app import main

main()
