"""Reading images and their statistics: odd modes, decompression bombs, the bad-image policy, caches, symlink loops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.config import load_recipe
from finetune.data.coco import read_coco_split
from finetune.data.dataset import ImageDataset
from finetune.data.split import check_images, read_rgb
from finetune.data.stats import compute_stats
from finetune.errors import UserError

from .conftest import run_cli
from .helpers import copy_data


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I", ".tif")])
def test_16_bit_grayscale_keeps_its_values(mode: str, suffix: str, tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    img = Image.fromarray(ramp.astype(np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    path = (tmp_path / "deep").with_suffix(suffix)
    img.save(path)
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 257), atol=1)  # was 255 everywhere
    assert not check_images([path], decode=True)


def test_a_decompression_bomb_is_a_bad_image_not_a_crash(
    tiny_coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = read_coco_split(tiny_coco, "val")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 48x48 image is now over twice the limit
    sample = ImageDataset(split.image_paths, split.targets, split.classes)[0]
    assert "DecompressionBombError" in sample["error"] and "image" not in sample
    assert "DecompressionBombError" in check_images(split.image_paths[:1], decode=True)[0]


def test_stats_follow_on_bad_image(tiny_coco: Path, tmp_path: Path) -> None:
    split = read_coco_split(copy_data(tiny_coco, tmp_path), "train")
    split.image_paths[0].write_bytes(b"not an image")
    stats = compute_stats(split, 32)
    assert stats["skipped"] == 1 and stats["images"] == 24
    with pytest.raises(UserError, match="cannot read image .*data.on_bad_image"):
        compute_stats(split, 32, on_bad_image="error")


def test_a_corrupt_stats_cache_is_computed_again(tiny_recipe: Path) -> None:
    from finetune.assembly import build_run
    from finetune.data.stats import cache_path

    assert run_cli("data", "stats", str(tiny_recipe)).returncode == 0
    split = build_run(load_recipe(tiny_recipe), roles=("train",)).splits["train"]
    cache = cache_path(split, "coco", load_recipe(tiny_recipe).data.image_size)
    assert cache.is_file()
    cache.write_text('{"mean": [0.5')  # torn
    again = run_cli("data", "stats", str(tiny_recipe))
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert json.loads(cache.read_text())["mean"]


def test_a_symlink_loop_predicts_each_file_once(tmp_path: Path) -> None:
    from finetune.deploy.predictor import expand_paths

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(b"")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    files, _ = expand_paths([f"{tmp_path}/d/**/*.jpg", str(tmp_path / "d" / "x.jpg")])
    assert files == [tmp_path / "d" / "x.jpg"]  # was: the same file 41 times
