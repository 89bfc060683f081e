"""The assembly's data parts from ``[data]`` and ``[train]``: device, splits, datasets, loaders, settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.config import DataConfig, Recipe, TrainConfig
from finetune.config.holdout import HoldoutConfig, halves, held_out
from finetune.config.rules import task_name
from finetune.data.classfolders import read_cifar10_split, read_folder_split
from finetune.data.coco import read_coco_split
from finetune.data.csvfile import Columns, read_csv_split
from finetune.data.dataset import ImageDataset, collate
from finetune.data.hf_imagefolder import read_imagefolder_split
from finetune.data.openimages import read_openimages_split
from finetune.data.samplers import EpochSampler, ShardSampler, balanced_length, repeat_factors
from finetune.data.split import ClassMap, Split, check_images
from finetune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from finetune.data.voc import read_voc_split
from finetune.distributed import Dist, setup
from finetune.errors import UserError
from finetune.eval.predict import EvalSettings
from finetune.eval.tasks import Task, task_for
from finetune.eval.thresholds import CalibrationSettings
from finetune.train.loop import FitSettings

ROLES = ("train", "val", "test")


def _has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Linux /proc/cpuinfo; False elsewhere)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def build_device(cfg: TrainConfig) -> tuple[torch.device, str]:
    """Resolve ``train.device`` and ``train.precision``.

    ``precision = "auto"`` means bf16 on CUDA GPUs that support it, else fp16 (with GradScaler); on CPU, bf16 only
    with AMX tiles (``amx_bf16``): bf16 autocast training measured 6-10x slower than fp32 on an AVX2 CPU and still
    2x slower on an AVX512-BF16 CPU (MobileNetV2, batch 32), so without AMX fp32 is the fast choice.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError('train.device: "cuda" requested but no CUDA GPU is visible; use "auto" or "cpu"')
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if _has_amx() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError('train.precision: "fp16" needs a CUDA GPU; use "bf16" or "fp32" on CPU')
    return device, precision


def build_task(recipe: Recipe) -> Task:
    """The run's task, from ``data.format``."""
    return task_for(recipe.data.format, recipe.data.task)


def build_eval_settings(recipe: Recipe, device: torch.device, precision: str) -> EvalSettings:
    """How batches run through the model, from ``[train]`` and ``[data]``."""
    t = recipe.train
    return EvalSettings(
        device=device,
        precision=precision,
        channels_last=t.channels_last,
        on_bad_image=recipe.data.on_bad_image,
        task=build_task(recipe),
        tta=t.tta,
    )


def build_fit_settings(recipe: Recipe, device: torch.device, precision: str) -> FitSettings:
    """The trainer's plain settings from ``[train]`` and ``[data]``."""
    t, task = recipe.train, build_task(recipe)
    return FitSettings(
        **vars(build_eval_settings(recipe, device, precision)),
        epochs=t.epochs,
        accum_steps=t.accum_steps,
        grad_clip=t.grad_clip,
        threshold=t.threshold,
        select=task.select(t.select),
        mixup=recipe.data.augment.mixup,
        cutmix=recipe.data.augment.cutmix,
        seed=t.seed,
        checkpoint_every=t.checkpoint_every,
        progress_every=t.progress_every,
        progress_steps=t.progress_steps,
    )


def split_name(recipe: Recipe, role: str) -> str:
    """The split name the recipe gives to ``role`` (train/val/test)."""
    if role not in ROLES:
        raise UserError(f"--split {role!r}: expected one of {', '.join(ROLES)}")
    if role == "test" and recipe.data.holdout.seed is not None and not recipe.data.has_test and not _from_train(recipe):
        raise UserError("data.holdout.scoring = false: this run has no test split (its scoring half is left out)")
    if _from_train(recipe) and role in ("train", "val"):
        return recipe.data.train  # val is a held-out part of train
    if recipe.data.holdout.seed is not None and role in ("val", "test") and not _from_train(recipe):
        return recipe.data.val  # both halves come from the pool
    name = getattr(recipe.data, role)
    if not name:
        raise UserError(f"data.{role} is empty in this recipe: it has no {role} split")
    return name


def build_splits(
    recipe: Recipe, roles: tuple[str, ...] = ROLES, check: bool = True, classes: ClassMap | None = None
) -> dict[str, Split]:
    """Read the annotation files of ``roles`` (skipping an empty test split) and check that every image exists."""
    splits: dict[str, Split] = {}
    pool: Split | None = None
    for role in roles:
        if role == "test" and not recipe.data.has_test:
            continue
        if _from_train(recipe) and role in ("train", "val"):
            pool = pool or build_split(recipe.data, recipe.data.train, classes)
            splits[role] = train_part(pool, recipe.data.holdout, role, not build_task(recipe).calibrates)
        elif recipe.data.holdout.seed is not None and role in ("val", "test") and not _from_train(recipe):
            pool = pool or build_split(recipe.data, recipe.data.val, classes)
            splits[role] = holdout_half(pool, recipe.data.holdout, role)
        else:
            splits[role] = build_split(recipe.data, split_name(recipe, role), classes)
        classes = splits[role].classes
        if not len(splits[role].targets):
            raise UserError(f"data.{role}: the {split_name(recipe, role)!r} split has no images; check data.root")
        if role == "train":
            _check_known(splits[role], split_name(recipe, role), not build_task(recipe).calibrates)
        if check:
            missing = check_images(splits[role].image_paths)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{missing[0]}{more}; check data.root and data.images")
    return splits


def _check_known(split: Split, name: str, single_label: bool) -> None:
    """Refuse a train split with a class unknown on every image (or with no known label at all): nothing teaches it.

    A single-label split needs two classes: with one, the softmax answers it for every image.
    """
    if single_label and len(split.classes) < 2:
        raise UserError(
            f"data.train: the {name!r} split has one class ({split.classes.names[0]!r}); single-label data needs two "
            'or more (data.classes), or use data.task = "multi_label" to tell one class from its absence'
        )
    never = np.isnan(np.asarray(split.targets, dtype=np.float64)).all(0)
    if never.any():
        which = split.classes.names[int(np.argmax(never))]
        more = f" (and {int(never.sum()) - 1} more)" if never.sum() > 1 else ""
        raise UserError(
            f"data.train: class {which!r}{more} is unknown on every image of the {name!r} split, so nothing can teach "
            "it; label it on some images, or leave it out of data.classes"
        )


def _from_train(recipe: Recipe) -> bool:
    return recipe.data.holdout.seed is not None and recipe.data.holdout.source == "train"


def train_part(pool: Split, cfg: HoldoutConfig, role: str, single_label: bool) -> Split:
    """The training (``train``) or held-out (``val``) part of the train split (``[data.holdout] source = "train"``)."""
    assert cfg.seed is not None
    try:
        keep, held = held_out(pool.targets, cfg.seed, cfg.selection, single_label)
    except ValueError as err:
        raise UserError(f"data.holdout: the {pool.name!r} split has {len(pool.image_paths)} images: {err}") from None
    part = keep if role == "train" else held
    return _subset(pool, part, f"{pool.name} ({'held out' if role == 'val' else 'training part'}, seed {cfg.seed})")


def _subset(pool: Split, keep: np.ndarray, name: str) -> Split:
    paths = pool.image_paths[keep] if isinstance(pool.image_paths, np.ndarray) else [pool.image_paths[i] for i in keep]
    return replace(
        pool,
        name=name,
        image_ids=[pool.image_ids[i] for i in keep],
        image_paths=paths,
        targets=pool.targets[keep],
        boxes=[pool.boxes[i] for i in keep] if pool.boxes is not None else None,
    )


def holdout_half(pool: Split, cfg: HoldoutConfig, role: str) -> Split:
    """The val (selection) or test (scoring) half of the pool ``[data.holdout]`` draws (finetune/config/holdout.py)."""
    assert cfg.seed is not None
    try:
        selection, scoring = halves(len(pool.image_paths), cfg.seed, cfg.selection)
    except ValueError as err:
        raise UserError(f"data.holdout: the {pool.name!r} split has {len(pool.image_paths)} images: {err}") from None
    keep = selection if role == "val" else scoring
    half = "selection" if role == "val" else "scoring"
    return _subset(pool, keep, f"{pool.name} ({half} half, seed {cfg.seed})")


def norm_stats(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for normalisation (ImageNet's, or the recipe's own)."""
    norm = cfg.augment.normalize
    if norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if norm == "dataset":  # a run resolves this to numbers before building datasets (build_resolved_recipe)
        raise UserError('data.augment.normalize = "dataset" must be resolved first; run `finetune data stats RECIPE`')
    return tuple(norm["mean"]), tuple(norm["std"])


def build_split(cfg: DataConfig, split: str, classes: ClassMap | None = None) -> Split:
    """Read one split's annotations or folder listing (no image is opened; CIFAR-10 batches are loaded)."""
    if cfg.format == "folder":
        return read_folder_split(cfg.root, split, classes)
    if cfg.format == "cifar10":
        return read_cifar10_split(cfg.root, split, classes)
    given, single = cfg.classes or None, task_name(cfg.format, cfg.task) == "single_label"
    if cfg.format == "csv":
        columns = Columns(cfg.path_column, cfg.label_column or "labels", cfg.split_column)
        named = bool(cfg.label_column)
        return read_csv_split(cfg.root, split, cfg.csv, cfg.label_sep, given, classes, columns, single, named)
    if cfg.format == "voc":
        return read_voc_split(cfg.root, split, cfg.voc_difficult, given, classes)
    if cfg.format == "openimages":
        names = (cfg.openimages_labels, cfg.images, cfg.openimages_classes, cfg.openimages_absent)
        return read_openimages_split(cfg.root, split, *names, given, classes)
    if cfg.format == "imagefolder":
        return read_imagefolder_split(cfg.root, split, cfg.label_column, cfg.label_sep, single, given, classes)
    return read_coco_split(cfg.root, split, cfg.annotations, cfg.images, cfg.include_crowd, cfg.min_box_area, classes)


def build_dataset(cfg: DataConfig, split: Split, train: bool, seed: int = 0) -> ImageDataset:
    """A dataset with the train or eval pipeline."""
    mean, std = norm_stats(cfg)
    a = cfg.augment
    cuda = torch.cuda.is_available()  # a run has resolved "auto" by its device (build_resolved_recipe)
    on_device = train and a.color_jitter > 0 and (a.jitter_on == "device" or (a.jitter_on == "auto" and cuda))
    boxes = train and a.cutmix > 0 and a.cutmix_labels == "area"
    if boxes and split.boxes is None:
        raise UserError(f'data.augment.cutmix_labels = "area": the {split.name!r} split has no object boxes')
    if train:  # uint8 out of the workers; normalised (and, on_device, colour-jittered) on the device: batch_images
        crop = (a.crop, tuple(a.scale), a.hflip, a.color_jitter)
        geometry = {"vflip": a.vflip, "rot90": a.rot90, "randaugment": a.randaugment, "mean": mean}
        more = {"random_erasing": a.random_erasing, "boxes": boxes, "jitter_in_workers": not on_device}
        try:
            tf = train_transform(cfg.image_size, *crop, normalize=False, **geometry, **more)
        except (ValueError, KeyError, IndexError, AssertionError) as err:  # what timm raises on a spec it cannot read
            raise UserError(f"data.augment.randaugment = {a.randaugment!r}: timm cannot read it ({err})") from None
    else:
        tf = eval_transform(cfg.eval_size or cfg.image_size, normalize=False)
    ids, jitter = split.image_ids, a.color_jitter if on_device else 0.0
    moved = split.boxes if boxes else None
    return ImageDataset(split.image_paths, split.targets, split.classes, tf, seed, ids, (mean, std), jitter, moved)


def build_loader(
    cfg: DataConfig, dataset: ImageDataset, train: bool, seed: int = 0, d: Dist | None = None
) -> torch.utils.data.DataLoader:
    """A DataLoader; training shuffles per epoch (seeded) and drops a last partial batch.

    Under DDP (``d`` with more than one rank) it loads this rank's shard, ``data.batch_size / world`` at a time.
    """
    factors = repeat_factors(dataset.targets, cfg.repeat_threshold) if train and cfg.sampler == "balanced" else None
    batch, sampler = cfg.batch_size, EpochSampler(len(dataset), seed, factors) if train else None
    if d is not None and d.enabled:
        batch //= d.world
        shard = {"shuffle": train, "pad": train, "batch": cfg.batch_size, "factors": factors}
        sampler = ShardSampler(len(dataset), seed, d.rank, d.world, **shard)
    epoch = balanced_length(factors) if factors is not None else len(dataset)  # images per epoch
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
        prefetch_factor=cfg.prefetch if cfg.num_workers > 0 else None,
        drop_last=train and epoch > cfg.batch_size,
        # Its own generator: starting an iterator (and its workers' base seed) never draws from the global RNG, which
        # dropout shares. Persistent workers start once in a run and again after a resume; a draw there would move
        # every later dropout mask of the resumed run.
        generator=torch.Generator().manual_seed(seed),
    )


def epoch_size(cfg: DataConfig, targets: np.ndarray) -> int:
    """Images per training epoch: the split's, or with ``data.sampler = "balanced"`` the repeat-factor draw's."""
    if cfg.sampler != "balanced":
        return len(targets)
    return balanced_length(repeat_factors(targets, cfg.repeat_threshold))


def sampler_facts(cfg: DataConfig, train_images: int, drawn: int) -> dict[str, Any]:
    """What a report says of the training sampler: the balanced one's fixed draw per epoch, beside the split's size."""
    if cfg.sampler != "balanced":  # an epoch is the split
        return {}
    return {"sampler": {"name": "balanced", "train_images": train_images, "epoch_size": drawn}}


def build_dist(recipe: Recipe, device: torch.device) -> Dist:
    """This process's place in a torchrun job (one process without torchrun); checks the batch divides."""
    d = setup(device.type)
    if d.enabled and recipe.data.batch_size % d.world:
        raise UserError(
            f"data.batch_size = {recipe.data.batch_size} is the global batch: it must divide by the {d.world} processes"
        )
    return d


def build_resolved_recipe(
    recipe: Recipe, device: Callable[[], torch.device], train_split: Callable[[], Split]
) -> tuple[Recipe, str]:
    """The recipe with what depends on the data or the machine made explicit (``recipe.toml`` records it).

    ``normalize = "dataset"`` becomes the train split's numbers (``train_split()`` is called only then);
    ``jitter_on = "auto"`` (``device()`` is called only then) becomes ``"device"`` when the run trains on CUDA, else
    ``"workers"``, so a resume on another machine draws the same augmentation.

    Returns:
        The resolved copy (the same recipe when nothing needs resolving) and a line saying what was done ("" if none).
    """
    augment, note = recipe.data.augment, ""
    if augment.jitter_on == "auto" and augment.color_jitter > 0:
        augment = augment.model_copy(update={"jitter_on": "device" if device().type == "cuda" else "workers"})
    if augment.normalize == "dataset":
        from finetune.data.stats import load_or_compute, stats_key

        key, d = stats_key(recipe.data.format, recipe.data.task), recipe.data
        stats, cached = load_or_compute(train_split(), key, d.image_size, on_bad_image=d.on_bad_image)
        augment = augment.model_copy(update={"normalize": {"mean": stats["mean"], "std": stats["std"]}})
        note = f"normalize: train-split mean {stats['mean']} std {stats['std']} ({'cached' if cached else 'computed'})"
    if augment is recipe.data.augment:
        return recipe, ""
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"augment": augment})}), note


def build_calibration(recipe: Recipe, classes: ClassMap | None = None) -> CalibrationSettings:
    """Build :class:`CalibrationSettings` from ``[calibrate]`` (and the fixed ``train.threshold``).

    ``calibrate.classes`` names classes: each must be one of ``classes`` (checked when they are given).
    """
    c = recipe.calibrate
    overrides = {}
    if classes is not None:
        names = list(classes.names)
        for name, o in c.classes.items():
            if name not in names:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise UserError(f"calibrate.classes.{name}: not a class of this data (the classes are {shown})")
            overrides[names.index(name)] = (o.metric, o.target)
    return CalibrationSettings(
        target=c.target,
        margin=c.margin,
        probabilities=c.probabilities,
        overrides=overrides,
        enabled=c.enabled,
        split=c.split,
        metric=c.metric,
        beta=c.beta,
        min_positives=c.min_positives,
        shrink=c.shrink,
        folds=c.folds,
        seed=recipe.train.seed,
        fixed=recipe.train.threshold,
    )
