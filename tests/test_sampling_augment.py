"""Class-balanced (repeat-factor) sampling, RandAugment, random erasing and CutMix (area-weighted for multi-label)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.config import load_recipe
from finetune.data.samplers import EpochSampler, ShardSampler, balanced_length, balanced_order, repeat_factors
from finetune.data.transforms import train_transform
from finetune.errors import UserError
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe
from finetune.train.mixing import area_targets, cut_box, cutmix_batch
from tests.conftest import run_cli
from tests.helpers import StopAtStep


def _targets(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = (rng.random((40, 5)) < np.array([0.6, 0.3, 0.08, 0.03, 0.0])).astype(np.float32)
    t[rng.random(t.shape) < 0.05] = np.nan  # unknown labels are not positives
    return t


def test_repeat_factors_equal_lvis_formula() -> None:
    t, thr = _targets(), 0.1
    r = repeat_factors(t, thr)
    for i in range(len(t)):  # r(c) = max(1, sqrt(t / f(c))), f(c) = images with c / images; r(i) = max over its c
        want = 1.0
        for c in range(t.shape[1]):
            f = sum(1 for row in t if row[c] == 1) / len(t)
            if t[i, c] == 1:
                want = max(want, max(1.0, math.sqrt(thr / f)))
        assert r[i] == pytest.approx(want, rel=1e-12)
    assert r.max() > 1.3 and (r == 1).sum() > 10
    counts = np.zeros(len(t))
    length = balanced_length(r)
    assert length == math.ceil(r.sum())
    for epoch in range(3000):
        order = balanced_order(r, 7, epoch)
        assert len(order) == length and set(order) == set(range(len(t)))  # every image at least once
        counts += np.bincount(order, minlength=len(t))
    np.testing.assert_allclose(counts / 3000, r * length / r.sum(), atol=0.04)  # r_i draws per epoch, to scale
    assert balanced_order(r, 7, 3) == balanced_order(r, 7, 3) != balanced_order(r, 7, 4)


def test_balanced_ddp_ranks_together_take_one_process_steps() -> None:
    r, batch, world = repeat_factors(_targets(1), 0.2), 8, 2
    single = EpochSampler(40, 3, r)
    shards = [ShardSampler(40, 3, k, world, batch=batch, factors=r) for k in range(world)]
    for epoch in range(4):
        for s in (single, *shards):
            s.set_epoch(epoch)
        order = list(single)
        steps = len(order) // batch  # drop_last
        per_rank = [list(s) for s in shards]
        assert all(len(p) == steps * batch // world for p in per_rank)
        for k in range(steps):
            together = sorted(i for p in per_rank for i in p[k * batch // world : (k + 1) * batch // world])
            assert together == sorted(order[k * batch : (k + 1) * batch]), (epoch, k)


def test_balanced_loaders_of_two_ranks_batch_like_one_process(tiny_recipe: Path) -> None:
    from finetune.assembly.data import build_dataset, build_loader, build_split
    from finetune.distributed import Dist

    cfg = load_recipe(tiny_recipe, ['data.sampler="balanced"', "data.repeat_threshold=0.5"]).data
    split = build_split(cfg, "train")
    dataset = build_dataset(cfg, split, train=True, seed=0)
    one = build_loader(cfg, dataset, True, seed=4)
    ranks = [build_loader(cfg, dataset, True, seed=4, d=Dist(rank=k, world=2)) for k in range(2)]
    for epoch in (0, 1):
        for loader in (one, *ranks):
            loader.sampler.set_epoch(epoch)
        batches = [list(loader.batch_sampler) for loader in (one, *ranks)]
        assert len(batches[0]) == len(batches[1]) == len(batches[2]) == len(one) > 24 // 8
        for step, indices in enumerate(batches[0]):
            assert sorted(batches[1][step] + batches[2][step]) == sorted(indices), (epoch, step)


def test_balanced_run_reports_its_epoch_and_resumes_bitwise_with_randaugment_and_cutmix(tiny_recipe: Path) -> None:
    sets = [
        "train.epochs=2",
        "train.checkpoint_every=1",
        'data.sampler="balanced"',
        "data.repeat_threshold=0.5",
        'data.augment.randaugment="rand-m9-n2"',
        "data.augment.random_erasing=0.5",
        "data.augment.cutmix=1.0",
        'data.augment.cutmix_labels="area"',
    ]
    straight = run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=straight"]))
    report = json.loads((straight / "report.json").read_text())
    assert report["sampler"]["train_images"] == 24 and report["sampler"]["epoch_size"] > 24
    with pytest.raises(UserError, match="interrupted"):
        run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=cut"]), hooks=[StopAtStep(5)])
    cut = tiny_recipe.parent / "runs" / "cut"
    assert RunDir(cut).resume_point().parent.name == "steps"  # mid-epoch: the sampler skips the batches done
    done = run_cli("run", "--resume", str(cut))
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (straight, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = run_recipe(load_recipe(tiny_recipe, ["train.epochs=2", "output.name=plain"]))
    steps = [
        [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (plain, straight)
    ]
    assert steps == [[3, 6], [5, 10]]  # 24 images: 3 batches of 8 per epoch; 41 balanced draws: 5


def test_area_cutmix_labels_equal_a_pixel_count() -> None:
    size = 32
    boxes = [  # class, x0, y0, x1, y1 (pixels); a box of no area: the crop cut that object away
        torch.tensor([[0, 2, 2, 12, 12], [1, 20, 20, 30, 28], [0, 14, 0, 18, 6], [3, 0, 0, 0, 0]], dtype=torch.float32),
        torch.tensor([[2, 0, 0, 32, 32]], dtype=torch.float32),
        torch.tensor([[1, 8, 8, 24, 24], [2, 5, 20, 9, 31]], dtype=torch.float32),
        torch.tensor([[1, 0, 16, 16, 32]], dtype=torch.float32),
    ]
    # image 0's class 2 and image 3's class 0 are positive with no box at all: they score the area their image keeps
    targets = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 0], [0, 1, float("nan"), 0], [1, 1, 0, 0]])
    cut = (6, 4, 22, 26)
    inside = np.zeros((size, size), dtype=bool)
    inside[cut[1] : cut[3], cut[0] : cut[2]] = True
    for batch in (4, 3):  # 3: the middle image is pasted onto itself and keeps its targets
        got = area_targets(targets[:batch], boxes[:batch], cut, (size, size))
        for i in range(batch):
            j = batch - 1 - i
            want = np.zeros(4)
            for b, t, outer in ((boxes[i], targets[i], True), (boxes[j], targets[j], False)):
                boxed = set()
                for c, x0, y0, x1, y1 in b.int().tolist():
                    boxed.add(c)
                    mask = np.zeros((size, size), dtype=bool)
                    mask[y0:y1, x0:x1] = True
                    seen = (mask & ~inside) if outer else (mask & inside)
                    want[c] = max(want[c], seen.sum() / mask.sum() if mask.any() else 0.0)
                for c in range(4):
                    if t[c] == 1 and c not in boxed:
                        want[c] = max(want[c], (~inside if outer else inside).mean())
            if i == j:
                want = np.nan_to_num(targets[i].numpy())
            for c in range(4):
                if torch.isnan(targets[i, c]) or torch.isnan(targets[j, c]):
                    assert torch.isnan(got[i, c])
                else:
                    assert got[i, c].item() == pytest.approx(want[c], abs=1e-6), (batch, i, c)


def test_repeats_of_an_image_in_a_balanced_epoch_are_augmented_apart(tiny_recipe: Path) -> None:
    from finetune.assembly.data import build_dataset, build_split
    from finetune.data.samplers import tag_repeats

    assert tag_repeats([2, 0, 2, 1, 2], 3) == [2, 0, 5, 1, 8]
    cfg = load_recipe(tiny_recipe, ['data.sampler="balanced"']).data
    dataset = build_dataset(cfg, build_split(cfg, "train"), train=True, seed=0)
    n = len(dataset)
    first, second = dataset[3], dataset[3 + n]
    assert first["index"] == second["index"] == 3
    assert torch.equal(first["target"], second["target"])
    assert not torch.equal(first["image"], second["image"])  # its own crop and flip
    assert torch.equal(dataset[3]["image"], first["image"])  # and each draw is seeded


def test_cutmix_pastes_the_reversed_batch_and_is_seeded() -> None:
    x = torch.arange(4 * 3 * 16 * 16, dtype=torch.float32).reshape(4, 3, 16, 16)
    y = torch.eye(4)
    mixed, soft = cutmix_batch(x, y, 1.0, (0, 1, 2))
    again, _ = cutmix_batch(x, y, 1.0, (0, 1, 2))
    assert torch.equal(mixed, again)
    rng = np.random.default_rng([0, 1, 2])  # cutmix_batch's draws: lam, then the box
    x0, y0, x1, y1 = cut_box(16, 16, float(rng.beta(1.0, 1.0)), rng)
    pasted = (y1 - y0) * (x1 - x0) / 256
    assert torch.equal(mixed[0, :, y0:y1, x0:x1], x[3, :, y0:y1, x0:x1])
    np.testing.assert_allclose(soft[0].numpy(), [1 - pasted, 0, 0, pasted], atol=1e-6)  # timm's correct_lam


def test_randaugment_and_erasing_are_seeded_by_the_pipeline() -> None:
    tf = train_transform(32, crop="resize", hflip=0.0, normalize=False, randaugment="rand-m9-n2", random_erasing=1.0)
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    state = (random.getstate(), np.random.get_state()[1].copy())
    outs = []
    for seed in (5, 5, 6):
        tf.set_random_seed(seed)
        outs.append(tf(image=image)["image"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()  # global RNGs untouched


def test_cutmix_rules_are_one_line(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match='cutmix_labels = "area"'):
        load_recipe(tiny_recipe, ["data.augment.cutmix=1.0"])
    with pytest.raises(UserError, match="needs object boxes"):
        load_recipe(tiny_recipe, ['data.format="csv"', "data.augment.cutmix=1.0", 'data.augment.cutmix_labels="area"'])
    with pytest.raises(UserError, match="either mixup or cutmix"):
        load_recipe(tiny_recipe, ["data.augment.cutmix=1.0", "data.augment.mixup=0.2"])
    with pytest.raises(UserError, match="randaugment"):
        load_recipe(tiny_recipe, ['data.augment.randaugment="m9"'])
