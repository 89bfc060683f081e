"""Augmentation: colour jitter on the device against albumentations' ColorJitter and its wiring; vflip and rot90."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from finetune.assembly import build_run
from finetune.config import load_recipe
from finetune.data.dataset import batch_images, collate
from finetune.data.jitter import apply_jitter, sample_jitter
from finetune.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _albumentations(img: np.ndarray, row: np.ndarray) -> np.ndarray:
    """The reference: albumentations' own ColorJitter.apply (float path) with the row's factors and order."""
    if row[0] == 0:
        return img
    b, c, s, h = (float(v) for v in row[1:5])
    order = [int(v) for v in row[5:]]
    return A.ColorJitter().apply(img.copy(), brightness=b, contrast=c, saturation=s, hue=h, order=order)


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


def test_apply_jitter_equals_albumentations_per_image_order_and_factors() -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((19, 23, 3)).astype(np.float32) for _ in range(24)]
    rows = np.stack([sample_jitter(np.random.default_rng(i), 0.4, 0.1, p=0.8) for i in range(24)])
    assert 0 < rows[:, 0].sum() < 24 and len({tuple(r[5:]) for r in rows}) > 4  # some skipped, orders differ
    out = apply_jitter(_to_tensor(images), torch.from_numpy(rows)).numpy().transpose(0, 2, 3, 1)
    for img, row, got in zip(images, rows, out):
        np.testing.assert_allclose(got, _albumentations(img, row), atol=2e-5)


def test_apply_jitter_agrees_with_the_uint8_path_to_rounding() -> None:
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    row = np.array([1, 1.2, 0.8, 1.3, 0.05, 3, 0, 2, 1], np.float32)
    ours = apply_jitter(_to_tensor([smooth]).float() / 255, torch.from_numpy(row[None]))[0].numpy().transpose(1, 2, 0)
    ref = _albumentations(smooth, row).astype(np.float32)
    assert np.abs(ours * 255 - ref).mean() < 1.5  # albumentations rounds after every step and quantises hue to 2 deg


def test_sample_jitter_ranges_and_rate() -> None:
    rows = np.stack([sample_jitter(np.random.default_rng(i), 0.3, 0.075, p=0.8) for i in range(4000)])
    assert abs(rows[:, 0].mean() - 0.8) < 0.03
    assert rows[:, 1:4].min() >= 0.7 and rows[:, 1:4].max() <= 1.3 and np.abs(rows[:, 4]).max() <= 0.075
    assert all(sorted(r[5:]) == [0, 1, 2, 3] for r in rows[:50])


def test_device_jitter_through_dataset_and_batch_images(tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe, [f"data.augment.color_jitter={0.5}", 'data.augment.jitter_on="device"'])
    ds = (
        build_run(recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": 3})}))
        .loader("train", augment=True)
        .dataset
    )
    assert ds.device_jitter == 0.5 and not any(isinstance(t, A.ColorJitter) for t in ds.transform.transforms)
    batch = collate([ds[i] for i in range(8)])
    assert batch["image"].dtype == torch.uint8 and batch["jitter"].shape == (8, 9)
    x = batch_images(batch, torch.device("cpu"))
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    for i in range(8):
        img = batch["image"][i].numpy().transpose(1, 2, 0).astype(np.float32) / 255
        ref = (_albumentations(img, batch["jitter"][i].numpy()) - mean) / std
        np.testing.assert_allclose(x[i].numpy().transpose(1, 2, 0), ref, atol=1e-4)
    again = collate([ds[i] for i in range(8)])
    assert torch.equal(again["jitter"], batch["jitter"])  # seeded by (seed, epoch, index): a resume draws the same
    ds.set_epoch(1)
    assert not torch.equal(collate([ds[i] for i in range(8)])["jitter"], batch["jitter"])


@pytest.mark.parametrize("where", ["workers", "auto"])
def test_jitter_stays_in_the_workers_on_a_cpu_machine(tiny_recipe: Path, where: str) -> None:
    if where == "auto" and torch.cuda.is_available():
        pytest.skip("auto puts the jitter on the device when CUDA is present")
    recipe = load_recipe(tiny_recipe, [f'data.augment.jitter_on="{where}"'])
    ds = build_run(recipe).loader("train", augment=True).dataset
    assert ds.device_jitter == 0 and any(isinstance(t, A.ColorJitter) for t in ds.transform.transforms)
    assert "jitter" not in collate([ds[0], ds[1]])


def test_vflip_and_rot90_give_the_square_symmetries() -> None:
    from finetune.data.transforms import train_transform

    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    flip = train_transform(8, crop="resize", hflip=0.0, vflip=1.0, normalize=False)
    np.testing.assert_array_equal(flip(image=img)["image"].numpy().transpose(1, 2, 0), img[::-1])
    rot = train_transform(8, crop="resize", hflip=0.0, rot90=True, normalize=False)
    seen = set()
    for seed in range(40):
        rot.set_random_seed(seed)
        out = rot(image=img)["image"].numpy().transpose(1, 2, 0)
        ks = [k for k in range(4) if np.array_equal(out, np.rot90(img, k))]
        assert len(ks) == 1, seed
        seen.add(ks[0])
    assert seen == {0, 1, 2, 3}


def test_a_run_records_where_auto_put_the_jitter(tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe)  # color_jitter = 0.1, jitter_on = "auto"
    resolved = build_run(recipe).recipe
    expected = "device" if torch.cuda.is_available() else "workers"  # train.device = "auto"
    assert recipe.data.augment.jitter_on == "auto" and resolved.data.augment.jitter_on == expected
    on_cpu = load_recipe(tiny_recipe, ['train.device="cpu"'])
    assert build_run(on_cpu).recipe.data.augment.jitter_on == "workers"
    explicit = load_recipe(tiny_recipe, ['data.augment.jitter_on="device"'])
    assert build_run(explicit).recipe.data.augment.jitter_on == "device"
