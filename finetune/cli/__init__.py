"""The ``finetune`` command line (typer): parse, call the assembly, print."""
