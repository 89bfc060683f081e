"""The training loop: its state and :class:`~finetune.train.loop.Hook` base, fit, mixing and the LR range test.

Nothing here reads a recipe: the assembly (:mod:`finetune.assembly`) builds the loop's settings and hooks.

This package is also callable: ``finetune.train("recipe.toml", train__epochs=2)`` is :func:`finetune.api.train`.
Python binds ``finetune.train`` to this package as soon as any of its modules is imported, so a plain function of
that name in ``finetune/__init__.py`` would be replaced; the call goes through the package instead, by name, since
the API sits layers above the loop.
"""

import importlib
import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("finetune.api").train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
