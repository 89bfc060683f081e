"""What each kind of run accepts: the recipe rules that span sections (data format, loss, selection metric).

:mod:`finetune.config` checks them when it validates a recipe, and :mod:`finetune.eval.tasks` reads its lists from
here, so the rules live in one place and a recipe is checked without importing torch.
"""

from __future__ import annotations

from typing import Any

from finetune.errors import UserError

TASK_OF_FORMAT = {
    "coco": "multi_label",
    "csv": "multi_label",
    "voc": "multi_label",
    "openimages": "multi_label",
    "imagefolder": "multi_label",
    "folder": "single_label",
    "cifar10": "single_label",
}
BOXED_FORMATS = ("coco", "voc")  # formats whose annotations hold object boxes (multi-label cutmix needs them)
LOSSES = {"multi_label": ("bce", "focal", "asl"), "single_label": ("ce",)}
SELECTS = {"multi_label": ("map", "macro_f1", "micro_f1", "loss"), "single_label": ("top1", "map", "loss")}


ARCH_MODELS = ("mobilenetv2_standard", "mobilenetv2_reduced")


def check_model_rules(name: str, arch_changed: bool, source: str) -> None:
    """``[model.arch]`` is read by this project's own MobileNetV2 presets only; elsewhere a change would do nothing.

    A run's saved recipe.toml lists every key at its default; only a value other than the default is refused.
    """
    if arch_changed and name not in ARCH_MODELS:
        raise UserError(
            f"{source}: model.arch: only {' and '.join(ARCH_MODELS)} read it; for {name} (timm) choose the width by "
            "name (mobilenetv2_050, mobilenetv2_140, ...)"
        )


def task_name(fmt: str, task: str = "auto") -> str:
    """``multi_label`` or ``single_label``: ``data.task``, or (``auto``) the one ``data.format`` implies."""
    return TASK_OF_FORMAT[fmt] if task == "auto" else task


def check_task_rules(fmt: str, loss: str, select: str, source: str, task: str = "auto") -> None:
    """``loss.name`` and ``train.select`` must suit the run's task (``data.format``, ``data.task``)."""
    chosen = f'data.format = "{fmt}"' if task == "auto" else f'data.task = "{task}"'
    task = task_name(fmt, task)
    if loss not in LOSSES[task]:
        if task == "single_label":
            raise UserError(f'{source}: loss.name: {chosen} is single-label; use "ce"')
        if loss == "ce":
            what = fmt.upper() if chosen.startswith("data.format") else chosen
            raise UserError(
                f'{source}: loss.name: "ce" is for single-label data; {what} is multi-label: use "bce", "focal" '
                'or "asl"'
            )
        raise UserError(f"{source}: loss.name: use one of {', '.join(LOSSES[task])}")
    if select != "auto" and select not in SELECTS[task]:
        if task == "multi_label" and select == "top1":
            why = f'"{select}" is for single-label data'
        else:
            why = f"{task.replace('_', '-')} runs select by " + ", ".join(f'"{s}"' for s in SELECTS[task])
        raise UserError(f"{source}: train.select: {why}")


def check_augment_rules(fmt: str, task: str, a: Any, source: str) -> None:
    """Cutmix on multi-label data needs labels weighted by the kept area of each object's box, so boxes."""
    multi = task_name(fmt, task) == "multi_label"
    if a.cutmix > 0 and multi and a.cutmix_labels != "area":
        raise UserError(
            f"{source}: data.augment.cutmix: on multi-label data a cut can remove an object and keep its label; set "
            'data.augment.cutmix_labels = "area" (labels weighted by the kept area of each object box)'
        )
    if a.cutmix > 0 and multi and fmt not in BOXED_FORMATS:
        raise UserError(
            f'{source}: data.augment.cutmix_labels = "area" needs object boxes; data.format = "{fmt}" has none (use '
            "coco or voc, or mixup)"
        )
    if a.cutmix_labels == "area" and not (a.cutmix > 0 and multi):
        raise UserError(
            f'{source}: data.augment.cutmix_labels = "area" applies to multi-label cutmix; set data.augment.cutmix '
            "> 0 on multi-label data, or drop it"
        )


def check_calibration_rules(fmt: str, c: Any, source: str, task: str = "auto") -> None:
    """A single-label run predicts its top class: no per-class thresholds or sigmoids; a temperature and a reject.

    With calibration off, a setting only calibration acts on is refused rather than silently dropped.
    """
    constrained, probabilities, reject, enabled = c.constrained, c.probabilities, c.reject, c.enabled
    if not enabled and (reject or probabilities != "none"):
        key = "objective" if reject else "probabilities"
        raise UserError(
            f"{source}: calibrate.{key} does nothing with calibrate.enabled = false; set calibrate.enabled = true "
            "or drop it"
        )
    single = task_name(fmt, task) == "single_label"
    if probabilities == "platt" and single:
        raise UserError(
            f'{source}: calibrate.probabilities: data.format = "{fmt}" is single-label (softmax): it takes one '
            '"temperature"; per-class "platt" scaling is for multi-label data'
        )
    if constrained and single:
        raise UserError(
            f'{source}: calibrate.objective: data.format = "{fmt}" is single-label (the top class is the answer); '
            'precision_at_least / recall_at_least are for multi-label data; "accuracy_at_least" sets a reject option'
        )
    if reject and not single:
        raise UserError(
            f'{source}: calibrate.objective = "accuracy_at_least" is the single-label reject option; data.format = '
            f'"{fmt}" is multi-label: use "precision_at_least" / "recall_at_least" per class'
        )
