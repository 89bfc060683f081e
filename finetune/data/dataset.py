"""The dataset every format feeds to training and evaluation: samples, collation, and batches on the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.data.jitter import apply_jitter, sample_jitter
from finetune.data.split import DECODE_ERRORS, ClassMap, read_rgb
from finetune.data.transforms import JITTER_P, jitter_hue


class ImageDataset(torch.utils.data.Dataset):
    """One split as (image, target) samples: multi-hot targets for multi-label data, one-hot for single-label.

    A sample is a dict with ``image`` (CHW float tensor), ``target`` (float multi-hot), ``index`` and, when the image
    cannot be read, ``error`` (a message naming the path) instead of ``image``; the trainer applies the bad-image
    policy in the main process so the error reaches the user as one line.
    """

    def __init__(
        self,
        image_paths: list[Path],
        targets: np.ndarray,
        classes: ClassMap,
        transform: Callable[..., dict[str, Any]] | None = None,
        seed: int = 0,
        image_ids: list[int] | None = None,
        norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        device_jitter: float = 0.0,
        boxes: list[np.ndarray] | None = None,
    ) -> None:
        self.image_paths = image_paths
        self.targets = targets
        self.classes = classes
        self.transform = transform
        self.seed = seed
        self.norm = norm  # mean, std: the transform yields uint8, normalised on the device (see batch_images)
        self.device_jitter = device_jitter  # > 0: colour-jitter strength drawn here, applied in batch_images
        # In shared memory: persistent DataLoader workers see set_epoch (their own copy of an int would not).
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.image_ids = image_ids or list(range(len(image_paths)))
        self.boxes = boxes  # per image [k, 5] (class, x0, y0, x1, y1): moved with the image, for area cutmix

    @property
    def epoch(self) -> int:
        """The epoch augmentation is seeded with."""
        return int(self._epoch[0])

    def __len__(self) -> int:
        return len(self.image_paths)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation is seeded by (seed, epoch, index): the same on resume and for any number of workers."""
        self._epoch[0] = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        # A balanced sampler's k-th draw of an image in an epoch arrives as index + k * n (samplers.tag_repeats): the
        # same image, augmented with its own seed; the first draw keeps the (seed, epoch, index) seed.
        repeat, index = divmod(index, len(self.targets))
        key = (self.seed, self.epoch, index) + ((repeat,) if repeat else ())
        sample: dict[str, Any] = {"target": torch.from_numpy(self.targets[index]), "index": index}
        if isinstance(self.image_paths, np.ndarray):  # in-memory images (CIFAR-10 batches): [n, h, w, 3] uint8
            image = self.image_paths[index]
            path = None
        else:
            path = self.image_paths[index]
        try:
            image = read_rgb(path) if path is not None else image
        except FileNotFoundError:
            sample["error"] = f"{path}: image file not found"
            return sample
        except DECODE_ERRORS as err:
            sample["error"] = f"{path}: cannot decode image ({type(err).__name__}: {err})"
            return sample
        if self.transform is not None:
            if hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(hash(key) % 2**32)
            if self.boxes is not None:
                b = self.boxes[index]
                b = b[(b[:, 3] > b[:, 1]) & (b[:, 4] > b[:, 2])]  # albumentations refuses boxes of no area
                out = self.transform(image=image, bboxes=b[:, 1:], box_classes=b[:, 0])
                moved = np.column_stack([np.asarray(out["box_classes"]), np.asarray(out["bboxes"]).reshape(-1, 4)])
                gone = sorted(set(b[:, 0].tolist()) - set(moved[:, 0].tolist()))  # cropped away: a box of no area
                moved = np.vstack([moved.reshape(-1, 5), [[c, 0, 0, 0, 0] for c in gone]]) if gone else moved
                sample["boxes"] = torch.from_numpy(moved.astype(np.float32).reshape(-1, 5))
                image = out["image"]
            else:
                image = self.transform(image=image)["image"]
        else:
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        sample["image"] = image
        if self.device_jitter > 0:
            rng = np.random.default_rng(hash((*key[:3], 1, *key[3:])) % 2**32)
            j = self.device_jitter
            sample["jitter"] = torch.from_numpy(sample_jitter(rng, j, jitter_hue(j), JITTER_P))
        if self.norm is not None:
            sample["norm"] = self.norm
        return sample


def batch_images(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch's images on ``device`` as normalised float.

    uint8 batches are normalised there (as timm's PrefetchLoader does), so workers ship a quarter of the bytes and
    skip the float conversion. A batch with ``jitter`` parameters is colour-jittered there first.
    """
    x = batch["image"].to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        mean, std = (torch.tensor(v, device=device, dtype=torch.float32).view(1, -1, 1, 1) for v in batch["norm"])
        if "jitter" in batch:
            x = (apply_jitter(x.float() / 255, batch["jitter"]) - mean) / std
        else:
            x = (x.float() - mean * 255) / (std * 255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good samples; list the bad ones under ``errors`` so the trainer can skip or stop."""
    good = [s for s in samples if "error" not in s]
    batch: dict[str, Any] = {"errors": [s["error"] for s in samples if "error" in s]}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        if "norm" in good[0]:
            batch["norm"] = good[0]["norm"]
        if "jitter" in good[0]:
            batch["jitter"] = torch.stack([s["jitter"] for s in good])
        batch["target"] = torch.stack([s["target"] for s in good])
        batch["index"] = torch.tensor([s["index"] for s in good])
        if "boxes" in good[0]:
            batch["boxes"] = [s["boxes"] for s in good]
    return batch
