"""The model card: ``README.md`` beside every export (and ``finetune card RUN``), with front matter the Hub reads.

The YAML front matter carries what a program needs (``pipeline_tag``, ``tags``, and a ``finetune`` block with the
task, the activation, every class with its threshold, the input contract and the held-out metrics); the body says
the same for a person, with the training data, the recipe's hash, the base weights and the limitations. A
multi-label model served with softmax is a known failure when a card has no task field (huggingface.js#429), so the
card says which activation to apply and that softmax is wrong for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from finetune import runfiles
from finetune.assembly import data as assembly_data
from finetune.errors import UserError
from finetune.eval.run_report import RunReport
from finetune.io import atomic_write_text, markdown_text
from finetune.rundir.directory import RunDir

if TYPE_CHECKING:
    from finetune.assembly import RunParts
    from finetune.deploy.exported import Exported

FEW_POSITIVES = 5  # a class with fewer train positives than this is named under the limitations


def _data(parts: RunParts) -> dict[str, Any]:
    """Split sizes and per-class train positives, read from the annotations (no image is opened)."""
    r = parts.raw
    about: dict[str, Any] = {"format": r.data.format, "root": str(r.data.root)}
    try:  # the splits an INT8 export has read already, else the annotations (no image is opened)
        splits = parts.splits if "train" in parts.splits else None
        splits = splits or assembly_data.build_splits(r, ("train", "val", "test"), False, parts.classes)
    except UserError as err:
        return {**about, "unavailable": str(err)}
    about["splits"] = {role: len(s.targets) for role, s in splits.items()}
    about["train_positives"] = dict(zip(parts.classes.names, (splits["train"].targets > 0.5).sum(0).tolist()))
    return about


def _metrics(run: RunDir) -> dict[str, Any]:
    """The held-out headline numbers from ``report.json``: fixed vs calibrated thresholds, and where measured."""
    if not (run / runfiles.REPORT).is_file():
        return {}
    report = RunReport.load(run / runfiles.REPORT)
    honest = report.honest
    if honest:
        keys = ("map", "macro_f1", "micro_f1")
        return {
            "measured_on": honest.how,
            "fixed_threshold": report.threshold,
            "at_fixed_threshold": {k: round(honest.fixed[k], 4) for k in keys},
            "at_calibrated_thresholds": {k: round(honest.calibrated[k], 4) for k in keys},
        }
    role = report.shown_split
    summary = report.splits[role].summary
    return {"measured_on": f"{role} split", **{k: round(v, 4) for k, v in summary.items() if isinstance(v, float)}}


def _single_decision(info: dict[str, Any]) -> str:
    reject = info.get("reject_below")
    top = "the highest-probability class"
    return top if reject is None else f"{top}, none when its probability is below {reject:.4f} (reject option)"


def _graph_use(f: dict[str, Any], multi: bool) -> list[str]:
    """What the exported graph takes and gives, and how to call it: preprocessing and activation inside."""
    if multi:
        head = (
            "**Multi-label.** The model outputs one independent **sigmoid** probability per class (already applied "
            "in the graph). A class is present when its probability is at least its threshold below. **Do not apply "
            "softmax**: the probabilities do not sum to 1, and several classes can be present at once."
        )
    else:
        head = f"**Single-label.** Softmax probabilities (applied in the graph); the label is {f['decision']}."
    size = f["input"]["size"]
    return [
        head,
        "",
        "## Input",
        "",
        f"uint8 RGB images, NHWC `[batch, height, width, 3]`; resized to {size[0]}x{size[1]} "
        f"({f['input']['resize']}) and normalised (mean {f['normalization']['mean']}, std "
        f"{f['normalization']['std']}, 0..1 scale) **inside the graph**: feed decoded pixels, nothing else.",
        "",
        "## Use",
        "",
        "```python",
        "from finetune import Predictor",
        f"predict = Predictor.load({(f.get('files') or ['RUN_DIR'])[0]!r})   # the file carries its thresholds",
        'print(predict("photo.jpg").labels)',
        "```",
        "",
    ]


def _timm_use(f: dict[str, Any], multi: bool) -> list[str]:
    """The Use section of timm's folder: the network alone; the caller normalises and applies the activation."""
    act = "torch.sigmoid(logits)" if multi else "logits.softmax(-1)"
    decide = "a class is present when its probability is at least its threshold below" if multi else f["decision"]
    size = f["input"]["size"]
    return [
        f"**timm's folder.** `model.safetensors` and `config.json` hold the network alone: it takes float RGB NCHW "
        f"`[batch, 3, {size[0]}, {size[1]}]` (0..1, then mean {f['normalization']['mean']}, std "
        f"{f['normalization']['std']}), and gives **logits**: apply {f['activation']} yourself; {decide}.",
        "",
        "## Use",
        "",
        "```python",
        "import timm, torch",
        "from PIL import Image",
        'model = timm.create_model("local-dir:FOLDER", pretrained=True).eval()',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
        "with torch.no_grad():",
        '    logits = model(transform(Image.open("photo.jpg").convert("RGB"))[None])',
        f"probabilities = {act}",
        "```",
        "",
        "timm's transform resizes with PIL (antialiased), the toolkit without antialiasing, so probabilities differ "
        "slightly from `finetune predict`'s; the run directory's `Predictor` is the reference.",
        "",
    ]


def card_fields(run: RunDir, parts: RunParts, info: dict[str, Any], exported: Exported | None = None) -> dict:
    """The front matter as a dict."""
    multi = info["task"] == "multilabel"
    thresholds = info["thresholds"] or [None] * len(info["classes"])
    recipe = parts.raw
    fields: dict[str, Any] = {
        "library_name": "finetune",
        "pipeline_tag": "image-classification",
        "tags": ["finetune", "image-classification", "multi-label-classification" if multi else "single-label"]
        + [recipe.model.name]
        + ([f.suffix.lstrip(".") for f in [exported.path]] if exported else []),
        "finetune": {
            "task": info["task"],
            "activation": info["output"]["activation"],
            "apply_softmax": False if multi else "already applied inside the graph",
            "decision": "class present when probability >= its threshold" if multi else _single_decision(info),
            "classes": [{"name": n, "threshold": t} for n, t in zip(info["classes"], thresholds)],
            "input": info["input"],
            "normalization": info["normalization"],
            "metrics": _metrics(run),
            "data": _data(parts),
            "recipe_sha256": info["recipe_sha256"],
            "base_model": {"name": recipe.model.name, "pretrained": recipe.model.pretrained},
            "base_weights": str(recipe.model.checkpoint) or ("timm hub" if recipe.model.pretrained else "random init"),
        },
    }
    if exported is not None and exported.path.suffix == ".safetensors":  # timm's folder: the network alone
        fields["library_name"] = "timm"
        fields["tags"].insert(0, "timm")
        fields["finetune"]["timm"] = (
            f'timm.create_model("local-dir:FOLDER", pretrained=True): the network alone, float NCHW in (0..1, then '
            f"mean/std as config.json's pretrained_cfg says), logits out: apply {info['output']['activation']}"
        )
    if exported is not None:
        fields["finetune"]["files"] = [f.name for f in exported.files]
        if exported.comparison is not None:
            fields["finetune"]["int8"] = exported.comparison
    return fields


def _body(fields: dict[str, Any], info: dict[str, Any], run: RunDir) -> list[str]:
    f = fields["finetune"]
    multi = f["task"] == "multilabel"
    lines = [f"# {markdown_text(run.path.name)}: {f['base_model']['name']}, {len(f['classes'])} classes", ""]
    if "timm" in f:  # a timm folder holds the network without the graph's preprocessing and activation
        lines += _timm_use(f, multi)
    else:
        lines += _graph_use(f, multi)
    lines += ["## Classes and thresholds", ""]
    positives = f["data"].get("train_positives", {})
    lines += ["| class | threshold | train positives |", "|---|---|---|"]
    for c in f["classes"]:
        thr = "arg-max" if c["threshold"] is None else f"{c['threshold']:.4f}"
        lines.append(f"| {markdown_text(c['name'])} | {thr} | {positives.get(c['name'], '?')} |")
    lines += ["", f"Thresholds: {info['thresholds_from']}.", ""]
    return lines


def _tail(fields: dict[str, Any], run: RunDir) -> list[str]:
    f = fields["finetune"]
    m, lines = f["metrics"], ["## Metrics", ""]
    if "at_calibrated_thresholds" in m:
        lines += [f"Measured on {m['measured_on']} (images the thresholds were not fitted on).", ""]
        lines += ["| thresholds | mAP | macro-F1 | micro-F1 |", "|---|---|---|---|"]
        rows = ((f"fixed {m['fixed_threshold']}", "at_fixed_threshold"), ("calibrated", "at_calibrated_thresholds"))
        for name, key in rows:
            v = m[key]
            lines.append(f"| {name} | {100 * v['map']:.1f} | {100 * v['macro_f1']:.1f} | {100 * v['micro_f1']:.1f} |")
    elif m:
        shown = ", ".join(f"{k} {v}" for k, v in m.items() if k != "measured_on")
        lines += [f"Measured on {m['measured_on']}: {shown}."]
    else:
        lines += ["No report.json in the run: no metrics."]
    if "int8" in f:
        from finetune.deploy.quantize import comparison_markdown

        lines += ["", "## fp32 and INT8", "", comparison_markdown(f["int8"]), ""]
        lines += ["The INT8 file carries its own thresholds, re-fitted on its probabilities (`model.int8.json`)."]
    d = f["data"]
    lines += ["", "## Training data", "", f"{d['format']} at `{d['root']}`."]
    if "splits" in d:
        lines.append("Split sizes (images): " + ", ".join(f"{k} {v}" for k, v in d["splits"].items()) + ".")
    else:
        lines.append(f"The data could not be read when this card was written ({d['unavailable']}).")
    lines += [
        "",
        "## Recipe and base weights",
        "",
        f"Recipe: `recipe.toml` of the run, SHA-256 `{f['recipe_sha256']}`. Base model `{f['base_model']['name']}`, "
        f"weights: {f['base_weights']}.",
        "",
        "## Limitations",
        "",
    ]
    few = [f"{markdown_text(n)} ({k})" for n, k in d.get("train_positives", {}).items() if k < FEW_POSITIVES]
    if few:
        lines.append(
            f"Classes with fewer than {FEW_POSITIVES} training positives; their thresholds and scores rest "
            f"on very few examples: {', '.join(few)}."
        )
    else:
        lines.append(f"Every class has at least {FEW_POSITIVES} training positives.")
    lines.append("Trained on the data above only: images unlike it (other cameras, domains, classes) are out of scope.")
    return lines


def card_text(run: RunDir, parts: RunParts, info: dict[str, Any], exported: Exported | None = None) -> str:
    """The card: YAML front matter between ``---`` lines, then markdown."""
    fields = json.loads(json.dumps(card_fields(run, parts, info, exported), default=_plain))
    front = yaml.safe_dump(fields, sort_keys=False, allow_unicode=True, width=1000)
    return "\n".join(["---", front.rstrip(), "---", "", *_body(fields, info, run), *_tail(fields, run), ""])


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def is_card(path: Path) -> bool:
    """Whether ``path`` is a finetune model card (YAML front matter with ``library_name: finetune``)."""
    try:
        text = Path(path).read_text(errors="replace")
        return text.startswith("---\n") and yaml.safe_load(text.split("---\n")[1]).get("library_name") == "finetune"
    except (OSError, yaml.YAMLError, AttributeError, IndexError):
        return False


def write_card(run: RunDir, parts: RunParts, info: dict[str, Any], exported: Exported | None, folder: Path) -> Path:
    """Write ``folder/README.md``; returns its path."""
    path = Path(folder) / "README.md"
    atomic_write_text(path, card_text(run, parts, info, exported))
    return path
