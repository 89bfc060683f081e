"""Nothing of the user's is lost: written files follow the umask, and no command overwrites a file the user made."""

from __future__ import annotations

import os
from pathlib import Path

from finetune import io as ckpt

from .conftest import run_cli


# File modes follow the umask, like an ordinary open().
def test_atomic_writes_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ckpt.atomic_write_text(tmp_path / "a.json", "{}")
        with (tmp_path / "b.json").open("w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644


# Nothing of the user's is overwritten.
def test_data_demo_and_predict_csv_never_overwrite_a_users_files(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "annotations").mkdir(parents=True)
    (mine / "annotations" / "instances_train.json").write_text("the user's own")
    proc = run_cli("data", "demo", str(mine), "--train", "4", "--val", "2", "--test", "2", "--source", "0")
    assert proc.returncode == 2 and f"{mine}: is not empty (it holds annotations)" in proc.stderr
    assert (mine / "annotations" / "instances_train.json").read_text() == "the user's own"
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"the user's photo")
    proc = run_cli("predict", str(tmp_path / "no-run"), str(image), "--csv", str(image))
    assert proc.returncode == 2 and "names an image" in proc.stderr and image.read_bytes() == b"the user's photo"
