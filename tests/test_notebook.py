"""notebooks/quickstart.ipynb executes top to bottom, so it cannot rot."""
import ast
import json
import re
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
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    text = [("".join(o.get("text", "") for o in cell.get("outputs", [])), cell.get("outputs", [])) for cell in code]
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "eval" / "report.html").is_file()
    run = runs[0]
    # the training cell prints the run's own summary
    printed = text[1][0]  # the run's log lines, then the JSON the cell prints
    summary = json.loads(printed[printed.rindex("\n{\n") + 1:] if "\n{\n" in printed else printed[printed.index("{"):])
    saved = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == saved["best_epoch"] and summary["test"] == saved["test"]
    assert 1 <= summary["best_epoch"] <= 5 and summary["test"]["accuracy"] > 0.5  # 5 short epochs on the digits
    # the curves and the confusion matrix are displayed as images, the metrics printed as metrics.json holds them
    assert any("image/png" in o.get("data", {}) for o in text[2][1])
    assert any("image/png" in o.get("data", {}) for o in text[3][1])
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    printed = ast.literal_eval(text[3][0].strip())
    assert printed == {k: round(metrics[k], 4) for k in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "ece")}
    # the per-class table: one row per class, worst F1 first
    table = next(o["data"]["text/html"] for o in text[4][1] if "text/html" in o.get("data", {}))
    assert table.count("<tr>") == 1 + 10
    # six predictions, each with its true class and the top 3 probabilities in descending order
    lines = text[5][0].strip().splitlines()
    assert len(lines) == 6
    for line in lines:
        match = re.fullmatch(r"\s*\S+  true (\d)  predicted (\d) ([\d.]+), (\d) ([\d.]+), (\d) ([\d.]+)", line)
        assert match, line
        probs = [float(match.group(i)) for i in (3, 5, 7)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-2
