"""finetune: transfer learning for small image classifiers (MobileNetV2-class backbones).

``run = finetune.train("recipe.toml", train__epochs=2)`` trains and returns a :class:`~finetune.api.Run`
(``finetune.Run.load(path)`` opens one); ``from finetune import Predictor`` predicts (:mod:`finetune.deploy.predictor`).
Each is imported on first use, so that ``import finetune`` (and a recipe error on the command line) does not wait
for torch.
"""

import importlib
from typing import Any

__version__ = "0.7.0"  # the one place the version is kept (pyproject.toml reads it)
_LAZY = {  # name -> the module it is imported from on first use
    "Predictor": "finetune.deploy.predictor",
    "Prediction": "finetune.deploy.predictor",
    "load_recipe": "finetune.config",
    "run_recipe": "finetune.runs.run",
    "Run": "finetune.api",
    "UserError": "finetune.errors",
}
__all__ = [*_LAZY, "train", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "train":  # the subpackage finetune.train, callable: finetune.train(recipe) is finetune.api.train
        return importlib.import_module("finetune.train")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
