from pathlib import Path

import pytest

from finetune.config import Recipe, apply_overrides, load_recipe, parse_override, validate_recipe
from finetune.errors import UserError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.epochs=3", 3),
        ("optim.lr=3e-4", 3e-4),
        ("train.channels_last=true", True),
        ('optim.name="sgd"', "sgd"),
        ("optim.name=sgd", "sgd"),  # a bare word is a string
        ("data.augment.scale=[0.3, 1.0]", [0.3, 1.0]),
        ("train={epochs = 1}", {"epochs": 1}),
        ("output.name=my run", "my run"),
    ],
)
def test_override_values_are_toml(text: str, expected: object) -> None:
    assert parse_override(text)[1] == expected


def test_overrides_validate_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[train]\nepochs = 4\n")
    recipe = load_recipe(path, ["train.epochs=2", "optim.lr=3e-4", "data.augment.hflip=0"])
    assert (recipe.train.epochs, recipe.optim.lr, recipe.data.augment.hflip) == (2, 3e-4, 0.0)
    assert recipe.output.name == "r"  # run name defaults to the recipe's stem
    with pytest.raises(UserError, match=r"r\.toml: train\.epochs: .*valid integer.*'two'"):
        load_recipe(path, ["train.epochs=two"])
    with pytest.raises(UserError, match=r"train\.epoch: unknown key; expected one of: .*epochs"):
        load_recipe(path, ["train.epoch=2"])
    with pytest.raises(UserError, match="expected section.key=value"):
        load_recipe(path, ["train.epochs"])
    with pytest.raises(UserError, match="train.epochs is a value, not a section"):
        apply_overrides({"train": {"epochs": 1}}, ["train.epochs.x=1"])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"trian": {}},
            "trian: unknown key; expected one of: calibrate, data, freeze, log, loss, model, optim, output, quantize, "
            "train",
        ),
        ({"data": {"augment": {"flip": 0.5}}}, "data.augment.flip: unknown key"),
        ({"train": {"epochs": "10"}}, "train.epochs: Input should be a valid integer"),  # strict: no "10" -> 10
        ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
        ({"loss": {"name": "mse"}}, "loss.name: Input should be 'bce', 'focal', 'asl' or 'ce' (got 'mse')"),
        ({"train": {"precision": "fp8"}}, "train.precision: Input should be"),
        ({"loss": {"pos_weight": "often"}}, "loss.pos_weight: Input should be 'none' or 'auto'"),
        ({"data": {"augment": {"scale": [0.9, 0.2]}}}, "scale must be [low, high]"),
        ({"model": {"pretrained": True, "checkpoint": "w.pt"}}, "not both"),
        ({"data": {"annotations": "ann.json"}}, 'must contain "{split}"'),
    ],
)
def test_bad_recipes_are_one_line(raw: dict, message: str) -> None:
    with pytest.raises(UserError) as info:
        validate_recipe(raw, "r.toml")
    text = str(info.value)
    assert text.startswith("r.toml: ") and message in text and "\n" not in text


def test_defaults_validate() -> None:
    assert Recipe().train.epochs == 10


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(bad)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_opens_with_a_comment(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.model.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), "every recipe opens with a comment: what it does, how to run it"
    assert "finetune run" in path.read_text()


def test_there_are_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"quickstart.toml", "coco_multilabel_focal.toml"}
