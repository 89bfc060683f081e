"""The recipe: its schema by section, the rules across sections, ``--set`` overrides and TOML reading.

``from finetune.config import load_recipe, Recipe`` is the entry point; the modules below it are
:mod:`~finetune.config.recipe` (the whole recipe, loading and validation), :mod:`~finetune.config.data` (``[data]``),
:mod:`~finetune.config.objectives` (``[calibrate]``), :mod:`~finetune.config.holdout` (``[data.holdout]``),
:mod:`~finetune.config.rules` (checks across sections), :mod:`~finetune.config.overrides` and
:mod:`~finetune.config.schema` (the strict base of every section).
"""

from finetune.config.data import AugmentConfig, DataConfig
from finetune.config.overrides import apply_overrides, parse_override
from finetune.config.recipe import Recipe, TrainConfig, load_recipe, recipe_to_dict, validate_recipe

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "Recipe",
    "TrainConfig",
    "apply_overrides",
    "load_recipe",
    "parse_override",
    "recipe_to_dict",
    "validate_recipe",
]
