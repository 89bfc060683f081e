"""The recipe-key reference, generated from the schema: every key with its default and description, by section.

The documentation's key table is this (``docs/hooks.py`` puts it in the page at build time), so a key is described
once, in its pydantic ``Field``; ``tests/test_docs.py`` fails when a key has no description.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from finetune.config.recipe import Recipe


def section_of(annotation: Any, shape: str = "") -> tuple[type[BaseModel], str] | None:
    """The section model a field holds and how its keys are reached, or None for a value.

    ``DataConfig`` is reached as ``""``, ``list[StageConfig]`` as ``"[]"``, ``dict[str, ClassConfig]`` as
    ``".<class>"``.
    """
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, shape
    origin = typing.get_origin(annotation)
    if origin is list:
        shape = "[]"
    elif origin is dict:
        shape = ".<class>"
    for t in typing.get_args(annotation):
        inner = section_of(t, shape)
        if inner is not None:
            return inner
    return None


def recipe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """Every key of a recipe, depth first: ``(dotted key, default, description)``.

    A list of sections is shown as ``freeze.stages[].epochs`` and a map of them as ``calibrate.classes.<class>.metric``.
    """
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        section = section_of(field.annotation)
        if section is not None:
            yield from recipe_keys(section[0], key + section[1] + ".")
            continue
        default = field.get_default(call_default_factory=True)
        yield key, (None if default is PydanticUndefined else default), field.description or ""


def _cell(text: str) -> str:
    """Text for a Markdown table cell: ``|`` escaped, and ``<``/``>`` kept as text (``root/<split>/<class>``)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _default(value: Any) -> str:
    """The default as code, or as escaped text where it holds a ``|`` (a table cell cannot escape it in code)."""
    if value is None:
        return ""
    text = value.model_dump_json() if isinstance(value, BaseModel) else json.dumps(value)
    return _cell(text) if "|" in text else f"`{text}`"


def keys_markdown() -> str:
    """The reference as Markdown: one table per top-level section."""
    out: list[str] = []
    section = None
    for key, default, description in recipe_keys():
        top = key.split(".")[0]
        if top != section:
            section = top
            out += ["", f"### `[{top}]`", "", "| key | default | meaning |", "|---|---|---|"]
        out.append(f"| `{key.partition('.')[2]}` | {_default(default)} | {_cell(description)} |")
    return "\n".join(out).lstrip("\n") + "\n"
