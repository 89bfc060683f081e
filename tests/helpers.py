"""Test helpers kept out of the library: data files written for tests, and paired runs to compare."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np

from finetune.data.classfolders import CIFAR_SPLITS
from finetune.train.loop import Hook, Loop


def write_fake_cifar10(root: str | Path, n_per_batch: int = 20, seed: int = 0) -> Path:
    """Write tiny batch files in the real CIFAR-10 python format (for tests and demos)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, f)
    for name in [*CIFAR_SPLITS["train"], *CIFAR_SPLITS["test"]]:
        labels = rng.integers(0, 10, n_per_batch)
        data = (rng.integers(0, 60, (n_per_batch, 3072)) + labels[:, None] * 19).astype(np.uint8)
        doc = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)],
        }
        with (root / name).open("wb") as f:
            pickle.dump(doc, f)
    return root


def _coco_split(root: Path, split: str) -> tuple[list[str], list[tuple[str, list[tuple[str, list[float]]]]]]:
    """The category names (in id order) and per image (file name, [(class, COCO box)]) of a COCO split."""
    import json

    doc = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    cats = {c["id"]: c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])}
    objects: dict[int, list[tuple[str, list[float]]]] = {im["id"]: [] for im in doc["images"]}
    for a in doc["annotations"]:
        objects[a["image_id"]].append((cats[a["category_id"]], a["bbox"]))
    images = sorted(doc["images"], key=lambda im: im["id"])
    return list(cats.values()), [(im["file_name"], objects[im["id"]]) for im in images]


def write_all_formats(coco: Path, out: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, list]:
    """The same images and labels as a COCO dataset, written as VOC, Open Images, imagefolder and named-column CSV.

    Images are linked, not copied; images without an object are left out (VOC has none). Returns per format the
    ``--set`` overrides that read it (classes in COCO's order, so every format's targets line up with COCO's).
    """
    import csv
    import json

    names: list[str] = []
    oi_rows, csv_rows = [], []
    for split in splits:
        names, images = _coco_split(coco, split)
        for d in ("voc/Annotations", "voc/JPEGImages", "voc/ImageSets/Main", f"hf/{split}", f"oi/{split}", "csv/img"):
            (out / d).mkdir(parents=True, exist_ok=True)
        ids = []
        for file_name, objects in images:
            if not objects:  # a VOC file lists at least one object: images without one are left out everywhere
                continue
            stem = f"{split}_{Path(file_name).stem}"
            src = (coco / split / file_name).resolve()
            for link in (
                out / "voc/JPEGImages" / f"{stem}.jpg",
                out / f"hf/{split}" / file_name,
                out / f"oi/{split}" / f"{stem}.jpg",
                out / "csv/img" / f"{stem}.jpg",
            ):
                link.symlink_to(src)
            ids.append(stem)
            xml = "".join(
                f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
                f"<xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
                for n, (x, y, w, h) in objects
            )
            (out / "voc/Annotations" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.jpg</filename>{xml}</annotation>"
            )
            present = {n for n, _ in objects}
            oi_rows += [(split, stem, n, int(n in present)) for n in names]
            csv_rows.append((f"./img/{stem}.jpg", "|".join(sorted(present)), split))
            with (out / f"hf/{split}/metadata.jsonl").open("a") as f:
                f.write(json.dumps({"file_name": file_name, "tags": sorted(present)}) + "\n")
        (out / "voc/ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        with (out / "oi" / f"{split}-annotations-human-imagelabels.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageID", "Source", "LabelName", "Confidence"])
            w.writerows([(i, "verification", f"/m/{n}", c) for s, i, n, c in oi_rows if s == split])
    with (out / "oi" / "class-descriptions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([(f"/m/{n}", n) for n in names])  # headerless, as older Open Images releases ship it
    with (out / "csv" / "data.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "tags", "part"])
        w.writerows(csv_rows)
    classes = "data.classes=" + json.dumps(names)
    return {
        "voc": ['data.format="voc"', f'data.root="{out / "voc"}"', classes],
        "openimages": [
            'data.format="openimages"',
            f'data.root="{out / "oi"}"',
            classes,
            'data.openimages_classes="class-descriptions.csv"',
        ],
        "imagefolder": ['data.format="imagefolder"', f'data.root="{out / "hf"}"', classes, 'data.label_column="tags"'],
        "csv": [
            'data.format="csv"',
            f'data.root="{out / "csv"}"',
            classes,
            'data.csv="data.csv"',
            'data.path_column="image"',
            'data.label_column="tags"',
            'data.split_column="part"',
        ],
    }


NO_AUGMENT = ['data.augment.crop="resize"', "data.augment.hflip=0.0", "data.augment.color_jitter=0.0"]


def plain_and_cached(recipe: Path, sets: list[str], cache: str) -> tuple[Path, Path]:
    """The same unaugmented run twice, without and with ``freeze.<cache> = true``: the two run directories."""
    from finetune.config import load_recipe
    from finetune.runs.run import run_recipe

    sets = [*sets, *NO_AUGMENT]
    plain = run_recipe(load_recipe(recipe, [*sets, "output.name=plain"]))
    cached = run_recipe(load_recipe(recipe, [*sets, f"freeze.{cache}=true", "output.name=cached"]))
    return plain, cached


def copy_data(tiny_coco: Path, tmp_path: Path) -> Path:
    """A copy of the tiny COCO data under ``tmp_path`` (for tests that change or break files)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_coco, root)
    return root


def recipe_at(tiny_recipe: Path, root: Path) -> Path:
    """``tiny_recipe`` pointed at another copy of the data."""
    text = tiny_recipe.read_text()
    lines = [f'root = "{root.as_posix()}"' if ln.startswith("root = ") else ln for ln in text.splitlines()]
    path = tiny_recipe.with_name("copy.toml")
    path.write_text("\n".join(lines) + "\n")
    return path


class StopAtStep(Hook):
    """Ctrl-C right after optimizer step ``step`` (before that step's own mid-epoch checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, loop: Loop) -> None:  # noqa: D102
        if loop.state.step == self.step:
            raise KeyboardInterrupt
