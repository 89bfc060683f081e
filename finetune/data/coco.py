"""COCO-format multi-label classification data, read with pycocotools.

``instances_*.json`` -> one multi-hot target per image over the file's categories, in category-id order
(contiguous index <-> COCO id <-> name). Images without annotations are all-negative samples.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from finetune.data.jitter import apply_jitter, sample_jitter
from finetune.data.transforms import JITTER_P, jitter_hue
from finetune.errors import UserError

try:  # libjpeg-turbo without PIL's image storage in between; optional, PIL reads everything without it
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a dependency, but the toolkit works without it
    _simplejpeg = None


@dataclass(frozen=True)
class ClassMap:
    """Contiguous class index <-> COCO category id and name."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def to_json(self) -> list[dict[str, Any]]:
        """The form saved as ``classes.json`` in a run."""
        return [{"index": i, "id": cid, "name": name} for i, (cid, name) in enumerate(zip(self.ids, self.names))]

    @classmethod
    def from_json(cls, items: list[dict[str, Any]]) -> ClassMap:
        """Inverse of :meth:`to_json`."""
        items = sorted(items, key=lambda d: d["index"])
        return cls(tuple(int(d["id"]) for d in items), tuple(str(d["name"]) for d in items))


def load_coco(annotation_file: str | Path) -> COCO:
    """Read an ``instances_*.json`` file, with one-line errors for a missing or malformed file."""
    path = Path(annotation_file)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found; check data.root, data.annotations and the split names")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            coco = COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a valid COCO annotation file ({err})") from None
    if "images" not in coco.dataset or "categories" not in coco.dataset:
        raise UserError(f"{path}: not a COCO instances file (needs 'images' and 'categories')")
    return coco


def class_map_of(coco: COCO) -> ClassMap:
    """The categories of a COCO file, sorted by id (so index order matches the usual COCO 80-class order)."""
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    return ClassMap(tuple(c["id"] for c in cats), tuple(c["name"] for c in cats))


def multi_hot_targets(
    coco: COCO, image_ids: list[int], classes: ClassMap, include_crowd: bool = True, min_box_area: float = 0.0
) -> np.ndarray:
    """Multi-hot targets ``[len(image_ids), len(classes)]`` (float32).

    Args:
        coco: The annotations.
        image_ids: The images, in row order.
        classes: Column order.
        include_crowd: Whether ``iscrowd=1`` annotations (a crowd of people, say) make their class positive.
        min_box_area: Objects whose box (w*h, pixels) is smaller do not count as a label.

    Returns:
        The target matrix.
    """
    column = {cid: i for i, cid in enumerate(classes.ids)}
    row = {img_id: i for i, img_id in enumerate(image_ids)}
    targets = np.zeros((len(image_ids), len(classes)), dtype=np.float32)
    for ann in coco.dataset.get("annotations", []):
        r = row.get(ann["image_id"])
        if r is None or (ann.get("iscrowd", 0) and not include_crowd):
            continue
        w, h = ann["bbox"][2], ann["bbox"][3]
        if w * h < min_box_area:
            continue
        c = column.get(ann["category_id"])
        if c is None:
            raise UserError(f"annotation {ann.get('id')} has category_id {ann['category_id']} not in 'categories'")
        targets[r, c] = 1.0
    return targets


# What a file that is not a readable image raises: PIL's own errors, truncation, and a decompression bomb (an image
# over PIL's pixel limit, which is not an OSError).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit integer grayscale (``I;16*``, ``I``) and float (``F``) images scaled to 8 bits.

    PIL's own ``convert("RGB")`` clips such pixels at 255, which turns a 16-bit PNG white.
    """
    a = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        scaled = (a - lo) / (hi - lo or 1.0) * 255.0
    else:  # 16-bit samples (I;16 from a 16-bit PNG or TIFF; I holds those too): the top 8 bits
        scaled = np.clip(a.astype(np.int64), 0, 65535) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


JPEG_MAGIC = b"\xff\xd8\xff"


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """A baseline or progressive JPEG decoded by libjpeg-turbo straight to packed RGB, or None to leave it to PIL.

    simplejpeg gives bitwise PIL's pixels (same libjpeg-turbo, same IDCT and upsampling) at about 1.6x the speed: PIL
    decodes into its 4-byte-per-pixel storage and ``np.asarray`` repacks it. CMYK/YCCK files, anything libjpeg warns
    about (a truncated file), and images over PIL's decompression-bomb limit go to PIL, which handles, raises or warns
    as it always has.
    """
    if _simplejpeg is None:
        return None
    try:  # not a JPEG at all: the header read raises ValueError too
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data, strict=True)
        limit = Image.MAX_IMAGE_PIXELS
        if colorspace not in ("Gray", "YCbCr", "RGB") or (limit is not None and height * width > limit):
            return None
        return _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)  # strict: libjpeg warnings raise
    except ValueError:
        return None


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image as HWC uint8 RGB (grayscale of 8 or 16 bits, CMYK, palette and RGBA are converted).

    JPEGs take the fast path (:func:`_decode_jpeg`); everything else, and any JPEG it declines, is read by PIL.
    """
    with open(path, "rb") as f:  # only a JPEG is read whole here; PIL reads anything else from its header on
        head = f.read(3)
        fast = _decode_jpeg(head + f.read()) if head == JPEG_MAGIC else None
    if fast is not None:
        return fast
    with Image.open(path) as img:  # by path, so PIL's own errors name the file
        img.load()
        if img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)
        if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
            # Composite on white: dropping alpha would expose whatever colour transparent pixels happen to hold.
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, rgba)
        return np.asarray(img.convert("RGB"))


class CocoMultiLabel(torch.utils.data.Dataset):
    """One split of a COCO-format dataset as (image, multi-hot target) samples.

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
                self.transform.set_random_seed(hash((self.seed, self.epoch, index)) % 2**32)
            image = self.transform(image=image)["image"]
        else:
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        sample["image"] = image
        if self.device_jitter > 0:
            rng = np.random.default_rng(hash((self.seed, self.epoch, index, 1)) % 2**32)
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
    return batch


@dataclass
class CocoSplit:
    """What is read from one split's annotation file before any image is opened."""

    name: str
    annotation_file: Path
    image_dir: Path
    image_ids: list[int]
    image_paths: list[Path]
    targets: np.ndarray
    classes: ClassMap


def read_split(
    root: str | Path,
    split: str,
    annotations: str = "annotations/instances_{split}.json",
    images: str = "{split}",
    include_crowd: bool = True,
    min_box_area: float = 0.0,
    classes: ClassMap | None = None,
) -> CocoSplit:
    """Read one split's annotations into image paths and multi-hot targets.

    Args:
        root: Dataset root.
        split: Split name, substituted for ``{split}`` in ``annotations`` and ``images``.
        annotations: Annotation file template, relative to ``root``.
        images: Image folder template, relative to ``root``.
        include_crowd: See :func:`multi_hot_targets`.
        min_box_area: See :func:`multi_hot_targets`.
        classes: The training split's classes; this split's categories must match them.

    Returns:
        The split.
    """
    root = Path(root)
    ann_file = root / annotations.format(split=split)
    coco = load_coco(ann_file)
    own = class_map_of(coco)
    if classes is not None and own.ids != classes.ids:
        raise UserError(f"{ann_file}: categories differ from the training split's ({len(own)} vs {len(classes)})")
    classes = classes or own
    if not len(classes):
        raise UserError(f"{ann_file}: no categories; a multi-label dataset needs at least one")
    image_dir = root / images.format(split=split)
    image_ids = sorted(coco.getImgIds())
    paths = [image_dir / coco.imgs[i]["file_name"] for i in image_ids]
    targets = multi_hot_targets(coco, image_ids, classes, include_crowd, min_box_area)
    return CocoSplit(split, ann_file, image_dir, image_ids, paths, targets, classes)


def check_images(paths: list[Path], decode: bool = False) -> list[str]:
    """Problems with image files: missing ones (a cheap stat), and with ``decode`` undecodable ones."""
    problems: list[str] = []
    if isinstance(paths, np.ndarray):  # in-memory images: nothing on disk to check
        return problems
    for path in paths:
        if not path.is_file():
            problems.append(f"{path}: image file not found")
        elif decode:
            try:
                read_rgb(path)
            except DECODE_ERRORS as err:
                problems.append(f"{path}: cannot decode image ({type(err).__name__}: {err})")
    return problems
