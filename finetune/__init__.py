"""finetune: transfer learning for small image classifiers (MobileNetV2-class backbones).

``from finetune import Predictor`` is the Python API for prediction (see :mod:`finetune.deploy.predictor`); it is
imported on first use, so that ``import finetune`` (and a recipe error on the command line) does not wait for torch.
"""

from typing import Any

__version__ = "0.7.0"  # the one place the version is kept (pyproject.toml reads it)
__all__ = ["Predictor", "Prediction", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "Prediction"):
        from finetune.deploy import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
