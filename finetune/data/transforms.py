"""Albumentations pipelines for training and evaluation (timm's RandAugment as one of their steps)."""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import numpy as np
from albumentations.pytorch import ToTensorV2
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER_P = 0.8  # probability that an image is colour-jittered at all


def jitter_hue(strength: float) -> float:
    """The hue range that goes with a ``color_jitter`` strength: a quarter of it, at most half the wheel."""
    return min(0.5, strength / 4)


class RandAugment(A.ImageOnlyTransform):
    """timm's ``rand_augment_transform`` (``"rand-m9-n2"``) as a step of an albumentations pipeline.

    timm's ops draw from Python's and NumPy's global RNGs. Each call seeds both from the pipeline's own seed (set per
    sample by :class:`~finetune.data.dataset.ImageDataset`) and puts them back after, so a sample's draw depends on
    (seed, epoch, index) alone, as every other step's does, and nothing else's random stream moves.
    """

    def __init__(self, spec: str, size: int, mean: tuple[float, ...] = IMAGENET_MEAN, p: float = 1.0) -> None:
        super().__init__(p=p)
        from timm.data.auto_augment import rand_augment_transform

        self.spec = spec
        hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean)}
        self.op = rand_augment_transform(spec, hparams)  # timm's create_transform's hparams for this size

    def get_params(self) -> dict[str, Any]:  # noqa: D102
        return {"seed": self.py_random.randrange(2**32)}

    def apply(self, img: np.ndarray, seed: int = 0, **params: Any) -> np.ndarray:  # noqa: D102
        saved, saved_np = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return np.array(self.op(Image.fromarray(img)))  # a writable copy: ToTensorV2 wraps it
        finally:
            random.setstate(saved)
            np.random.set_state(saved_np)

    def get_transform_init_args_names(self) -> tuple[str, ...]:  # noqa: D102
        return ("spec",)


def geometry(
    size: int, crop: str, scale: tuple[float, float], hflip: float, vflip: float, rot90: bool
) -> list[A.BasicTransform]:
    """The crop (or resize) to ``size`` and the flips and rotations that follow it: what moves object boxes."""
    if crop == "random_resized_crop":
        ops: list[A.BasicTransform] = [A.RandomResizedCrop(size=(size, size), scale=tuple(scale))]
    else:
        ops = [A.Resize(size, size)]
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        ops.append(A.VerticalFlip(p=vflip))
    if rot90:
        ops.append(A.RandomRotate90(p=1.0))
    return ops


def train_transform(
    size: int,
    crop: str = "random_resized_crop",
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    normalize: bool = True,
    jitter_in_workers: bool = True,
    vflip: float = 0.0,
    rot90: bool = False,
    randaugment: str = "",
    random_erasing: float = 0.0,
    boxes: bool = False,
) -> A.Compose:
    """Training pipeline: crop or resize to ``size``, flip, optional colour jitter, normalise, to CHW tensor.

    Args:
        size: Output side length.
        crop: ``"random_resized_crop"`` or ``"resize"``.
        scale: Area range for the random-resized crop. Multi-label crops can cut objects out, so keep it wide.
        hflip: Horizontal flip probability.
        color_jitter: Brightness/contrast/saturation strength (hue gets a quarter of it); 0 disables.
        mean: Per-channel mean, 0..1 scale.
        std: Per-channel std, 0..1 scale.
        normalize: False: a uint8 tensor out, normalised later on the device (``batch_images``).
        vflip: Vertical flip probability.
        rot90: Rotate by a random multiple of 90 degrees (square outputs only, which every pipeline here makes).
        jitter_in_workers: False: leave the colour jitter out; the dataset draws its parameters and ``batch_images``
            applies it on the device (``data/jitter.py``).
        randaugment: timm's RandAugment string (``"rand-m9-n2"``), after the flips; "" for none.
        random_erasing: Probability of erasing a random rectangle with noise (Zhong et al.; timm's ``reprob``).
        boxes: Carry object boxes (``bboxes``, pascal_voc pixels, with ``box_classes``) through the crop and flips.
            RandAugment's rotate, shear and translate do not move them.

    Returns:
        The pipeline; call it as ``pipeline(image=hwc_uint8)["image"]``.
    """
    ops = geometry(size, crop, scale, hflip, vflip, rot90)
    if randaugment:
        ops.append(RandAugment(randaugment, size, mean))
    if color_jitter > 0 and jitter_in_workers:
        j = color_jitter
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=jitter_hue(j), p=JITTER_P))
    if random_erasing > 0:
        ops.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=random_erasing))
    ops += [A.Normalize(mean=mean, std=std), ToTensorV2()] if normalize else [ToTensorV2()]
    if boxes:
        bbox = A.BboxParams(format="pascal_voc", label_fields=["box_classes"], clip=True, filter_invalid_bboxes=True)
        return A.Compose(ops, bbox_params=bbox)
    return A.Compose(ops)


def eval_transform(
    size: int, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, normalize: bool = True
) -> A.Compose:
    """Evaluation pipeline: resize the whole image to ``size`` x ``size`` (no centre crop: it can cut labels out)."""
    return A.Compose([A.Resize(size, size), *([A.Normalize(mean=mean, std=std)] if normalize else []), ToTensorV2()])
