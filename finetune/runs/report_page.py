"""What a run gets wrong, and why: ``report.html`` (galleries, CAMs) and the label-issue pass, from a run's parts.

The training run writes ``report.html`` after its report; ``finetune report RUN`` rewrites it (more classes, other
caps), ``finetune inspect RUN`` runs the label-issue pass (``label_issues.csv``) and then rewrites it too. Numbers
come from :mod:`finetune.eval` (galleries, label issues, plots), markup from :mod:`finetune.eval.html`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from finetune import runfiles
from finetune.assembly import RunParts
from finetune.data.dataset import batch_images, collate
from finetune.data.leaks import find_duplicates
from finetune.data.samplers import sampler_line
from finetune.errors import UserError
from finetune.eval import cam, gallery, label_issues, plots
from finetune.eval.html import Gallery, Page, Tile, render
from finetune.eval.reject import reject_line
from finetune.eval.run_report import RunReport
from finetune.eval.tables import TARGET_COLUMNS, probabilities_line, target_rows, targets_line
from finetune.eval.tasks import Task
from finetune.hooks.feature_cache import extract_features
from finetune.hooks.probe import best_c, out_of_fold_probs
from finetune.io import atomic_write_text
from finetune.labels import positives_of
from finetune.predictions import Predictions
from finetune.rundir.lock import locking

MAX_GALLERIES = 100  # classes with a gallery, whatever is requested: the file stays bounded (~10 MB at 100)
# Images: above this the report leaves the scan (about 3 ms of phash per image on 2 cores) to validate --check-images
MAX_DUPLICATE_SCAN = 5_000
PROBE_CS = (0.1, 0.3, 1.0)


@dataclass
class HtmlOptions:
    """What ``report.html`` shows."""

    worst: int = 8  # classes with a gallery, lowest AP first (after the requested ones)
    per_class: int = 6  # false positives and false negatives shown per class (single-label: mistakes x 2)
    classes: list[str] = field(default_factory=list)  # class names that get a gallery whatever their AP
    cams: bool = True  # class-activation maps beside the thumbnails (needs the inspect extra)


class Pooled:
    """A run's model as a feature source: timm's pooled pre-classifier features."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """``global_pool(forward_features(x))``: what the classifier sees, before dropout."""
        return self.model.global_pool(self.model.forward_features(x))


def out_of_fold(
    feats: torch.Tensor, targets: torch.Tensor, task: Task, folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Probabilities of a k-fold linear probe: no image is scored by a head that saw its label.

    ``C`` is chosen among :data:`PROBE_CS` by out-of-fold mAP, as the probe stage chooses it (``choose_c``); the
    out-of-fold probabilities of every ``C`` are kept on the way, so each fold is solved once per ``C``, warm-started.

    With fewer images than feature dimensions the features are first rotated onto their row space (an SVD): the
    L2-penalised optimum lies in that span, so the solution is the same and each solve ~2x faster (318 x 1280
    lite0 features: 5.4 s -> 2.5 s a solve, probabilities within 0.004, the solver's tolerance).

    Returns:
        ``[n, classes]`` probabilities and the ``C`` used.
    """
    if len(feats) < feats.shape[1]:
        feats = feats.double() @ torch.linalg.svd(feats.double(), full_matrices=False)[2].T
    probs = out_of_fold_probs(task, feats, targets, list(PROBE_CS), folds, seed)
    best = best_c(list(PROBE_CS), {c: task.metrics(targets.numpy(), p.numpy(), 0.5)["map"] for c, p in probs.items()})
    return probs[best].numpy(), best


def image_name(split: Any, i: int) -> str:
    """How the report names image ``i`` of a split: its path, or ``#i`` for in-memory images (CIFAR-10)."""
    return f"#{i}" if isinstance(split.image_paths, np.ndarray) else str(split.image_paths[i])


def label_pass(parts: RunParts, run: Path, console: Console) -> dict[str, Any]:
    """Suspected label errors on train + val (+ test): writes ``label_issues.csv`` in the run; returns a summary."""
    missing = label_issues.cleanlab_missing()
    if missing:
        raise UserError(missing)
    t0, model = time.perf_counter(), parts.place()
    feats, targets, where = [], [], []
    for role in [r for r in ("train", "val", "test") if r in parts.splits]:
        index: list[torch.Tensor] = []
        f, t = extract_features(Pooled(model), parts.loader(role), device=parts.device, index=index)
        feats.append(f.cpu())
        targets.append(t.cpu())
        where += [(role, image_name(parts.splits[role], i)) for i in torch.cat(index).tolist()]
    x, y = torch.cat(feats), torch.cat(targets).float()
    probs, c = out_of_fold(x, y, parts.task)
    y_np = y.numpy()
    issues = label_issues.find_issues(y_np, probs, parts.task.calibrates)
    rows = label_issues.issue_rows(issues, y_np, probs, list(parts.classes.names), where)
    atomic_write_text(run / runfiles.LABEL_ISSUES, label_issues.csv_text(rows))
    took = time.perf_counter() - t0
    console.print(f"label issues: {len(rows)} of {len(where)} images suspected (probe C={c:g}, {took:.1f} s)")
    return {"images": len(where), "suspected": len(rows), "c": c, "time_s": took}


@dataclass
class _Split:
    """One split's predictions with what draws them: the parts, the model, the options."""

    parts: RunParts
    model: torch.nn.Module
    role: str
    out: Predictions
    opts: HtmlOptions

    def tiles(self, rows: list[int], cam_classes: list[int], captions: list[str]) -> list[Tile]:
        """Thumbnails (and the CAMs of ``cam_classes``) of the prediction rows ``rows``."""
        if not rows:
            return []
        dataset = self.parts.loader(self.role).dataset
        samples = [dataset[int(i)] for i in self.out.index[rows]]
        good = [i for i, s in enumerate(samples) if "image" in s]
        heat: dict[int, np.ndarray] = {}
        if self.opts.cams and good:
            inputs = batch_images(collate([samples[i] for i in good]), self.parts.device)
            layer = cam.target_layer(self.model, self.parts.image_size)[1]
            heat = dict(zip(good, cam.activation_maps(self.model, inputs, [cam_classes[i] for i in good], layer)))
        tiles = []
        for i, s in enumerate(samples):
            if "image" not in s:
                tiles.append(Tile(None, f"{captions[i]} ({s['error']})"))
                continue
            pixels = s["image"].permute(1, 2, 0).numpy()
            cam_uri = gallery.thumbnail_uri(cam.overlay(pixels, heat[i])) if i in heat else None
            tiles.append(Tile(gallery.thumbnail_uri(pixels), captions[i], cam_uri))
        return tiles

    def caption(self, row: int, cls: int) -> str:
        """Score of ``cls``, the given labels and the file name of one prediction row."""
        names, out = self.parts.classes.names, self.out
        given = ", ".join(names[c] for c in np.flatnonzero(positives_of(out.targets[row]))) or "no label"
        path = Path(image_name(self.parts.splits[self.role], int(out.index[row]))).name
        return f"p({names[cls]}) = {out.probs[row, cls]:.2f}; labels: {given}; {path}"


def _multi_label_galleries(s: _Split, thr: np.ndarray) -> list[Gallery]:
    names, out, opts = list(s.parts.classes.names), s.out, s.opts  # --class names checked by _check_run
    requested = [names.index(c) for c in opts.classes][:MAX_GALLERIES]
    worst = max(0, min(opts.worst, MAX_GALLERIES - len(requested)))
    galleries = []
    for c in gallery.classes_to_show(out.targets, out.probs, worst, requested):
        m = gallery.class_mistakes(out.targets, out.probs, c, float(thr[c]), opts.per_class)
        support = int(positives_of(out.targets[:, c]).sum())
        title = f"{names[c]}: {support} positive{'s' * (support != 1)} in {s.role}, threshold {thr[c]:.3f}"
        g = Gallery(f"class-{c}", title)
        heads = ("false positives (highest scores first)", "false negatives (lowest scores first)")
        for head, rows, n in zip(heads, (m.false_positives, m.false_negatives), m.counts):
            caps = [s.caption(r, c) for r in rows]
            g.rows.append((f"{head}: {len(rows)} shown of {n}", s.tiles(rows, [c] * len(rows), caps)))
        galleries.append(g)
    return galleries


def _single_label_galleries(s: _Split) -> tuple[list[Gallery], tuple[str, list[str], list[list[str]]]]:
    names, out = list(s.parts.classes.names), s.out
    rows = gallery.confident_mistakes(out.targets, out.probs, 2 * s.opts.per_class)
    pred = out.probs.argmax(1)
    caps = [
        f"true {names[int(out.targets[r].argmax())]}, predicted {names[pred[r]]} ({out.probs[r, pred[r]]:.2f})"
        for r in rows
    ]
    g = Gallery("mistakes", f"most confident mistakes in {s.role} (CAM: the predicted class)")
    g.rows.append((f"{len(rows)} shown", s.tiles(rows, [int(pred[r]) for r in rows], caps)))
    pairs = gallery.confused_pairs(out.targets, out.probs, 20)
    table = (
        "most confused pairs",
        ["true", "predicted", "images"],
        [[names[t], names[p], str(n)] for t, p, n in pairs],
    )
    return [g], table


def _thresholds(report: RunReport, role: str, n: int) -> np.ndarray:
    """The thresholds the report's split was scored at: calibrated when there are, else the fixed one."""
    rows = report.splits[role].per_class
    if rows and "threshold_cal" in rows[0]:
        return np.array([r["threshold_cal"] for r in rows])
    return np.full(n, float(report.threshold or 0.5))


PLOTS = (
    (runfiles.CURVES, "training curves"),
    (runfiles.PR_CURVES, "precision-recall curves, each class's operating point marked"),
    (runfiles.F1_BARS, "per-class F1: fixed vs calibrated threshold"),
    (runfiles.CONFUSION, "confusion matrix (most-confused classes)"),
    (runfiles.RELIABILITY, "reliability diagram: the probabilities before and after scaling, on held-out data"),
    (runfiles.COVERAGE, "reject option: coverage vs accuracy of the answered images, on held-out data"),
)


def _plots(run: Path, parts: RunParts) -> list[tuple[str, str]]:
    """``curves.png`` drawn from ``metrics.jsonl``, then every plot of the run, as embedded PNGs."""
    if (run / runfiles.METRICS).is_file():
        records = [json.loads(line) for line in (run / runfiles.METRICS).read_text().splitlines() if line.strip()]
        policy = parts.policy
        trained = {i + 1: s.train for i, s in enumerate(policy.stages)} if policy is not None else None
        if records:
            plots.training_curves(records, run / runfiles.CURVES, f"{run.name}: per epoch", trained)
    return [(caption, gallery.png_uri((run / name).read_bytes())) for name, caption in PLOTS if (run / name).is_file()]


def _duplicates_note(parts: RunParts) -> str:
    """The report's line on duplicated and leaked images (the scan of ``validate --check-images``)."""
    n = sum(len(s.image_paths) for s in parts.splits.values())
    if n > MAX_DUPLICATE_SCAN:
        return f"duplicates: not scanned for the report ({n} images); run finetune validate --check-images"
    found = find_duplicates(parts.splits)
    leaks = [d for d in found if d.leak]
    line = f"duplicates: {len(found) - len(leaks)} within splits, {len(leaks)} leaked across splits"
    shown = "; ".join(d.line() for d in (leaks or found)[:3])
    return line + (f" (e.g. {shown}; all: finetune validate --check-images)" if found else "")


def _label_table(run: Path, limit: int = 50) -> tuple[str, list[str], list[list[str]]] | None:
    import csv

    path = run / runfiles.LABEL_ISSUES
    if not path.is_file():
        return None
    rows = list(csv.reader(path.open(newline="")))
    body = rows[1 : limit + 1]
    return (f"suspected label errors (label_issues.csv: top {len(body)} of {len(rows) - 1})", rows[0], body)


def write_html(
    run: Path,
    parts: RunParts,
    model: torch.nn.Module,
    report: RunReport,
    outs: dict[str, Predictions] | None,
    opts: HtmlOptions,
    why_no_images: str = "",
) -> Path:
    """Write ``report.html`` in the run: summary, per-class table, plots, galleries with CAMs, label issues.

    Args:
        run: The run directory.
        parts: The run's parts (classes, splits, loaders, device).
        model: The model the predictions came from (CAMs are drawn on it).
        report: The run's ``report.json``.
        outs: Predictions per split (``predict_loader``); None when the images cannot be read.
        opts: What to show.
        why_no_images: Said in place of the galleries when ``outs`` is None.
    """
    role = report.shown_split
    page = Page(f"{run.name}: {parts.model_name}, {len(parts.classes)} classes, {parts.task.name}", report)
    page.plots = _plots(run, parts)
    if outs is None:
        page.gallery_note = f"no galleries: {why_no_images}"
    else:
        page.notes.append(_duplicates_note(parts))
        if opts.cams and cam.cam_missing():
            page.notes.append(cam.cam_missing())
            opts = HtmlOptions(opts.worst, opts.per_class, opts.classes, cams=False)
        s = _Split(parts, model, role, outs[role], opts)
        if parts.task.calibrates:
            page.galleries = _multi_label_galleries(s, _thresholds(report, role, len(parts.classes)))
        else:
            page.galleries, confused = _single_label_galleries(s)
            page.tables.append(confused)
    if report.probabilities:
        page.notes.append(probabilities_line(report.probabilities))
    if report.reject:
        page.notes.append(reject_line(report.reject))
    if report.sampler:
        page.notes.append(sampler_line(report.sampler))
    targets = report.operating_points
    if targets:
        page.notes.append(targets_line(targets))
        page.tables.append(("operating points", TARGET_COLUMNS, target_rows(targets)))
    labels = _label_table(run)
    if labels is None:
        missing = label_issues.cleanlab_missing()
        page.notes.append(
            f"suspected label errors: not computed; run finetune inspect {run}" + (f" ({missing})" if missing else "")
        )
    else:
        page.tables.append(labels)
    atomic_write_text(run / runfiles.REPORT_HTML, render(page, role))
    return run / runfiles.REPORT_HTML


def _check_run(run_dir: str | Path, opts: HtmlOptions) -> Any:
    """The run, refused in one line without ``best.pt`` / ``report.json`` or with a ``--class`` it does not have."""
    from finetune.rundir.directory import RunDir

    run = RunDir.open(run_dir)
    for name, why in ((runfiles.BEST, "it has not finished an epoch"), (runfiles.REPORT, "it has not finished")):
        if not (run / name).is_file():
            raise UserError(f"{run_dir}: no {name} ({why}); finish it with finetune run --resume {run_dir}")
    names = list(run.classes().names)
    unknown = [c for c in opts.classes if c not in names]
    if unknown:
        raise UserError(f"--class {unknown[0]!r}: not a class of this run (see classes.json)")
    return run


@locking("finetune report")
def report_run(
    run_dir: str | Path,
    opts: HtmlOptions | None = None,
    console: Console | None = None,
    parts: RunParts | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """``finetune report RUN``: re-predict val/test with ``best.pt`` and rewrite ``report.html``.

    When the images cannot be read (a moved data root, a missing split), the page is written from ``report.json``
    without galleries, and says why.
    """
    from finetune.assembly import build_from_run
    from finetune.runs.predict import predictions

    opts = opts or HtmlOptions()
    run = _check_run(run_dir, opts)
    console = console or Console(stderr=True)
    report = RunReport.load(run / runfiles.REPORT)
    roles = [r for r in ("train", "val", "test") if r != "test" or run.report_recipe(overrides).data.has_test]
    parts = parts or build_from_run(run, roles, overrides, console)
    outs, why = None, ""
    try:
        outs = predictions(parts, [r for r in report.splits if r in ("val", "test")])
    except UserError as err:
        why = str(err)
        console.print(f"[yellow]note[/] report.html without galleries: {why}")
    path = write_html(run.path, parts, parts.place(), report, outs, opts, why)
    console.print(f"wrote {path}")
    return path


def inspect_run(
    run_dir: str | Path,
    opts: HtmlOptions | None = None,
    console: Console | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """``finetune inspect RUN``: the label-issue pass (``label_issues.csv``), then ``report.html`` with it."""
    from finetune.assembly import build_from_run

    opts = opts or HtmlOptions()
    run = _check_run(run_dir, opts)  # before the long pass, not after it
    console = console or Console(stderr=True)
    roles = [r for r in ("train", "val", "test") if r != "test" or run.report_recipe(overrides).data.has_test]
    parts = build_from_run(run, roles, overrides, console)
    label_pass(parts, run.path, console)
    return report_run(run_dir, opts, console, parts, overrides)
