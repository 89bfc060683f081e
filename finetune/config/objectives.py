"""What the decision thresholds aim at: the ``[calibrate]`` section and its per-class operating points.

    [calibrate]
    objective = "recall_at_least"     # or "f1" (default), "fbeta", "precision_at_least"; "metric" is the old name
    target = 0.9
    margin = 0.02                     # aim at target + margin on the fitting split
    classes = { person = { objective = "precision_at_least", target = 0.95 } }

A single-label run has one threshold, on its top probability: ``objective = "accuracy_at_least"`` with ``target``
answers "none of the above" below it (the reject option, finetune/eval/reject.py).

The search itself is :func:`finetune.eval.thresholds.fit_thresholds`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, model_validator

from finetune.config.schema import Section

Objective = Literal["f1", "fbeta", "precision_at_least", "recall_at_least", "accuracy_at_least"]
CONSTRAINED = ("precision_at_least", "recall_at_least")
REJECT = "accuracy_at_least"  # single-label: the top probability's threshold, below which no class is answered
_OBJECTIVE = {"validation_alias": AliasChoices("objective", "metric")}
Target = Annotated[float, Field(gt=0.0, le=1.0)]


def _one_name(data: object) -> object:
    """``objective`` and its old name ``metric`` both given: the one given last counts.

    A ``--set`` of either is applied after the file is read, so it comes last and replaces the file's value.
    """
    if isinstance(data, dict) and "objective" in data and "metric" in data:
        keys = list(data)
        last = "objective" if keys.index("objective") > keys.index("metric") else "metric"
        data = {k: v for k, v in data.items() if k != ("metric" if last == "objective" else "objective")}
    return data


def _needs_target(objective: str, target: float | None, where: str) -> None:
    if (objective in CONSTRAINED or objective == REJECT) and target is None:
        raise ValueError(f'{where}objective = "{objective}" needs a target in (0, 1], e.g. target = 0.9')


class ClassObjective(Section):
    """One class's operating point, in place of the section's."""

    metric: Objective = Field(
        "f1", **_OBJECTIVE, description="this class's objective: f1, precision_at_least or recall_at_least"
    )
    target: Target | None = Field(None, description="this class's floor for a *_at_least objective (0..1)")

    _names = model_validator(mode="before")(_one_name)

    @model_validator(mode="after")
    def _check(self) -> ClassObjective:
        if self.metric == REJECT:
            raise ValueError(f'objective = "{REJECT}" is for the whole of a single-label run, not one class')
        _needs_target(self.metric, self.target, "")
        return self


class CalibrateConfig(Section):
    """Per-class decision thresholds fitted after training (finetune/eval/thresholds.py)."""

    enabled: bool = Field(True, description="fit per-class thresholds after training")
    split: Literal["val", "train"] = Field(
        "val", description='"val", or "train" (unaugmented) when val is small; test is never used to fit'
    )
    metric: Objective = Field("f1", description="what each threshold aims at (key: objective or metric)", **_OBJECTIVE)
    beta: float = Field(1.0, gt=0.0, description="F-beta's beta for metric = fbeta (2: recall weighs more)")
    target: Target | None = Field(
        None, description="the precision, recall or (single-label) accuracy a constrained objective must reach"
    )
    margin: float = Field(0.0, ge=0.0, lt=1.0, description="constrained objectives aim at target + margin")
    classes: dict[str, ClassObjective] = Field(default_factory=dict, description="per-class objective and target")
    probabilities: Literal["none", "temperature", "platt"] = Field(
        "none", description="per-class scaling of the probabilities, fitted before the thresholds"
    )
    min_positives: int = Field(5, ge=1, description="fewer positives: the class takes the global threshold")
    shrink: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        "auto", description='pseudo-count pulling thresholds toward the global one; "auto" = chosen by cross-fitting'
    )
    folds: int = Field(5, ge=2, description="cross-fitting folds when there is no test split")

    _names = model_validator(mode="before")(_one_name)

    @model_validator(mode="after")
    def _check(self) -> CalibrateConfig:
        _needs_target(self.metric, self.target, "")
        return self

    @property
    def constrained(self) -> bool:
        """Some class aims at a precision or recall target."""
        return self.metric in CONSTRAINED or any(c.metric in CONSTRAINED for c in self.classes.values())

    @property
    def reject(self) -> bool:
        """A single-label run answers "none of the above" below a threshold on its top probability."""
        return self.metric == REJECT
