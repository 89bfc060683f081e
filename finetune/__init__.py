"""finetune: transfer learning for small image classifiers (MobileNetV2-class backbones).

``from finetune import Predictor`` is the Python API for prediction (see :mod:`finetune.deploy.predictor`), and
``from finetune import load_recipe, run_recipe`` for training (:mod:`finetune.runs.run`). Each is imported on first
use, so that ``import finetune`` (and a recipe error on the command line) does not wait for torch.
"""

import importlib
from typing import Any

__version__ = "0.7.0"  # the one place the version is kept (pyproject.toml reads it)
_LAZY = {  # name -> the module it is imported from on first use
    "Predictor": "finetune.deploy.predictor",
    "Prediction": "finetune.deploy.predictor",
    "load_recipe": "finetune.config",
    "run_recipe": "finetune.runs.run",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
