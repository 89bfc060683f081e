"""The notebooks run top to bottom: calibration on a tiny run, the quickstart on tiny settings."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from finetune.config import load_recipe
from finetune.runs.run import run_recipe

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "threshold_calibration.ipynb"
QUICKSTART = NOTEBOOK.with_name("quickstart.ipynb")


def _execute(path: Path) -> tuple[str, int]:
    """Run a notebook top to bottom in its own folder; its printed text and how many images it showed."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return "".join(o.get("text", "") for o in outputs), sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_threshold_calibration_notebook_executes(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = run_recipe(load_recipe(tiny_recipe, ["output.name=nb"]))
    monkeypatch.setenv("FINETUNE_RUN", str(run_dir))
    text, images = _execute(NOTEBOOK)
    assert "measured on: test split" in text and "cross-fitted macro-F1" in text
    assert images == 2


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_QUICKSTART", "tiny")
    monkeypatch.setenv("FINETUNE_WORK", str(tmp_path))
    text, images = _execute(QUICKSTART)
    assert "measured on: test split" in text and "labels as the run's: True" in text
    assert "-> " in text and "threshold" in text and images == 2
    assert len(list((tmp_path / "runs").glob("quickstart-notebook-*/export/model.onnx"))) == 1
