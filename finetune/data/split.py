"""What every data format reads into: the classes (:class:`ClassMap`), one split (:class:`Split`), and image decoding.

A reader (COCO, CSV, class folders, CIFAR-10) returns a :class:`Split`: image paths (or in-memory pixels) and a
target matrix over a :class:`ClassMap`, read before any image is opened. :func:`read_rgb` is the one image decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from finetune.errors import UserError

try:  # libjpeg-turbo without PIL's image storage in between; optional, PIL reads everything without it
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a dependency, but the toolkit works without it
    _simplejpeg = None


@dataclass(frozen=True)
class ClassMap:
    """Contiguous class index <-> category id (a COCO id, or the index for other formats) and name."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def to_json(self) -> list[dict[str, Any]]:
        """The form saved as ``classes.json`` in a run."""
        return [{"index": i, "id": cid, "name": name} for i, (cid, name) in enumerate(zip(self.ids, self.names))]

    @classmethod
    def of_names(cls, names: list[str] | tuple[str, ...]) -> ClassMap:
        """Classes known by name alone (every format but COCO): ids 1..n in the given order."""
        return cls(tuple(range(1, len(names) + 1)), tuple(names))

    @classmethod
    def from_json(cls, items: list[dict[str, Any]]) -> ClassMap:
        """Inverse of :meth:`to_json`."""
        items = sorted(items, key=lambda d: d["index"])
        return cls(tuple(int(d["id"]) for d in items), tuple(str(d["name"]) for d in items))


@dataclass
class Split:
    """What is read from one split's annotations (or folder listing) before any image is opened."""

    name: str
    annotation_file: Path
    image_dir: Path
    image_ids: list[int]
    image_paths: list[Path]
    targets: np.ndarray
    classes: ClassMap
    boxes: list[np.ndarray] | None = None  # per image [k, 5]: class index, x0, y0, x1, y1 (pixels), where known


def split_template(template: str, split: str, key: str) -> str:
    """``template`` (a recipe's path pattern) with ``{split}`` replaced by the split's name.

    Nothing else is evaluated: ``str.format`` would also read attributes (``{split.__class__}``) and fail with a
    ``KeyError`` on an unknown name.

    Raises:
        UserError: For any other brace, naming ``key``.
    """
    if "{" in template.replace("{split}", "") or "}" in template.replace("{split}", ""):
        raise UserError(
            f"{key} = {template!r}: the only placeholder is {{split}} (the split's name); remove the other braces"
        )
    return template.replace("{split}", split)


def inside(folder: Path, name: str, where: str) -> Path:
    """``folder / name`` for an image that annotations name, refused when the name leaves ``folder``.

    The check is on the name as written (absolute, or a ``..`` part), not on where links lead: a folder of images
    linked from another disk stays usable, and a downloaded annotation file cannot reach a user's other files.

    Raises:
        UserError: For an absolute name or one that climbs out of ``folder``, naming ``where``.
    """
    if "\\" in name:  # a Windows path: its ".." would not be seen as one here
        raise UserError(f"{where}: image {name!r} uses '\\'; name images relative to {folder} with '/'")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(
            f"{where}: image {name!r} is outside the image folder {folder}; annotations name images relative to it"
        )
    return folder / name


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
        return pil_rgb(img)


def pil_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as HWC uint8 RGB, exactly as :func:`read_rgb` converts a file (16-bit, ``F``, alpha)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: dropping alpha would expose whatever colour transparent pixels happen to hold.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba)
    return np.asarray(img.convert("RGB"))


def check_images(
    paths: list[Path], decode: bool = False, each: Callable[[int, np.ndarray], None] | None = None
) -> list[str]:
    """Problems with image files: missing ones (a cheap stat), and with ``decode`` undecodable ones.

    ``each(index, pixels)`` is called for every image decoded (in-memory images included), so that a pass that
    needs the pixels (duplicate finding) shares the one decode.
    """
    problems: list[str] = []
    if isinstance(paths, np.ndarray):  # in-memory images: nothing on disk to check
        for i in range(len(paths) if each is not None else 0):
            each(i, paths[i])
        return problems
    for i, path in enumerate(paths):
        if not path.is_file():
            problems.append(f"{path}: image file not found")
        elif decode:
            try:
                pixels = read_rgb(path)
            except DECODE_ERRORS as err:
                problems.append(f"{path}: cannot decode image ({type(err).__name__}: {err})")
                continue
            if each is not None:
                each(i, pixels)
    return problems
