"""Export (ONNX, TorchScript) with model.json, batch prediction, the Predictor API and CSV data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from finetune import Predictor
from finetune.assembly import build_run
from finetune.config import load_recipe
from finetune.deploy.export import export_run
from finetune.errors import UserError
from finetune.runs.run import run_recipe

from .conftest import COCO_TINY, TINY_RECIPE, assert_user_error, run_cli

REAL = pytest.mark.skipif(not COCO_TINY.is_dir(), reason="../shared/data/coco-tiny not present")

COCO_TINY_SETS = [
    f'data.root="{COCO_TINY.as_posix()}"',
    'data.train="train2017"',
    'data.val="val2017"',
    'data.test=""',
    "data.image_size=64",
    "data.batch_size=16",
]


def _train(recipe: Path, sets: list[str], name: str) -> Path:
    return run_recipe(load_recipe(recipe, [*sets, f"output.name={name}"]))


@pytest.fixture(scope="module", params=["generated", pytest.param("coco-tiny", marks=REAL)])
def exported(
    request: pytest.FixtureRequest, tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Path]]:
    """A one-epoch run (generated shapes, or real COCO images), exported to both formats; and 32 of its images.

    Module-scoped: both tests below read the same run (neither changes it).
    """
    folder = tmp_path_factory.mktemp(f"exported-{request.param}")
    tiny_recipe = folder / "tiny.toml"
    tiny_recipe.write_text(TINY_RECIPE.format(root=tiny_coco.as_posix(), runs=(folder / "runs").as_posix()))
    if request.param == "generated":
        run_dir = _train(tiny_recipe, ['train.tta="hflip"'], "gen")  # flip TTA travels into every backend
        images = [p for split in ("test", "train") for p in sorted((tiny_coco / split).iterdir())]
    else:
        run_dir = _train(tiny_recipe, COCO_TINY_SETS, "real")
        images = sorted((COCO_TINY / "train2017").iterdir())
    # Not the val images: the thresholds were fitted on them, and a fitted threshold is one of their probabilities,
    # which a 1e-7 difference between runtimes would put on either side of it.
    export_run(run_dir, "onnx")
    export_run(run_dir, "torchscript")
    return run_dir, images[:32]


@pytest.mark.slow
def test_exports_match_the_run(exported: tuple[Path, list[Path]]) -> None:
    run_dir, images = exported
    onnx_file, ts_file = run_dir / "export" / "model.onnx", run_dir / "export" / "model.pt"
    predictors = [Predictor.from_run(run_dir), Predictor.from_onnx(onnx_file), Predictor.from_torchscript(ts_file)]
    results = [p.predict(images) for p in predictors]
    probs = [np.array([list(r.probabilities.values()) for r in res]) for res in results]
    assert probs[0].shape == (32, len(predictors[0].classes))
    for other, res in zip(probs[1:], results[1:]):
        np.testing.assert_allclose(other, probs[0], atol=1e-4, rtol=0)
        assert [sorted(r.labels) for r in res] == [sorted(r.labels) for r in results[0]]  # order: near-ties may swap
    # The thresholds travel with the model: read back from the ONNX metadata, equal to the run's thresholds.json.
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_file)).metadata_props}
    fitted = [c["threshold"] for c in json.loads((run_dir / "thresholds.json").read_text())["classes"]]
    assert meta["thresholds"] == pytest.approx(fitted) and meta["classes"] == predictors[0].classes
    assert json.loads((run_dir / "export" / "model.json").read_text())["thresholds"] == meta["thresholds"]
    tta = "hflip" if run_dir.name == "gen" else "none"  # the fixture's generated run trains with flip TTA
    assert meta["tta"] == tta == tomllib.loads((run_dir / "recipe.toml").read_text())["train"]["tta"]
    if tta == "hflip":  # averaged with its mirror, an image and its mirror score the same in every backend
        mirrored = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))[:, ::-1]) for p in images[:4]]
        for p, res in zip(predictors, results):
            flipped = np.array([list(r.probabilities.values()) for r in p.predict(mirrored)])
            original = np.array([list(r.probabilities.values()) for r in res[:4]])
            np.testing.assert_allclose(flipped, original, atol=1e-5, rtol=0)
    # The run's own labels (thresholds.json applied by `eval`'s rule) agree with the predictor's.
    thr = np.array(fitted)
    assert [r.labels for r in results[0]] == [
        [predictors[0].classes[i] for i in np.argsort(-p, kind="stable") if p[i] >= thr[i]] for p in probs[0]
    ]


RUNTIME_ONLY = """
import json, sys
import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
classes, thresholds = json.loads(meta["classes"]), np.array(json.loads(meta["thresholds"]))
out = []
for path in sys.argv[2:]:
    image = np.asarray(Image.open(path).convert("RGB"))[None]  # uint8 NHWC, any size: resized inside the graph
    (probs,) = session.run(None, {"image": image})[0]
    out.append([classes[i] for i in np.argsort(-probs, kind="stable") if probs[i] >= thresholds[i]])
assert "torch" not in sys.modules and "finetune" not in sys.modules
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_onnx_file_runs_without_torch(exported: tuple[Path, list[Path]]) -> None:
    run_dir, images = exported
    proc = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY, str(run_dir / "export" / "model.onnx"), *map(str, images)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictor = Predictor.from_run(run_dir)
    raw = [np.asarray(Image.open(p).convert("RGB"))[None] for p in images]  # the same full-size images
    expected = [
        [predictor.classes[i] for i in np.argsort(-p, kind="stable") if p[i] >= predictor.thresholds[i]]
        for p in (predictor.probabilities(x)[0] for x in raw)
    ]
    assert [sorted(x) for x in json.loads(proc.stdout)] == [sorted(x) for x in expected]


@pytest.mark.slow
def test_predict_command(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    run_dir = _train(tiny_recipe, [], "cmd")
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for p in sorted((tiny_coco / "test").iterdir())[:5]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    glob = str(tiny_coco / "val" / "*.jpg")
    out_csv = tmp_path / "pred.csv"
    proc = run_cli("predict", str(run_dir), str(tmp_path / "imgs"), glob, "--csv", str(out_csv), "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "broken.jpg" in proc.stderr and "17 images predicted, 1 skipped" in proc.stderr
    rows = list(csv.DictReader(out_csv.open()))
    classes = [c["name"] for c in json.loads((run_dir / "classes.json").read_text())]
    assert len(rows) == 17 and list(rows[0]) == ["path", "labels", *classes]
    direct = Predictor.from_run(run_dir).predict([Path(rows[0]["path"])])[0]
    assert rows[0]["labels"] == "|".join(direct.labels)
    assert float(rows[0][classes[0]]) == pytest.approx(direct.probabilities[classes[0]], abs=1e-6)
    proc = run_cli("predict", str(run_dir), glob, "--json", "--threshold", "0.0", "--device", "cpu")
    result = json.loads(proc.stdout)
    assert len(result) == 12 and all(len(r["labels"]) == len(classes) for r in result)
    assert_user_error(run_cli("predict", str(tmp_path / "nothing"), glob), "no such run directory or exported model")


def _csv_from_coco(root: Path, splits: dict[str, str], out: Path, columns: bool = False) -> list[str]:
    """One CSV for every split, written from COCO annotations; returns the class names in COCO order."""
    rows, names = [], []
    for split, folder in splits.items():
        doc = json.loads((root / "annotations" / f"instances_{folder}.json").read_text())
        cats = {c["id"]: c["name"] for c in doc["categories"]}
        names = [cats[k] for k in sorted(cats)]
        labels: dict[int, set[str]] = {im["id"]: set() for im in doc["images"]}
        for a in doc["annotations"]:
            labels[a["image_id"]].add(cats[a["category_id"]])
        for im in sorted(doc["images"], key=lambda im: im["id"]):
            rows.append((f"{folder}/{im['file_name']}", labels[im["id"]], split))
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *(names if columns else ["labels"]), "split"])
        for path, found, split in rows:
            cells = [int(n in found) for n in names] if columns else ["|".join(sorted(found))]
            w.writerow([path, *cells, split])
    return names


@pytest.mark.parametrize("columns", [False, True])
def test_csv_targets_equal_the_coco_loader(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path, columns: bool) -> None:
    names = _csv_from_coco(tiny_coco, {"train": "train", "val": "val"}, tmp_path / "labels.csv", columns)
    sets = [f'data.csv="{(tmp_path / "labels.csv").as_posix()}"', 'data.format="csv"', 'data.test=""']
    coco = build_run(load_recipe(tiny_recipe, ['data.test=""'])).splits
    mine = build_run(load_recipe(tiny_recipe, [*sets, f"data.classes={json.dumps(names)}"])).splits
    for role in ("train", "val"):
        assert [p.resolve() for p in mine[role].image_paths] == [p.resolve() for p in coco[role].image_paths]
        np.testing.assert_array_equal(mine[role].targets, coco[role].targets)
    assert mine["train"].classes.names == coco["train"].classes.names


@pytest.mark.slow
@REAL
def test_csv_from_coco_tiny_trains_through_the_cli(tiny_recipe: Path, tmp_path: Path) -> None:
    names = _csv_from_coco(COCO_TINY, {"train": "train2017", "val": "val2017"}, tmp_path / "coco.csv")
    sets = [*COCO_TINY_SETS[:1], 'data.format="csv"', 'data.test=""', f'data.csv="{tmp_path / "coco.csv"}"']
    sets += ["data.image_size=64", f"data.classes={json.dumps(names)}", "output.name=csvrun"]
    coco = build_run(load_recipe(tiny_recipe, COCO_TINY_SETS)).splits
    mine = build_run(load_recipe(tiny_recipe, sets)).splits
    np.testing.assert_array_equal(mine["val"].targets, coco["val"].targets)
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("run", str(tiny_recipe), *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "csvrun" / "report.json").read_text())["splits"]["val"]["images"] == 80


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("path,labels,split\ntrain/a.jpg,circle|unicorn,train\n", "labels.csv:2: undeclared label 'unicorn'"),
        ("path,labels,split\ntrain/none.jpg,circle,train\n", "none.jpg: image file not found"),
        ("path,labels,split\n,,\n", "labels.csv:2: empty row"),
        ("path,labels,split\ntrain/a.jpg,circle,train\ntrain/a.jpg,square,train\n", "duplicate path 'train/a.jpg'"),
        ("path,circle,split\ntrain/a.jpg,2,train\n", "column 'circle' holds '2'"),
        ("image,labels\ntrain/a.jpg,circle\n", "no 'path' column"),
    ],
)
def test_bad_csv_is_one_line(tiny_recipe: Path, tmp_path: Path, body: str, needle: str) -> None:
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "a.jpg")
    (root / "labels.csv").write_text(body)
    sets = [f'data.root="{root.as_posix()}"', 'data.format="csv"', 'data.classes=["circle", "square"]']
    with pytest.raises(UserError, match=needle.replace("|", r"\|").replace(".", r"\.")):
        _ = build_run(load_recipe(tiny_recipe, sets), roles=("train",)).splits
    if needle.startswith("labels.csv:2: undeclared"):  # and through the CLI: exit 2, one line
        assert_user_error(run_cli("validate", str(tiny_recipe), *[a for s in sets for a in ("--set", s)]), "unicorn")


@pytest.mark.slow
def test_the_csv_recipe_validates(tiny_coco: Path, tmp_path: Path) -> None:
    _csv_from_coco(tiny_coco, {"train": "train", "val": "val", "test": "test"}, tmp_path / "labels.csv")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "my_images_csv.toml"
    sets = [f'data.root="{tiny_coco.as_posix()}"', f'data.csv="{(tmp_path / "labels.csv").as_posix()}"']
    sets += ["model.pretrained=false", "data.num_workers=0"]
    proc = run_cli("validate", str(recipe), "--check-images", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ": valid" in proc.stdout and "24 images" in proc.stdout and "circle, crescent" in proc.stdout  # sorted


def test_predict_path_errors_are_one_line(
    tiny_recipe: Path, tiny_coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune.cli import app as cli

    run_dir = _train(tiny_recipe, [], "paths")
    image = str(next((tiny_coco / "test").glob("*.jpg")))
    for argv, needle in (
        (["predict", str(run_dir), str(tmp_path / "none" / "*.jpg")], "nothing to predict"),
        (["predict", str(run_dir), image, "--csv", str(tmp_path)], "is a folder, not a file"),
    ):
        monkeypatch.setattr(sys, "argv", ["finetune", *argv])
        with pytest.raises(SystemExit) as info:
            cli.main()
        err = capsys.readouterr().err
        assert info.value.code == 2 and needle in err and "Traceback" not in err, err


def _info(**changes: object) -> dict:
    info = {"task": "multilabel", "classes": ["a", "b"], "input": {"size": [32, 32]}, "thresholds": [0.5, 0.5]}
    return {**info, **changes}


@pytest.mark.parametrize(
    ("info", "needle"),
    [
        (_info(input={"size": [10**6, 10**6]}), "not a size from 1 to 4096 pixels"),
        (_info(classes=["a", "a"]), "'classes' names 'a' twice"),
    ],
)
def test_tampered_export_metadata_is_refused(info: dict, needle: str, tmp_path: Path) -> None:
    from finetune.deploy.predictor import checked_info

    with pytest.raises(UserError, match=needle):
        checked_info(info, tmp_path / "model.json")


@pytest.mark.parametrize("bad", [None, 3, b"bytes", {"a": 1}])
def test_a_predictor_given_no_image_says_so(bad: object) -> None:
    predictor = Predictor(lambda x: np.full((len(x), 2), 0.5, np.float32), _info())
    with pytest.raises(UserError, match="expected image paths, HxWx3 uint8 arrays or PIL images"):
        predictor(bad)
    assert predictor(np.zeros((8, 8, 3), np.uint8)).probabilities == {"a": 0.5, "b": 0.5}
