"""The notebooks run top to bottom: calibration on a tiny run, the quickstart on tiny settings."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from finetune.config import load_recipe
from finetune.runs.run import run_recipe

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "threshold_calibration.ipynb"
QUICKSTART = NOTEBOOK.with_name("quickstart.ipynb")


@pytest.mark.slow
def test_threshold_calibration_notebook_executes(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = run_recipe(load_recipe(tiny_recipe, ["output.name=nb"]))
    monkeypatch.setenv("FINETUNE_RUN", str(run_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "measured on: test split" in text and "cross-fitted macro-F1" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_QUICKSTART", "tiny")
    monkeypatch.setenv("FINETUNE_WORK", str(tmp_path))
    nb = nbformat.read(QUICKSTART, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(QUICKSTART.parent)}}
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "measured on: test split" in text and "labels as the run's: True" in text
    assert "-> " in text and "threshold" in text
    assert len([o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]) == 2
    assert len(list((tmp_path / "runs").glob("quickstart-notebook-*/export/model.onnx"))) == 1
