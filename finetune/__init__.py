"""finetune: transfer learning for small image classifiers (MobileNetV2-class backbones).

``from finetune import Predictor`` is the Python API for prediction (see :mod:`finetune.deploy.predictor`), and
``from finetune import load_recipe, run_recipe`` for training (:mod:`finetune.runs.run`). Each is imported on first
use, so that ``import finetune`` (and a recipe error on the command line) does not wait for torch.
"""

from typing import Any

__version__ = "0.7.0"  # the one place the version is kept (pyproject.toml reads it)
__all__ = ["Predictor", "Prediction", "__version__", "load_recipe", "run_recipe"]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "Prediction"):
        from finetune.deploy import predictor

        return getattr(predictor, name)
    if name == "load_recipe":
        from finetune.config import load_recipe

        return load_recipe
    if name == "run_recipe":
        from finetune.runs.run import run_recipe

        return run_recipe
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
