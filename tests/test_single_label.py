"""Single-label data: image folders and CIFAR-10 batches, cross-entropy, top-k accuracy, dataset statistics."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, top_k_accuracy_score

from finetune.assembly import build_from_run
from finetune.data.classfolders import read_cifar10_split, read_folder_split
from finetune.data.stats import compute_stats
from finetune.errors import UserError
from finetune.eval.metrics import confusion, summarize_single, topk_accuracy
from finetune.eval.probabilities import Scaling
from finetune.rundir.directory import RunDir
from finetune.runs.predict import predict_run, predictions

from .conftest import assert_user_error, run_cli
from .helpers import write_fake_cifar10

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_folder_split(folder_data: Path) -> None:
    train = read_folder_split(folder_data, "train")
    assert train.classes.names == ("blue", "green", "red") and len(train.image_paths) == 36
    assert train.targets.sum(1).tolist() == [1.0] * 36 and train.targets[0].argmax() == 0
    val = read_folder_split(folder_data, "val", train.classes)
    assert len(val.image_paths) == 12
    with pytest.raises(UserError, match="split folder not found"):
        read_folder_split(folder_data, "nope")


def test_cifar10_reads_the_real_batch_format(tmp_path: Path) -> None:
    root = write_fake_cifar10(tmp_path / "cifar-10-batches-py", n_per_batch=7)
    train = read_cifar10_split(root, "train")
    test = read_cifar10_split(root, "test", train.classes)
    assert train.image_paths.shape == (35, 32, 32, 3) and test.image_paths.shape == (7, 32, 32, 3)
    with (root / "data_batch_1").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = raw[b"data"][0]  # channel-major: 1024 red, 1024 green, 1024 blue values, row by row
    assert np.array_equal(train.image_paths[0][..., 0].ravel(), first[:1024])
    assert np.array_equal(train.image_paths[0][..., 2].ravel(), first[2048:])
    assert train.targets[0].argmax() == raw[b"labels"][0] and train.classes.names[1] == "automobile"


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    root = write_fake_cifar10(tmp_path / "c", n_per_batch=2)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(UserError, match="not a CIFAR-10 python batch .*refusing builtins.print"):
        read_cifar10_split(root, "test")


@pytest.mark.parametrize("seed", range(3))
def test_single_label_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(7), 200)
    y = rng.integers(0, 7, 200)
    targets = np.eye(7)[y]
    m = summarize_single(targets, probs)
    assert m["top1"] == pytest.approx(top_k_accuracy_score(y, probs, k=1, labels=range(7)))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, probs, k=5, labels=range(7)))
    assert m["mean_recall"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    assert np.array_equal(confusion(y, probs.argmax(1), 7), confusion_matrix(y, probs.argmax(1), labels=range(7)))
    assert topk_accuracy(y, probs, 7) == 1.0


def test_dataset_stats_equal_numpy(folder_data: Path) -> None:
    split = read_folder_split(folder_data, "train")
    stats = compute_stats(split, 24, multi_label=False)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in split.image_paths]) / 255.0
    assert np.allclose(stats["mean"], pixels.reshape(-1, 3).mean(0), atol=1e-6)
    assert np.allclose(stats["std"], pixels.reshape(-1, 3).std(0), atol=1e-6)
    assert stats["label_counts"] == {"blue": 12, "green": 12, "red": 12}


@pytest.mark.slow
def test_folder_dataset_trains_through_the_cli(folder_data: Path, tmp_path: Path) -> None:
    env = {"FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    sets = [
        f'data.root="{folder_data.as_posix()}"',
        'data.test="test"',
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "train.epochs=1",
        "optim.warmup_epochs=0",
        'model.name="mobilenetv2_reduced"',
        f'output.dir="{(tmp_path / "runs").as_posix()}"',
        'train.precision="fp32"',
    ]
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("data", "stats", str(RECIPES / "imagenette_standard.toml"), *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["label_counts"] == {"blue": 12, "green": 12, "red": 12}
    proc = run_cli("run", str(RECIPES / "imagenette_standard.toml"), *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(cached)" in proc.stderr and "top-1" in proc.stderr  # the stats come from `data stats`' cache
    run_dir = tmp_path / "runs" / "imagenette_standard"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "single_label" and report["select"] == "top1"
    assert 0 <= report["splits"]["test"]["summary"]["top1"] <= 1 and report["splits"]["test"]["images"] == 12
    assert (
        np.array(report["splits"]["test"]["confusion"])[:, 2].sum() == 12
        and (run_dir / "confusion_matrix.png").is_file()
    )
    assert '"dataset"' not in (run_dir / "recipe.toml").read_text()  # the numbers used are recorded
    page = (run_dir / "report.html").read_text()  # the single-label report: confusions and confident mistakes
    assert "most confused pairs" in page and 'id="mistakes"' in page
    top1 = report["splits"]["test"]["summary"]["top1"]
    assert ("data:image/jpeg;base64," in page) == (top1 < 1)  # thumbnails of the mistakes, when there are any
    image = next((folder_data / "test" / "red").glob("*.png"))
    proc = run_cli("predict", str(run_dir), str(image), "--json", env=env)
    (result,) = json.loads(proc.stdout)
    assert len(result["labels"]) == 1 and abs(sum(result["probabilities"].values()) - 1) < 1e-3
    assert_user_error(run_cli("calibrate", str(run_dir), env=env), "single-label run", "reject option", "temperature")
    proc = run_cli("calibrate", str(run_dir), "--set", 'calibrate.probabilities="temperature"', env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a temperature alone (issue 35, item 18)
    assert json.loads((run_dir / "probabilities.json").read_text())["method"] == "temperature"
    reject_sets = ["--set", 'calibrate.objective="accuracy_at_least"', "--set", "calibrate.target=0.9"]
    reject_sets += ["--set", 'calibrate.probabilities="temperature"']
    proc = run_cli("calibrate", str(run_dir), *reject_sets, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reject = json.loads((run_dir / "reject.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    scaling = Scaling.from_json(json.loads((run_dir / "probabilities.json").read_text()))
    assert scaling.softmax and "ECE" in proc.stdout and report["probabilities"]["method"] == "temperature"
    raw = predictions(build_from_run(RunDir.open(run_dir), ["test"], scaled=False), ["test"])["test"].probs
    scaled, _ = predict_run(run_dir, ["test"])  # every consumer of the run gets the folded temperature
    # rows whose raw probabilities float32 still resolves (a one-epoch toy model puts some below 1e-38, where
    # recovering log p from the probability is clipped; the folded model has the logits)
    rows = raw.min(1) > 1e-30
    assert rows.any()
    np.testing.assert_allclose(scaled["test"].probs[rows], scaling.apply(raw[rows]), atol=1e-5)
    assert (scaled["test"].probs.argmax(1) == raw.argmax(1)).all()
    assert report["reject"]["threshold"] == reject["threshold"] and (run_dir / "coverage_accuracy.png").is_file()
    assert "reject option" in proc.stdout and "reject option" in (run_dir / "report.html").read_text()
    proc = run_cli("predict", str(run_dir), str(folder_data / "test"), "--json", env=env)
    results = json.loads(proc.stdout)
    assert len(results) == 12 and "reject.json" in results[0]["thresholds"]
    for r in results:  # "none of the above" exactly below the reject threshold
        assert (r["labels"] == []) == (max(r["probabilities"].values()) < reject["threshold"])


@pytest.mark.slow
def test_recipes_validate_on_tiny_generated_data(folder_data: Path, tmp_path: Path) -> None:
    cifar = write_fake_cifar10(tmp_path / "cifar-10-batches-py", n_per_batch=4)
    for recipe, root in (("cifar10_reduced.toml", cifar), ("imagenette_standard.toml", folder_data)):
        proc = run_cli("validate", str(RECIPES / recipe), "--set", f'data.root="{root.as_posix()}"')
        assert proc.returncode == 0, (recipe, proc.stderr)
        assert "valid" in proc.stdout and ("10 classes" in proc.stdout or "3 classes" in proc.stdout)


def test_task_rules_are_one_line_errors() -> None:
    from finetune.config import load_recipe

    with pytest.raises(UserError, match='loss.name: data.format = "folder" is single-label; use "ce"'):
        load_recipe(RECIPES / "imagenette_standard.toml", ['loss.name="bce"'])
    with pytest.raises(UserError, match='loss.name: "ce" is for single-label data'):
        load_recipe(RECIPES / "coco_multilabel_focal.toml", ['loss.name="ce"'])
    with pytest.raises(UserError, match='train.select: "top1" is for single-label data'):
        load_recipe(RECIPES / "coco_multilabel_focal.toml", ['train.select="top1"'])


def test_multi_label_stats_count_labels_and_pairs(tiny_coco: Path) -> None:
    from finetune.data.coco import read_coco_split

    split = read_coco_split(tiny_coco, "train", "annotations/instances_{split}.json", "{split}", True, 0.0)
    stats = compute_stats(split, 16)
    y = split.targets.astype(int)
    assert np.array_equal(np.array(stats["cooccurrence"]), y.T @ y)
    assert list(stats["label_counts"].values()) == y.sum(0).tolist()
    assert stats["labels_per_image"] == pytest.approx(y.sum(1).mean())
