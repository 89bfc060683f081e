"""Issue 21, item 3: exact and near duplicates within and across splits, and leaks in validate --check-images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.leaks import find_duplicates
from finetune.data.split import ClassMap, Split

from .conftest import assert_user_error, run_cli


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
