"""The base of every recipe section: strict, no unknown keys, no NaN (what :mod:`finetune.config` builds on)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section: TOML values are already typed, so "3" for an int is a mistake, not something to coerce."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)
