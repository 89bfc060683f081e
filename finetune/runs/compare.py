"""``finetune compare``: recipes trained on the same paired draws, and whether their difference is more than noise.

Per seed, ``[data.holdout]`` splits the recipes' shared val split (the pool) in two: the selection half is the
val role (checkpoints, the probe's C, the thresholds), the scoring half the test role, read only for the table.
Every recipe and the linear-probe baseline see the same halves for a seed (the draw depends on the pool and the
seed alone) and the same training seed. Per pair, the paired mean difference and its bootstrap interval over
images and seeds (:mod:`finetune.eval.bootstrap`).

Everything lives under the output folder: ``runs/<label>-s<seed>`` (ordinary run directories, their logs in
``logs/``), per finished run ``results/<label>-s<seed>.json`` and ``.npz`` (its scoring-half predictions), then
``compare.json`` and ``compare.md``. A stopped compare continues: finished runs are read back, a run with a
``last.pt`` resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from finetune import runfiles
from finetune.config import Recipe, load_recipe, recipe_to_dict
from finetune.errors import UserError
from finetune.eval.bootstrap import METRICS, Scored, check_paired, interval, metric_draws, resample_plan
from finetune.eval.report import load_thresholds
from finetune.eval.tasks import task_for
from finetune.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_output_folder

PROBE = [  # the linear-probe baseline: the solved head, then one epoch that changes nothing (the run's report)
    'freeze.bn="all"',
    'freeze.stages=[{train = ["classifier"], solver = "lbfgs"}, {train = ["classifier"], epochs = 1, lr = 1e-12}]',
    "freeze.cache_features=true",
    "train.epochs=1",
    "train.ema=0.0",
]
LABEL = re.compile(r"[A-Za-z0-9._+-]+")
MAX_RESAMPLES = 20_000
NAMES = {"map": "mAP", "macro_f1_cal": "macro-F1 cal", "micro_f1_cal": "micro-F1 cal", "top1": "top-1"}


@dataclass
class Entry:
    """One row of the comparison: a recipe file with its overrides."""

    label: str
    path: Path
    overrides: list[str] = field(default_factory=list)
    holdout_seed: int | None = None  # one draw for every seed (a sweep's: its trials saw that selection half)

    def recipe(self, seed: int, out: Path) -> Recipe:
        """The recipe for one seed: the seed's holdout draw and training seed, its run directory under ``out``."""
        draw = seed if self.holdout_seed is None else self.holdout_seed
        sets = [
            *self.overrides,
            f"data.holdout.seed={draw}",
            "data.holdout.scoring=true",
            'data.test=""',
            f"train.seed={seed}",
            f'output.dir="{(out / "runs").as_posix()}"',
            f'output.name="{self.label}-s{seed}"',
        ]
        return load_recipe(self.path, sets)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; empty, non-integer or repeated seeds are one line."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--seeds {text!r}: seeds are integers separated by commas") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: a seed is repeated; each seed is one paired draw")
    if not all(0 <= s < 2**32 for s in seeds):
        raise UserError(f"--seeds {text!r}: seeds are 0 to {2**32 - 1} (NumPy's seed range)")
    return seeds


def plan(recipes: list[Path], overrides: list[str], variants: list[str], probe: bool = True) -> list[Entry]:
    """The rows: a probe baseline per distinct (image size, TTA) unless ``probe`` is off, the recipes, the variants.

    A variant is ``NAME=KEY=VALUE`` (repeat a name to give it several overrides): the first recipe with those.
    """
    if not recipes:
        raise UserError("compare: name at least one recipe")
    rows: list[Entry] = []
    for path in recipes:
        label = path.stem
        while label in [e.label for e in rows]:
            label += "-2"
        rows.append(Entry(label, path, list(overrides)))
    recipe_labels = {e.label for e in rows}
    for v in variants:
        name, _, setting = v.partition("=")
        if not name or "=" not in setting:
            raise UserError(f"--variant {v!r}: expected NAME=KEY=VALUE, e.g. --variant no-ema=train.ema=0.0")
        if name in recipe_labels or name.startswith("probe-"):
            raise UserError(f"--variant {v!r}: {name!r} names a recipe or probe row; give the variant its own name")
        found = next((e for e in rows if e.label == name), None)
        if found is None:
            rows.append(Entry(name, recipes[0], [*overrides, setting]))
        else:
            found.overrides.append(setting)
    for e in rows:
        if not LABEL.fullmatch(e.label) or e.label.startswith("probe-"):
            raise UserError(f"compare: row name {e.label!r}: use letters, digits and . _ + - (not probe-...)")
        load_recipe(e.path, e.overrides)  # as written, before compare's own draw: a holdout and data.test refused
    return with_probes(rows) if probe else rows


def with_probes(rows: list[Entry]) -> list[Entry]:
    """The linear-probe baseline first, one per distinct (image size, TTA) of ``rows``, with that row's settings."""
    probes: dict[str, Entry] = {}
    for e in rows:
        r = load_recipe(e.path, e.overrides)
        size = f"{r.data.image_size}" + (f"-eval{r.data.eval_size}" if r.data.eval_size else "")
        label = f"probe-{size}" + ("-tta" if r.train.tta != "none" else "")
        probes.setdefault(label, Entry(label, e.path, [*e.overrides, *PROBE]))
    return [*probes.values(), *rows]


def command_line(base: Entry, rows: list[Entry]) -> list[str]:
    """The ``finetune compare`` arguments that give ``rows`` (probes included).

    They are the base row's recipe and ``--set`` s, and a ``--variant`` per other row's extra overrides.
    """
    args = [str(base.path)]
    common = [o for o in base.overrides if all(o in r.overrides for r in rows)]
    args += [a for o in common for a in ("--set", repr(o))]
    for r in rows:
        if r is base or r.label.startswith("probe-"):
            continue
        args += [a for o in r.overrides if o not in common for a in ("--variant", repr(f"{r.label}={o}"))]
    return args


def check_data(entries: list[Entry], seeds: list[int], out: Path) -> dict[int, tuple[list[int], list[int]]]:
    """Every row reads the same data and classes, and the pool gives both halves images for every seed.

    Returns:
        Per seed, the image ids of the selection and of the scoring half.
    """
    from finetune.assembly.data import build_splits

    first, draws = None, {}
    for e in entries:
        for seed in seeds:
            r = e.recipe(seed, out)
            splits = build_splits(r, roles=("val", "test"), check=False)
            key = (r.data.format, str(Path(r.data.root).resolve()), r.data.val, splits["val"].classes.names)
            if first is None:
                first = (e, key)
            elif key[:3] != first[1][:3]:
                raise UserError(
                    f"compare: {e.label} reads {key[0]} data {key[1]} ({key[2]}), {first[0].label} reads "
                    f"{first[1][0]} {first[1][1]} ({first[1][2]}); compare recipes on the same data"
                )
            elif key[3] != first[1][3]:
                raise UserError(f"compare: {e.label} and {first[0].label} have different classes; compare one task")
            ids = (list(splits["val"].image_ids), list(splits["test"].image_ids))
            seen = draws.setdefault(seed, (*ids, splits["test"].targets))
            if ids != seen[:2] or not np.array_equal(splits["test"].targets, seen[2], equal_nan=True):
                raise UserError(
                    f"compare: {e.label} draws other halves or labels than {first[0].label} for seed {seed} "
                    "(data.holdout, a label filter); compare rows on the same images and labels"
                )
    return {seed: (sel, sco) for seed, (sel, sco, _) in draws.items()}


def fingerprint(recipe: Recipe, with_dir: bool = False) -> str:
    """What a (row, seed) result was computed from: a digest of the resolved recipe but where its run is written.

    ``output.dir`` lies inside ``--out``: a comparison folder moved or copied elsewhere keeps its finished rows.
    ``with_dir``: the digest as 0.7.0 and earlier made it (the whole recipe), still accepted.
    """
    resolved = recipe_to_dict(recipe)
    if not with_dir:
        resolved.get("output", {}).pop("dir", None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_or_none(path: Path) -> Any:
    """A bookkeeping JSON file, or None when it is missing or broken (the row is then done again)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _check_same(plan_file: Path, digest: str, label: str, seed: int, legacy: str = "") -> None:
    """Refuse to reuse what ``--out`` holds for a (row, seed) made from another recipe; record the digest first.

    A plan file that is broken (a kill mid-write on a file system without atomic renames, an edit) says nothing:
    that row's results are dropped and redone from its run directory.
    """
    plan = _read_or_none(plan_file) if plan_file.exists() else {"recipe": digest}
    if not isinstance(plan, dict):
        for done in (plan_file.with_name(f"{label}-s{seed}.json"), plan_file.with_name(f"{label}-s{seed}.npz")):
            done.unlink(missing_ok=True)
        plan = {}
    if plan.get("recipe", digest) not in (digest, legacy):
        raise UserError(
            f"compare: {plan_file.parent.parent} holds a {label} seed {seed} made from another recipe; use a new "
            "--out (or delete its runs/, results/)"
        )
    if not plan_file.is_file() or "recipe" not in plan:
        atomic_write_json(plan_file, {"recipe": digest})


def _train(recipe: Recipe, run_dir: Path, log: Console) -> None:
    """Train (or resume) one run of the comparison."""
    from finetune.rundir.directory import RunDir
    from finetune.runs.run import run_recipe

    if (run_dir / runfiles.REPORT).is_file():
        return
    if (run_dir / runfiles.LAST).is_file():
        run_recipe(RunDir.open(run_dir).recipe(), resume=run_dir, console=log)
    else:
        run_recipe(recipe, console=log)


def run_entry(entry: Entry, seed: int, out: Path) -> dict[str, Any]:
    """One (row, seed): trained once, its scoring-half predictions kept in ``results/``; read back when done."""
    from finetune.runs.predict import predict_run

    result = out / "results" / f"{entry.label}-s{seed}.json"
    recipe = entry.recipe(seed, out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    plan_file, legacy = result.with_suffix(".plan.json"), fingerprint(recipe, with_dir=True)
    _check_same(plan_file, fingerprint(recipe), entry.label, seed, legacy)
    done = _read_or_none(result)
    if isinstance(done, dict) and _scored_or_none(out, entry.label, seed) is not None:
        return done
    run_dir = Path(recipe.output.dir) / recipe.output.name
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (out / "logs" / f"{entry.label}-s{seed}.log").open("a") as f, contextlib.redirect_stdout(f):
        _train(recipe, run_dir, Console(file=f, width=120, force_terminal=False))  # the run's report too
    wall = time.perf_counter() - start
    quiet = Console(file=io.StringIO())
    outs, _ = predict_run(run_dir, ["test"], console=quiet)
    y, p = outs["test"].targets, outs["test"].probs
    multi = task_for(recipe.data.format, recipe.data.task).name == "multi_label"
    thr = load_thresholds(run_dir, None, recipe.train.threshold)[0] if multi else 0.0
    buf = io.BytesIO()
    np.savez(buf, targets=y, probs=p, thresholds=np.asarray(thr, dtype=np.float64))
    atomic_write_bytes(result.with_suffix(".npz"), buf.getvalue())
    scored = Scored(y, p, np.asarray(thr, dtype=np.float64))
    rows = np.arange(len(y))
    keys = ("map", "macro_f1_cal", "micro_f1_cal") if multi else ("top1", "map")
    record = {
        "label": entry.label,
        "seed": seed,
        "recipe": str(entry.path),
        "overrides": entry.overrides,
        "run": str(run_dir),
        "time_s": wall,
        "scoring_images": len(y),
        "metrics": {k: METRICS[k](scored, rows) for k in keys},
    }
    atomic_write_json(result, record)  # last: its presence marks the run done
    return record


def _scored(out: Path, label: str, seed: int) -> Scored:
    with np.load(out / "results" / f"{label}-s{seed}.npz") as z:
        return Scored(z["targets"], z["probs"], z["thresholds"])


def _scored_or_none(out: Path, label: str, seed: int) -> Scored | None:
    """The kept predictions of a (row, seed), or None when the file is missing or broken (the row is redone)."""
    try:
        return _scored(out, label, seed)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def summarize(
    entries: list[Entry], seeds: list[int], out: Path, records: dict, resamples: int, draws: dict
) -> dict[str, Any]:
    """Per row mean/min/max over seeds; per pair the paired difference with its bootstrap interval."""
    keys = list(next(iter(records.values()))["metrics"])
    rows = []
    for e in entries:
        rs = [records[(e.label, s)] for s in seeds]
        stats = {}
        for k in keys:
            v = [r["metrics"][k] for r in rs]
            stats[k] = {"mean": float(np.mean(v)), "min": float(min(v)), "max": float(max(v))}
        time_s = float(np.mean([r["time_s"] for r in rs]))
        rows.append(
            {"label": e.label, "recipe": str(e.path), "overrides": e.overrides, "metrics": stats, "time_s": time_s}
        )
    scored = {e.label: [_scored(out, e.label, s) for s in seeds] for e in entries}
    first = scored[entries[0].label]
    plan = resample_plan([len(s.targets) for s in first], resamples)  # one plan: every pair is paired on it
    every = [np.arange(len(s.targets)) for s in first]
    at = {(e.label, k): [METRICS[k](sc, r) for sc, r in zip(scored[e.label], every)] for e in entries for k in keys}
    boot = {(e.label, k): metric_draws(scored[e.label], plan, METRICS[k]) for e in entries for k in keys}
    pairs = []
    for j, b in enumerate(entries):
        for a in entries[:j]:
            try:
                check_paired(scored[a.label], scored[b.label])
            except ValueError:
                raise UserError(f"compare: {a.label} and {b.label} were not scored on the same images") from None
            diffs = {}
            for k in keys:
                per_seed = [x - y for x, y in zip(at[(b.label, k)], at[(a.label, k)])]
                diffs[k] = interval(per_seed, boot[(b.label, k)], boot[(a.label, k)])
            pairs.append({"a": a.label, "b": b.label, **diffs})
    draws_json = {str(s): {"selection": sel, "scoring": sco} for s, (sel, sco) in draws.items()}
    return {"seeds": seeds, "resamples": resamples, "rows": rows, "pairs": pairs, "draws": draws_json}


def _pm(x: float) -> str:
    return f"{100 * x:+.1f}"


def markdown(result: dict[str, Any]) -> str:
    """``compare.md``: the rows, then every pair's difference with its interval."""
    keys = list(result["rows"][0]["metrics"])
    n_sel = len(next(iter(result["draws"].values()))["selection"])
    n_sco = len(next(iter(result["draws"].values()))["scoring"])
    lines = [
        f"# compare: seeds {', '.join(map(str, result['seeds']))}",
        "",
        f"Each seed splits the pool in two: {n_sel} images select (checkpoints, C, thresholds), {n_sco} score. "
        "Mean (min-max) over seeds, on the scoring halves.",
        "",
        "| recipe | " + " | ".join(NAMES[k] for k in keys) + " | time |",
        "|---|" + "---:|" * (len(keys) + 1),
    ]
    for r in result["rows"]:
        cells = [f"{100 * m['mean']:.1f} ({100 * m['min']:.1f}-{100 * m['max']:.1f})" for m in r["metrics"].values()]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['time_s']:.0f}s |")
    lines += [
        "",
        f"Paired differences B - A: mean over seeds, 95% bootstrap interval over seeds and images "
        f"({result['resamples']} resamples). An interval that covers 0 is not distinguishable.",
        "",
        "| B - A | " + " | ".join(NAMES[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for p in result["pairs"]:
        cells = []
        for k in keys:
            d = p[k]
            verdict = "" if d["distinguishable"] else " not distinguishable"
            shown = "[-]" if d["low"] is None else f"[{_pm(d['low'])}, {_pm(d['high'])}]"
            cells.append(f"{_pm(d['diff'])} {shown}{verdict}")
        lines.append(f"| {p['b']} - {p['a']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(
    entries: list[Entry], seeds: list[int], out: Path, resamples: int = 1000, console: Console | None = None
) -> dict[str, Any]:
    """Run every (row, seed) not yet done, then write ``compare.json`` and ``compare.md`` in ``out``."""
    console = console or Console(stderr=True)
    check_output_folder(out, "--out", lambda f: any((f / "results").glob("*.plan.json")))  # its own: continued
    out.mkdir(parents=True, exist_ok=True)
    draws = check_data(entries, seeds, out)
    todo = [(e, s) for s in seeds for e in entries]
    records: dict[tuple[str, int], dict] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("left"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("compare", total=len(todo))
        for i, (e, s) in enumerate(todo, 1):
            progress.update(task, description=f"run {i}/{len(todo)}: {e.label} seed {s}")
            try:
                r = records[(e.label, s)] = run_entry(e, s, out)
            except (KeyboardInterrupt, UserError) as err:
                if isinstance(err, UserError) and not str(err).startswith(("interrupted", "terminated")):
                    raise
                raise UserError(f"compare stopped at {e.label} seed {s}; run the same command to continue") from None
            shown = "  ".join(f"{NAMES[k]} {100 * v:.1f}" for k, v in r["metrics"].items())
            progress.console.print(
                f"{e.label} seed {s}: {shown} on {r['scoring_images']} scoring images ({r['time_s']:.0f}s)"
            )
            progress.advance(task)
    result = summarize(entries, seeds, out, records, resamples, draws)
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", markdown(result))
    return result
