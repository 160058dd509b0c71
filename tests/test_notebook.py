"""notebooks/quickstart.ipynb executes top to bottom, so it cannot rot."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # run against a copy of the repository layout so the test writes nothing into the checkout
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "recipes").symlink_to(NOTEBOOK.parents[1] / "recipes")
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(root / "notebooks")}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "best_epoch" in outputs and "predicted" in outputs
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "eval" / "report.html").is_file()
