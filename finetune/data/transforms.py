"""Albumentations pipelines for training and evaluation."""

from __future__ import annotations

import albumentations as A
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER_P = 0.8  # probability that an image is colour-jittered at all


def jitter_hue(strength: float) -> float:
    """The hue range that goes with a ``color_jitter`` strength: a quarter of it, at most half the wheel."""
    return min(0.5, strength / 4)


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

    Returns:
        The pipeline; call it as ``pipeline(image=hwc_uint8)["image"]``.
    """
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
    if color_jitter > 0 and jitter_in_workers:
        j = color_jitter
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=jitter_hue(j), p=JITTER_P))
    ops += [A.Normalize(mean=mean, std=std), ToTensorV2()] if normalize else [ToTensorV2()]
    return A.Compose(ops)


def eval_transform(
    size: int, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, normalize: bool = True
) -> A.Compose:
    """Evaluation pipeline: resize the whole image to ``size`` x ``size`` (no centre crop: it can cut labels out)."""
    return A.Compose([A.Resize(size, size), *([A.Normalize(mean=mean, std=std)] if normalize else []), ToTensorV2()])
