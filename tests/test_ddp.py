"""DDP through torchrun: 2 processes with the gloo backend on this CPU (tests/ddp_worker.py is what they run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.assembly import build_from_run, build_run
from finetune.config import load_recipe
from finetune.data.coco import read_coco_split
from finetune.data.samplers import EpochSampler, ShardSampler, epoch_permutation
from finetune.eval.predict import predict_loader
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe

from .conftest import TINY_RECIPE

WORKER = Path(__file__).with_name("ddp_worker.py")
STAGED = 'freeze.stages=[{epochs = 1, train = ["classifier"]}, {train = ["blocks.4:"]}]'


def _torchrun(mode: str, target: Path, out: Path, *sets: str, restarts: int = 0) -> str:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--max-restarts", str(restarts)] if restarts else []
    proc = subprocess.run(
        [*cmd, str(WORKER), mode, str(target), str(out), *sets], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_one_epoch_with_bn_frozen_equals_one_process_at_the_same_global_batch(
    tiny_recipe: Path, tmp_path: Path, sampler: str
) -> None:
    sets = ['freeze.bn="all"', f'data.sampler="{sampler}"', "data.repeat_threshold=0.5"]  # balanced: 41 draws, 5 steps
    one = run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=one"]))  # batch 8, 3 steps
    _torchrun("train", tiny_recipe, tmp_path / "out", *sets, "output.name=two")  # 4 per process
    a, b = _weights(one), _weights(tmp_path / "runs" / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_sync_bn_gives_the_global_batch_statistics(tiny_recipe: Path, tmp_path: Path) -> None:
    """With BN training, sync_bn lands near one process with the whole batch; without it, far from it.

    The tolerance is wider than with BN frozen: the backward pass of an untrained network through ~50 BatchNorm
    layers in train mode amplifies fp32 rounding (weights perturbed by 1e-6 differ by 2.5e-2 after one SGD step, in
    one process). Measured here: 1.8e-3 at most with sync_bn, 0.75 without. One step (the whole split is one global
    batch, 12 images per process) and SGD (Adam turns the rounding noise of a zero gradient into a full step).
    """
    sets = ['freeze.bn="none"', "data.batch_size=24", 'optim.name="sgd"']
    one = _weights(run_recipe(load_recipe(tiny_recipe, [*sets, "train.sync_bn=true", "output.name=one"])))
    _torchrun("train", tiny_recipe, tmp_path / "a", *sets, "train.sync_bn=true", "output.name=synced")
    _torchrun("train", tiny_recipe, tmp_path / "b", *sets, "output.name=local")
    synced, local = _weights(tmp_path / "runs" / "synced"), _weights(tmp_path / "runs" / "local")
    assert synced["bn1.num_batches_tracked"] == one["bn1.num_batches_tracked"] == 1
    worst = {
        name: max((w[k].float() - one[k].float()).abs().max().item() for k in one)
        for name, w in (("synced", synced), ("local", local))
    }
    assert worst["synced"] < 5e-3 and worst["local"] > 20 * worst["synced"], worst


@pytest.mark.slow
def test_staged_run_resume_and_gathered_evaluation(tiny_recipe: Path, tmp_path: Path) -> None:
    sets = [STAGED, "train.epochs=3", "train.checkpoint_every=1", "data.augment.mixup=0.4", "train.ema=0.9"]
    _torchrun("train", tiny_recipe, tmp_path / "straight", *sets, "output.name=straight")
    ranks = [torch.load(tmp_path / "straight" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    straight = tmp_path / "runs" / "straight"

    # Stage 2 trains blocks.4: on both ranks, identically; the frozen groups and their BN statistics stay bitwise.
    model = build_run(load_recipe(tiny_recipe), weights="none", roles=("train",)).model
    frozen_prefixes = ("conv_stem", "bn1", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.")  # stem, blocks.0-3
    params = {name for name, _ in model.named_parameters()}
    for key, start in ranks[0]["start"].items():
        end0, end1 = ranks[0]["end"][key], ranks[1]["end"][key]
        if key in params or key.startswith(frozen_prefixes):  # not the trained groups' BN statistics (no sync_bn)
            assert torch.equal(end0, end1), key
        if key.startswith(frozen_prefixes):
            assert torch.equal(end0, start), key
        elif key.startswith("blocks.5.") and key.endswith(".weight") and model.get_parameter(key).ndim == 4:
            assert not torch.equal(end0, start), key
    assert torch.equal(ranks[0]["end"]["classifier.weight"], _weights(straight)["classifier.weight"])

    # Rank 1 SIGKILLed mid-epoch 2 under torchrun --max-restarts 1 (train.checkpoint_every = 1, mixup, EMA).
    # The restarted workers resume from the newest mid-epoch checkpoint (not "already holds a run") and end bitwise on
    # the uninterrupted DDP run's weights and EMA.
    err = _torchrun("elastic", tiny_recipe, tmp_path / "elastic", *sets, "output.name=elastic", restarts=1)
    elastic = tmp_path / "runs" / "elastic"
    said = "".join(err.split())  # the console wraps long paths anywhere
    assert "".join(f"elastic restart 1: resuming {elastic} from steps/step-0000000".split()) in said, err[-3000:]
    assert "".join(f"resuming {elastic} after epoch 1 (step".split()) in said and "ofepoch2)" in said
    ends = [torch.load(d / "last.pt", weights_only=True) for d in (straight, elastic)]
    for part in ("model", "eval_model"):
        for key, value in ends[0][part].items():
            assert torch.equal(ends[1][part][key], value), (part, key)
    logged = [
        [json.loads(r)["train_loss"] for r in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (straight, elastic)
    ]
    assert logged[0] == logged[1]  # each rank's running loss of the cut epoch came back, not rank 0's on every rank

    # Evaluation gathered from both ranks' shards equals one process's, on the same checkpoint.
    gathered = torch.load(tmp_path / "straight" / "gathered.pt", weights_only=True)
    parts = build_from_run(RunDir.open(straight), ["val"])
    split = parts.splits["val"]
    single = predict_loader(parts.model, parts.loader("val"), parts.eval_settings)
    assert gathered["index"].tolist() == list(range(len(split.targets)))
    torch.testing.assert_close(gathered["probs"], torch.as_tensor(single.probs), atol=1e-6, rtol=0)
    assert torch.equal(gathered["targets"], torch.as_tensor(single.targets))


@pytest.mark.parametrize(
    ("n", "batch", "world"), [(24, 8, 2), (11, 4, 2), (15, 8, 2), (5, 8, 2), (1, 4, 4), (37, 8, 4)]
)
def test_shards_take_the_steps_and_images_of_one_process(n: int, batch: int, world: int) -> None:
    """Each rank takes one process's number of steps; together, step k holds one process's step-k images."""
    single = list(torch.utils.data.BatchSampler(EpochSampler(n, 3), batch, drop_last=n > batch))
    ranks = []
    for rank in range(world):
        sampler = ShardSampler(n, 3, rank, world, batch=batch)
        ranks.append(list(torch.utils.data.BatchSampler(sampler, batch // world, drop_last=n > batch)))
    assert all(len(r) == len(single) for r in ranks), (len(single), [len(r) for r in ranks])
    if n > batch:
        for k, images in enumerate(single):
            assert sorted(i for r in ranks for i in r[k]) == sorted(images)


@pytest.mark.slow
def test_no_hang_on_a_rank_with_nothing_readable_or_an_empty_val_shard(tiny_coco: Path, tmp_path: Path) -> None:
    """Rank 1's whole share of step 1 unreadable (on_bad_image = "skip"), and a 1-image val split for 2 ranks.

    Before: rank 0 waited in DDP's gradient all-reduce for a rank that never ran a backward, and an empty val shard
    raised on one rank while the other waited in the gather. Both now finish, inside _torchrun's timeout.
    """
    root = tmp_path / "data"
    shutil.copytree(tiny_coco, root)
    ann = root / "annotations" / "instances_val.json"
    doc = json.loads(ann.read_text())
    keep = doc["images"][0]["id"]
    doc["images"] = doc["images"][:1]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] == keep]
    ann.write_text(json.dumps(doc))
    train = read_coco_split(root, "train")
    rank1_step1 = epoch_permutation(len(train.image_paths), 0, 0)[1::2][:4]  # batch 8: 4 per rank, rank 1 odd places
    for i in rank1_step1:
        Path(train.image_paths[i]).write_bytes(b"not an image")
    recipe = tmp_path / "broken.toml"
    recipe.write_text(TINY_RECIPE.format(root=root.as_posix(), runs=(tmp_path / "runs").as_posix()))
    _torchrun("train", recipe, tmp_path / "out", 'data.on_bad_image="skip"', "output.name=broken")
    run = tmp_path / "runs" / "broken"
    assert len(json.loads((run / "bad_images.json").read_text())) == 4
    gathered = torch.load(tmp_path / "out" / "gathered.pt", weights_only=True)
    assert gathered["index"].tolist() == [0]
    assert json.loads((run / "report.json").read_text())["splits"]["val"]["images"] == 1
