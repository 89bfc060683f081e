"""The recipe's ``[data]`` and ``[data.augment]`` sections: where the data is, how it is read, sampled and augmented.

:mod:`finetune.config` assembles them into the whole recipe; the readers live in :mod:`finetune.data` (one module per
format) and the task a format implies in :mod:`finetune.config.rules`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finetune.config.holdout import HoldoutConfig
from finetune.config.schema import Section

FORMATS = ("coco", "csv", "folder", "cifar10", "voc", "openimages", "imagefolder")


class AugmentConfig(Section):
    """Train-time augmentation (albumentations, timm's RandAugment) and normalisation."""

    crop: Literal["random_resized_crop", "resize"] = Field(
        "random_resized_crop", description='"random_resized_crop" (scale range below), or "resize" (the whole image)'
    )
    scale: list[float] = Field(
        [0.5, 1.0],
        min_length=2,
        max_length=2,
        description="random_resized_crop's range of the crop's share of the image area",
    )
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="the probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0.0, le=1.0, description="vertical flip probability (aerial, microscopy, shapes)")
    rot90: bool = Field(False, description="rotate by a random multiple of 90 degrees (with flips: all 8 symmetries)")
    color_jitter: float = Field(0.0, ge=0.0, le=1.0, description="brightness/contrast/saturation strength; 0 = off")
    randaugment: str = Field("", description='timm\'s RandAugment string, e.g. "rand-m9-n2" ("" = off)')
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability of erasing a random rectangle")
    mixup: float = Field(0.0, ge=0.0, description="mixup: Beta(alpha, alpha) (batch with itself reversed); 0 = off")
    cutmix: float = Field(0.0, ge=0.0, description="cutmix: Beta(alpha, alpha) box from the reversed batch; 0 = off")
    cutmix_labels: Literal["area", "none"] = Field(
        "none", description='"area": multi-label targets weighted by each object box\'s kept area (COCO, VOC)'
    )
    jitter_on: Literal["auto", "workers", "device"] = Field(
        "auto", description='where colour jitter runs: "auto" = on the device when training on CUDA, else in workers'
    )
    normalize: Literal["imagenet", "dataset"] | dict[str, list[float]] = Field(
        "imagenet", description='"dataset" = the train split\'s own mean/std (finetune data stats, cached)'
    )

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("scale must be [low, high] with 0 < low <= high <= 1")
        if isinstance(self.normalize, dict):
            if set(self.normalize) != {"mean", "std"} or any(len(v) != 3 for v in self.normalize.values()):
                raise ValueError('normalize must be "imagenet", "dataset" or {mean = [r, g, b], std = [r, g, b]}')
            if any(s <= 0 for s in self.normalize["std"]):
                raise ValueError("normalize.std values must be > 0")
        if self.mixup > 0 and self.cutmix > 0:
            raise ValueError("set either mixup or cutmix, not both")
        if self.randaugment:
            parts = self.randaugment.split("-")
            if parts[0] != "rand" or not any(p.startswith("m") and p[1:].replace(".", "", 1).isdigit() for p in parts):
                form = '"rand-m<magnitude>[-n<ops>...]"'
                raise ValueError(f"randaugment must be timm's form {form}, got {self.randaugment!r}")
        return self


class DataConfig(Section):
    """Where the data is and how it is read: COCO, VOC, Open Images, CSV, Hugging Face imagefolder, class folders."""

    format: Literal["coco", "csv", "folder", "cifar10", "voc", "openimages", "imagefolder"] = Field(
        "coco",
        description=(
            "multi-label: coco, voc, openimages, csv, imagefolder (Hugging Face layout); single-label: folder"
            " (root/<split>/<class>/*.jpg), cifar10 (the python batches)"
        ),
    )
    task: Literal["auto", "multi_label", "single_label"] = Field(
        "auto", description='csv / imagefolder: "single_label" for one label per image (auto: multi-label)'
    )
    root: str = Field("data/demo", description="the dataset root; every other path is relative to it")
    train: str = Field("train", description="the train split's name")
    val: str = Field("val", description="the val split's name (checkpoint selection, calibration)")
    test: str = Field("", description='the test split\'s name, only scored ("": no test split)')
    annotations: str = Field("annotations/instances_{split}.json", description="relative to root")
    images: str = Field("{split}", description="image folder relative to root")
    csv: str = Field("labels.csv", description='format = "csv": the file, relative to root ({split}: one per split)')
    label_sep: str = Field("|", min_length=1, description="separator inside a labels column (csv, imagefolder)")
    path_column: str = Field("path", min_length=1, description='format = "csv": the image path column')
    label_column: str = Field("", description='csv / imagefolder: the labels column ("": labels, or label)')
    split_column: str = Field("split", min_length=1, description='format = "csv": the split column')
    classes: list[str] = Field([], description="class names in order (default: the train split's labels, sorted)")
    voc_difficult: Literal["unknown", "positive", "ignore"] = Field(
        "unknown", description="VOC objects marked difficult: unknown for the image (VOC07), a positive, or left out"
    )
    openimages_labels: str = Field(
        "{split}-annotations-human-imagelabels.csv", description='format = "openimages": ImageID,LabelName,Confidence'
    )
    openimages_classes: str = Field("", description='format = "openimages": a LabelName,DisplayName CSV ("": none)')
    openimages_absent: Literal["unknown", "negative"] = Field(
        "unknown", description="an (image, class) pair with no row: unknown (not verified), or a negative"
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle", description='"balanced": repeat-factor sampling (LVIS), rare-class images repeated per epoch'
    )
    repeat_threshold: float = Field(0.1, gt=0.0, le=1.0, description="balanced: classes rarer than this repeat")
    image_size: int = Field(224, ge=16, le=2048, description="input side in pixels")
    eval_size: int = Field(0, ge=0, le=2048, description="the side every prediction sees (0: image_size); FixRes")
    batch_size: int = Field(
        32, ge=1, description="images per batch, all processes together; a step takes train.accum_steps batches"
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (0: load in the training process)")
    persistent_workers: bool = Field(True, description="keep DataLoader workers between epochs")
    prefetch: int = Field(2, ge=1, description="batches each worker loads ahead")
    include_crowd: bool = Field(True, description="whether COCO iscrowd=1 annotations make their class positive")
    min_box_area: float = Field(
        0.0, ge=0.0, description="objects whose box (w x h px) is smaller do not count as a label (COCO only)"
    )
    on_bad_image: Literal["skip", "error"] = Field(
        "skip", description='"skip" an unreadable image (listed in bad_images.json), or stop with an "error"'
    )
    on_leak: Literal["warn", "error"] = Field(
        "warn", description="validate --check-images: an image in two splits (exact or near duplicate) warns or errs"
    )
    augment: AugmentConfig = AugmentConfig()
    holdout: HoldoutConfig = HoldoutConfig()

    @property
    def has_test(self) -> bool:
        """Whether the run has a test role: a named test split, or the scoring half of ``[data.holdout]``."""
        from_val = self.holdout.seed is not None and self.holdout.source == "val"
        return bool(self.test) or (from_val and self.holdout.scoring)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.holdout.source == "train":
            if self.holdout.seed is None:
                raise ValueError('holdout.source = "train" draws val from train by a seed: set holdout.seed')
            if self.val:
                raise ValueError('holdout.source = "train" draws the val role from data.train; leave data.val empty')
        elif self.holdout.seed is not None and self.test:
            raise ValueError("holdout draws the test role from data.val; leave data.test empty")
        if "{split}" not in self.annotations:
            raise ValueError('annotations must contain "{split}", e.g. "annotations/instances_{split}.json"')
        if not self.train or not (self.val or self.holdout.source == "train"):
            raise ValueError("train and val split names must not be empty")
        if len(set(self.classes)) != len(self.classes) or any(not c.strip() for c in self.classes):
            raise ValueError("classes must be distinct, non-empty names")
        if self.task != "auto" and self.format not in ("csv", "imagefolder"):
            raise ValueError(f'task is chosen by data.format = "{self.format}"; leave it "auto"')
        return self
