"""``report.json`` as a typed object: :class:`RunReport` is the one place that reads the report's keys by name.

The file on disk is unchanged (its keys are the JSON the tools and the tests read); every module that uses a report
(the console tables, ``report.md``, ``report.html``, the model card, ``sweep``, the CLI) goes through these
properties. A view never writes into the data it was built from, and hands out copies of what it holds.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What ``finetune calibrate`` carries over from the training run's report when it writes a new one.
CARRIED = ("best_epoch", "select", "bad_images", "stop_reason")


@dataclass(frozen=True)
class Honest:
    """The calibration gain measured on data the thresholds were not fitted on: where, and the two summaries."""

    how: str
    fixed: dict[str, float]
    calibrated: dict[str, float]


class SplitReport:
    """One split's numbers: its summary and per-class rows (and, multi-label, the calibrated summary)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._d = data

    @property
    def images(self) -> int:
        """Images scored."""
        return int(self._d["images"])

    @property
    def summary(self) -> dict[str, float]:
        """Headline metrics at the fixed threshold (multi-label) or the arg-max (single-label)."""
        return dict(self._d["summary"])

    @property
    def calibrated_summary(self) -> dict[str, float] | None:
        """Headline metrics at the calibrated thresholds (multi-label, once calibrated)."""
        cal = self._d.get("calibrated")
        return dict(cal["summary"]) if cal else None

    @property
    def per_class(self) -> list[dict[str, Any]]:
        """One record per class (``index``, ``name``, ``support``, the metrics): a table's rows."""
        return [dict(r) for r in self._d["per_class"]]

    @property
    def threshold(self) -> float | None:
        """The fixed threshold the summary is at (multi-label)."""
        return self._d.get("threshold")

    @property
    def unknown(self) -> int:
        """Unknown (image, class) labels, left out of every number."""
        return int(self._d.get("unknown") or 0)

    @property
    def confusion(self) -> list[tuple[int, int, int]]:
        """Single-label: sparse ``(true, predicted, count)`` triples."""
        return [(int(t), int(p), int(n)) for t, p, n in self._d.get("confusion", [])]


class RunReport:
    """A run's ``report.json`` (or an ``eval_<split>.json``), read through typed properties."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._d = copy.deepcopy(data)

    @classmethod
    def of(cls, report: RunReport | dict[str, Any]) -> RunReport:
        """A report as it is, or a view of a ``report.json`` document read with ``json`` (as 0.7 passed them)."""
        return report if isinstance(report, RunReport) else cls(report)

    @classmethod
    def load(cls, path: Path) -> RunReport:
        """Read a report file."""
        return cls(json.loads(Path(path).read_text()))

    def to_json(self) -> dict[str, Any]:
        """The JSON document (a copy)."""
        return copy.deepcopy(self._d)

    def __getitem__(self, key: str) -> Any:
        """``report["splits"]``, as the ``report.json`` dicts were read (0.7 and before): deprecated, use properties."""
        warnings.warn(f"RunReport[{key!r}] is deprecated; use its properties or .to_json()", DeprecationWarning, 2)
        return copy.deepcopy(self._d[key])

    def __contains__(self, key: str) -> bool:
        """``"calibration" in report``, as the dicts were asked (0.7 and before)."""
        return key in self._d

    @property
    def run(self) -> str:
        """The run directory it was written for (``evaluation`` when none is named)."""
        return str(self._d.get("run", "evaluation"))

    @property
    def task(self) -> str:
        """``multi_label`` or ``single_label``."""
        return str(self._d["task"])

    @property
    def splits(self) -> dict[str, SplitReport]:
        """The scored splits, in the order they were reported (val, then test)."""
        return {name: SplitReport(s) for name, s in self._d["splits"].items()}

    @property
    def shown_split(self) -> str:
        """The split a summary shows: test when it was scored, else the first (val)."""
        return "test" if "test" in self._d["splits"] else next(iter(self._d["splits"]))

    @property
    def threshold(self) -> float | None:
        """The fixed threshold (multi-label)."""
        return self._d.get("threshold")

    @property
    def thresholds_how(self) -> str | None:
        """``eval`` reports: which thresholds scored the split (a file, or the fixed one)."""
        return self._d.get("thresholds")

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The calibration's record (fitted on, metric, shrink, thresholds' gains), or None when not calibrated."""
        cal = self._d.get("calibration")
        return copy.deepcopy(cal) if cal else None

    @property
    def honest(self) -> Honest | None:
        """The calibration gain on data it was not fitted on, when the run was calibrated."""
        h = (self._d.get("calibration") or {}).get("honest")
        return Honest(h["how"], dict(h["fixed"]), dict(h["calibrated"])) if h else None

    @property
    def operating_points(self) -> dict[str, Any] | None:
        """The per-class targets (``calibrate.targets``) and what they reached, when any were set."""
        t = (self._d.get("calibration") or {}).get("targets")
        return copy.deepcopy(t) if t else None

    @property
    def probabilities(self) -> dict[str, Any] | None:
        """The probability scaling's record (ECE and Brier before and after), when one was fitted."""
        return copy.deepcopy(self._d.get("probabilities")) or None

    @property
    def reject(self) -> dict[str, Any] | None:
        """Single-label: the reject option's record, when one was fitted."""
        return copy.deepcopy(self._d.get("reject")) or None

    @property
    def sampler(self) -> dict[str, Any] | None:
        """The balanced sampler's draw per epoch, when the run used it."""
        return copy.deepcopy(self._d.get("sampler")) or None

    @property
    def voc07_map(self) -> dict[str, float]:
        """PASCAL VOC runs: VOC07's 11-point interpolated mAP per split."""
        return dict(self._d.get("voc07_map") or {})

    @property
    def carried(self) -> dict[str, Any]:
        """The training run's facts a re-calibration keeps (best epoch, selection metric, bad images, stop)."""
        return {k: copy.deepcopy(v) for k, v in self._d.items() if k in CARRIED}
