"""Splits with nothing to learn from or to score: refused in one line, or reported honestly."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.runs.run import run_recipe

from .helpers import copy_data, recipe_at


def test_an_empty_train_split_is_refused(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    root = copy_data(tiny_coco, tmp_path)
    ann = root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    ann.write_text(json.dumps({**doc, "images": [], "annotations": []}))
    with pytest.raises(UserError, match="data.train: the 'train' split has no images"):
        run_recipe(load_recipe(recipe_at(tiny_recipe, root)))


def test_a_train_split_with_no_readable_image_stops(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    root = copy_data(tiny_coco, tmp_path)
    for path in (root / "train").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(UserError, match="epoch 1: not one training image could be read"):
        run_recipe(load_recipe(recipe_at(tiny_recipe, root)))  # was: a best.pt "trained" at loss 0.0000
    assert not (tmp_path / "runs" / "tiny" / "best.pt").exists()


# A val split without a positive: NaN mAP must still leave a best.pt and a report.
@pytest.mark.slow
def test_val_without_positives_still_selects_and_reports(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    root = copy_data(tiny_coco, tmp_path)
    ann = root / "annotations" / "instances_val.json"
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    out = StringIO()
    run_dir = run_recipe(load_recipe(recipe_at(tiny_recipe, root), ["train.epochs=2"]), console=Console(file=out))
    assert "no image of the val split has a label" in out.getvalue()
    assert torch.load(run_dir / "best.pt", weights_only=True)["train_state"]["best_epoch"] == 2
    assert (run_dir / "report.json").is_file()
