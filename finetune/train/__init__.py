"""The training loop: its state and :class:`~finetune.train.loop.Hook` base, fit, mixing and the LR range test.

Nothing here reads a recipe: the assembly (:mod:`finetune.assembly`) builds the loop's settings and hooks.
"""
