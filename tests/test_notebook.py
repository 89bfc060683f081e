"""The calibration notebook runs top to bottom on a tiny run."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from finetune.config import load_recipe
from finetune.runs.run import run_recipe

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "threshold_calibration.ipynb"


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
