"""Input-pipeline and training throughput: the loader alone (img/s per core) and the trainer against a bare loop.

Loader: the training pipeline of ``data.image_size`` on coco-small's real COCO JPEGs (RandomResizedCrop, flip,
colour jitter 0.1) as it was before (PIL decode, normalised to float32 in the worker) and as it is now (libjpeg-turbo
decode, uint8 out of the worker, normalised where the batch lands), in one run, interleaved, medians of
``--repeats``: with ``num_workers = 0`` (one core) and 2 workers, and the worker's share alone (what feeds a GPU),
with the colour jitter in the worker (a CPU run) and on the device (a CUDA run, ``jitter_on = "auto"``). Every
file is read once before timing (page cache).

Training: images/s of ``finetune``'s ``train_one_epoch`` against a bare PyTorch loop (same model, batches, optimizer)
on preloaded batches, in one run; with a GPU, also on it in fp16. (No comparison with timm's ``benchmark.py --bench
train``: that script is not in timm's wheel, and this project has had no GPU to run either on.)

    python benchmarks/throughput.py [--size 224] [--images 160] [--model mobilenetv2_100] [--batch 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune.data.coco import read_coco_split
from finetune.data.dataset import ImageDataset, batch_images, collate
from finetune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform
from finetune.models import create_model
from finetune.train.fit import train_one_epoch
from finetune.train.loop import FitSettings, Loop

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-small"


def _pil_rgb(path: Path) -> np.ndarray:
    """The decode as it was: PIL, then ``np.asarray`` (what ``read_rgb`` does for a file that is not a JPEG)."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


class _Before(ImageDataset):
    """The pipeline as it was: PIL decode, Normalize to float32 and ToTensor in the worker."""

    def __getitem__(self, index: int) -> dict:
        image = _pil_rgb(self.image_paths[index])
        self.transform.set_random_seed(hash((self.seed, self.epoch, index)) % 2**32)
        return {
            "image": self.transform(image=image)["image"],
            "target": torch.from_numpy(self.targets[index]),
            "index": index,
        }


def loader_rate(dataset: torch.utils.data.Dataset, workers: int, batch: int, device: torch.device) -> float:
    """Images/s through a DataLoader, to normalised float batches on ``device``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate)
    next(iter(loader))  # warm-up: page cache, worker start
    start, n = time.perf_counter(), 0
    for b in loader:
        n += len(batch_images(b, device))
    return n / (time.perf_counter() - start)


def worker_rate(dataset: torch.utils.data.Dataset) -> float:
    """Images/s of the worker's share alone (decode + augment, no normalisation on the host)."""
    dataset[0]
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset) / (time.perf_counter() - start)


def train_rates(model_name: str, size: int, batch: int, steps: int, device: torch.device, precision: str) -> tuple:
    """Images/s of train_one_epoch and of a bare loop on the same preloaded batches."""
    torch.manual_seed(0)
    model = create_model(model_name, 80)[0].to(device).to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    norm = (IMAGENET_MEAN, IMAGENET_STD)
    batches = [{"image": x, "norm": norm, "target": torch.rand(batch, 80).round(), "errors": []}] * steps
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def bare() -> float:
        start = time.perf_counter()
        for b in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(batch_images(b, device, True)).float(), b["target"].to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(batches) * batch / (time.perf_counter() - start)

    settings = FitSettings(device=device, precision=precision, channels_last=True, epochs=1)
    loop = Loop(
        model=model,
        loss_fn=loss_fn,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        train_loader=batches,
        val_loader=batches,
        settings=settings,
        run_dir=Path("."),
    )
    bare()  # warm-up
    rates = {"bare": [], "trainer": []}
    for _ in range(3):  # interleaved, so drift hits both
        rates["bare"].append(bare())
        start = time.perf_counter()
        train_one_epoch(loop)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates["trainer"].append(len(batches) * batch / (time.perf_counter() - start))
    return float(np.median(rates["trainer"])), float(np.median(rates["bare"]))


def main() -> None:
    """Print the loader rates (before/after, per core) and the trainer/bare-loop ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: the loader benchmark needs real COCO JPEGs")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    split = read_coco_split(SHARED, "train2017")
    paths, targets = split.image_paths[: args.images], split.targets[: args.images]
    cpu = torch.device("cpu")
    for path in paths:  # warm the page cache: a cold first pass would be charged to whichever runs first
        path.read_bytes()
    before = _Before(paths, targets, split.classes, train_transform(args.size, color_jitter=0.1))
    norm = (IMAGENET_MEAN, IMAGENET_STD)
    after = ImageDataset(
        paths, targets, split.classes, train_transform(args.size, color_jitter=0.1, normalize=False), norm=norm
    )
    gpu_tf = train_transform(args.size, color_jitter=0.1, normalize=False, jitter_in_workers=False)
    on_device = ImageDataset(paths, targets, split.classes, gpu_tf, norm=norm, device_jitter=0.1)
    runs = {
        "b0": lambda: loader_rate(before, 0, args.batch, cpu),
        "a0": lambda: loader_rate(after, 0, args.batch, cpu),
        "d0": lambda: loader_rate(on_device, 0, args.batch, cpu),
        "b2": lambda: loader_rate(before, 2, args.batch, cpu),
        "a2": lambda: loader_rate(after, 2, args.batch, cpu),
        "wb": lambda: worker_rate(before),
        "wa": lambda: worker_rate(after),
        "wd": lambda: worker_rate(on_device),
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so the machine's drift hits before and after alike
        for key, measure in runs.items():
            rates[key].append(measure())
    r = {k: float(np.median(v)) for k, v in rates.items()}

    def line(label: str, before_key: str, now_key: str) -> None:
        print(f"  {label}: before {r[before_key]:.0f}, now {r[now_key]:.0f} ({r[now_key] / r[before_key]:.2f}x)")

    print(
        f"loader, {args.size} px, {len(paths)} coco-small JPEGs, RandomResizedCrop + flip + jitter 0.1, img/s, median "
        f"of {args.repeats}:"
    )
    print(" from files to normalised float batches on this CPU (jitter in the workers, as a CPU run does):")
    line("1 core (num_workers = 0)", "b0", "a0")
    line("2 workers on this 2-core machine", "b2", "a2")
    line("1 core, jitter applied batched in the main process instead", "b0", "d0")
    print(" the worker's share alone (decode + augment per core: what feeds a GPU, which normalises):")
    line("jitter in the worker", "wb", "wa")
    line("jitter on the device (what a CUDA run does, jitter_on = auto)", "wb", "wd")
    if args.steps == 0:
        return
    for device, precision in [(cpu, "fp32")] + ([(torch.device("cuda"), "fp16")] if torch.cuda.is_available() else []):
        trainer, bare = train_rates(args.model, args.size, args.batch, args.steps, device, precision)
        print(
            f"train {args.model} at {args.size} px, batch {args.batch}, {device.type} {precision}: trainer "
            f"{trainer:.1f} img/s, bare loop {bare:.1f} img/s, ratio {trainer / bare:.3f}"
        )


if __name__ == "__main__":
    main()
