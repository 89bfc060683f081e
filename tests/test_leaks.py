"""Exact and near duplicates within and across splits, and leaks in validate --check-images."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from finetune.data.leaks import Duplicate, find_duplicates, merge, similar_pairs
from finetune.data.split import ClassMap, Split

from .conftest import COCO_TINY, LITE0_WEIGHTS, TINY_RECIPE, assert_user_error, run_cli


def _photo(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A smooth random picture (blurred noise upsampled): structure at several scales, as photos have."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 6, (size, size, 3))
    return np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


def _split(name: str, paths: list[Path]) -> Split:
    classes = ClassMap((1,), ("a",))
    return Split(name, Path(), Path(), list(range(len(paths))), paths, np.zeros((len(paths), 1), np.float32), classes)


def _write(folder: Path, rng: np.random.Generator, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(_photo(rng)).save(paths[-1])
    return paths


def test_planted_duplicates_and_leaks_are_found_and_a_clean_set_has_none(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, test = _write(tmp_path / "train", rng, 30), _write(tmp_path / "test", rng, 10)
    assert find_duplicates({"train": _split("train", train), "test": _split("test", test)}) == []

    exact = tmp_path / "train" / "copy.png"
    exact.write_bytes(train[3].read_bytes())  # the same file twice in train
    near = tmp_path / "train" / "near.jpg"  # resized and re-encoded as JPEG: a near duplicate within train
    Image.open(train[5]).resize((80, 80), Image.BILINEAR).save(near, quality=80)
    leaked = tmp_path / "test" / "leaked.jpg"  # a train image in test, re-encoded
    Image.open(train[7]).save(leaked, quality=90)
    found = find_duplicates({"train": _split("train", [*train, exact, near]), "test": _split("test", [*test, leaked])})
    pairs = {(d.kind, Path(d.a[1]).name, Path(d.b[1]).name, d.leak) for d in found}
    assert pairs == {
        ("exact", "3.png", "copy.png", False),
        ("near", "5.png", "near.jpg", False),
        ("near", "7.png", "leaked.jpg", True),
    }
    assert found[0].leak  # leaks are listed first


def test_validate_reports_a_leak_and_errs_when_asked(tiny_recipe: Path, tiny_coco: Path) -> None:
    ann = json.loads((tiny_coco / "annotations" / "instances_test.json").read_text())
    src = tiny_coco / "train" / sorted(p.name for p in (tiny_coco / "train").iterdir())[0]
    victim = tiny_coco / "test" / ann["images"][0]["file_name"]
    original = victim.read_bytes()
    try:
        buf = io.BytesIO()
        Image.open(src).save(buf, format="JPEG", quality=85)  # a train image re-encoded, put in test
        victim.write_bytes(buf.getvalue())
        proc = run_cli("validate", str(tiny_recipe), "--check-images")
        assert proc.returncode == 0, proc.stderr
        assert "leak" in proc.stderr and src.name in proc.stderr and "1 across splits" in proc.stderr
        proc = run_cli("validate", str(tiny_recipe), "--check-images", "--set", 'data.on_leak="error"')
        assert_user_error(proc, "train<->test", src.name, 'data.on_leak = "warn"')
    finally:
        victim.write_bytes(original)


def test_similar_pairs_are_found_by_cosine_and_merged_without_repeats() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 64))
    feats[40] = feats[3] + 0.1 * rng.normal(size=64)  # alike: cosine ~0.99
    where = [("train" if i < 30 else "test", f"{i}.jpg") for i in range(50)]
    found = similar_pairs(feats, where, min_cosine=0.9)
    assert [(d.a[1], d.b[1], d.leak) for d in found] == [("3.jpg", "40.jpg", True)] and found[0].cosine > 0.95
    hashed = Duplicate("near", where[3], where[40], 2)
    assert merge([hashed], found) == [hashed]  # the pair phash found is not listed twice
    assert "cosine 0.99" in found[0].line() or "cosine 1.00" in found[0].line()


@pytest.mark.slow
@pytest.mark.skipif(not (COCO_TINY.is_dir() and LITE0_WEIGHTS.is_file()), reason="../shared data or weights absent")
def test_a_mirrored_leak_phash_misses_is_found_by_features(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    shutil.copytree(COCO_TINY, root)
    src = sorted((root / "train2017").glob("*.jpg"))[0]
    victim = sorted((root / "val2017").glob("*.jpg"))[0]
    img = ImageEnhance.Brightness(ImageOps.mirror(Image.open(src).convert("RGB"))).enhance(1.2)
    img.save(victim, quality=80)  # a train image, mirrored and brighter, in val
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.format(root=root.as_posix(), runs=(tmp_path / "runs").as_posix()))
    sets = ['data.train="train2017"', 'data.val="val2017"', 'data.test=""', "data.image_size=160"]
    sets += ['model.name="efficientnet_lite0"', f'model.checkpoint="{LITE0_WEIGHTS.as_posix()}"']
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("validate", str(recipe), "--check-images", *args)
    assert proc.returncode == 0 and "0 across splits" in proc.stderr, proc.stderr[-2000:]  # phash: not found
    proc = run_cli("validate", str(recipe), "--check-images", "--features", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    leaks = [line for line in proc.stderr.splitlines() if line.startswith("leak")]
    assert any("similar" in line and src.name in line and victim.name in line for line in leaks), proc.stderr[-2000:]
    assert "1 across splits" in proc.stderr  # and no other pair of coco-tiny's 160 real images
    assert_user_error(run_cli("validate", str(recipe), "--features", *args), "--features goes with --check-images")
