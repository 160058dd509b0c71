"""Multi-label data (issue 25, data part): the labels CSV, its iterative-stratified split, its statistics, the CLI."""
import json

import numpy as np
import pytest
from PIL import Image

from finetune.cli import main
from finetune.data.multilabel import LabelsTable, label_statistics, read_labels_csv, split_labels
from finetune.errors import FinetuneError


def _mosaic_table(n=600, seed=0):
    """Label sets like the digit mosaics': 1-4 distinct digits per image, with digit frequencies that differ."""
    rng = np.random.default_rng(seed)
    weights = np.linspace(1, 4, 10) / np.linspace(1, 4, 10).sum()
    labels = [[str(d) for d in rng.choice(10, size=rng.integers(1, 5), replace=False, p=weights)] for _ in range(n)]
    return LabelsTable("/nowhere", [f"{i:04d}.png" for i in range(n)], labels)


def _write(folder, rows, header="path,labels", images=True):
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for row in rows:
            Image.new("RGB", (8, 8), (len(row[0]) * 10, 0, 0)).save(folder / row[0])
    (folder / "labels.csv").write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return folder / "labels.csv"


def test_a_labels_csv_reads_label_sets_with_blanks_and_empty_rows(tmp_path):
    csv_path = _write(tmp_path, [("a.png", "bird; feeder"), ("b.png", ""), ("c.png", "feeder;feeder")])
    table = read_labels_csv(csv_path)
    assert table.classes == ["bird", "feeder"]
    assert table.labels == [("bird", "feeder"), (), ("feeder",)]
    np.testing.assert_array_equal(table.matrix(), [[1, 1], [0, 0], [0, 1]])
    assert table.splits_list == [None, None, None]
    pipes = _write(tmp_path / "p", [("a.png", "x|y")])
    assert read_labels_csv(pipes, separator="|").classes == ["x", "y"]


@pytest.mark.parametrize("rows, header, message", [
    ([("a.png", "x"), ("gone.png", "y")], "path,labels", r"labels.csv:3: 'gone.png' is not a file under"),
    ([("a.png", ""), ("b.png", "")], "path,labels", "the labels column is empty on every row"),
    ([("a.png", "x", "train"), ("b.png", "y", "holdout")], "path,labels,split", r":3: unknown split 'holdout'"),
    ([("a.png", "x", "train"), ("b.png", "y", "val")], "path,labels,split", "label 'y' appears in val but never in train"),
    ([("a.png", "x")], "path,class", "needs 'path' and 'labels' columns"),
    ([("a.png", "x"), ("a.png", "y")], "path,labels", r":3: 'a.png' is listed twice \(first on line 2\)"),
    ([("../a.png", "x")], "path,labels", "climbs out of the dataset root"),
])
def test_bad_labels_csvs_are_one_line_naming_the_row_or_label(tmp_path, rows, header, message):
    csv_path = _write(tmp_path, [r for r in rows if not r[0].startswith("..") and r[0] != "gone.png"], header)
    csv_path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    with pytest.raises(FinetuneError, match=message) as raised:
        read_labels_csv(csv_path)
    assert "\n" not in str(raised.value)


def test_the_stratified_split_keeps_every_labels_share_and_is_reproducible():
    table = _mosaic_table()
    split = split_labels(table, val=0.2, test=0.2, seed=3)
    assert split_labels(table, val=0.2, test=0.2, seed=3).splits_list == split.splits_list
    assert split_labels(table, val=0.2, test=0.2, seed=4).splits_list != split.splits_list
    y, splits = table.matrix(), np.array(split.splits_list)
    for name, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs((splits == name).mean() - share) < 0.02
        per_label = y[splits == name].sum(0) / y.sum(0)
        assert np.abs(per_label - share).max() < 0.05  # every label's share, not only the images'
    # a random split of the same sizes strays further on some label: the stratification is doing the work
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(splits)
    assert max(np.abs(y[shuffled == n].sum(0) / y.sum(0) - s).max() for n, s in (("val", 0.2), ("test", 0.2))) > \
        max(np.abs(y[splits == n].sum(0) / y.sum(0) - s).max() for n, s in (("val", 0.2), ("test", 0.2)))


def test_a_label_on_one_image_goes_to_train_whatever_the_seed():
    """Iterative stratification places the rarest labels first, where most are wanted: train. (A split that leaves
    a label out of train is refused by name: the labels-CSV test with a split column.)"""
    table = _mosaic_table(n=40)
    table = LabelsTable("/nowhere", [*table.paths, "rare.png"], [*table.labels, ["rare"]])
    for seed in range(5):
        split = split_labels(table, val=0.25, test=0.25, seed=seed)
        assert split.splits_list[-1] == "train"


def test_statistics_count_labels_cardinality_pairs_and_unlabelled_images():
    table = LabelsTable("/r", ["a", "b", "c", "d"], [["x", "y"], ["x", "y", "z"], [], ["x"]])
    stats = label_statistics(table)
    assert stats["task"] == "multilabel" and stats["num_images"] == 4
    assert stats["label_counts"]["all"] == {"x": 3, "y": 2, "z": 1}
    assert stats["cardinality"] == pytest.approx(6 / 4) and stats["max_labels"] == 3 and stats["without_label"] == 1
    assert stats["top_pairs"][0] == {"labels": ["x", "y"], "images": 2}


def test_data_split_and_inspect_commands_on_a_folder_with_a_labels_csv(tmp_path, capsys):
    table = _mosaic_table(n=60, seed=1)
    csv_path = _write(tmp_path / "photos", list(zip(table.paths, [";".join(ls) for ls in table.labels])))
    out = tmp_path / "photos" / "split.csv"
    assert main(["data", "split", str(tmp_path / "photos"), "--labels", str(csv_path), "--out", str(out),
                 "--val", "0.2", "--test", "0.2", "--seed", "0"]) == 0
    assert "multi-label (iterative stratification)" in capsys.readouterr().out
    written = read_labels_csv(out)
    assert sorted(written.paths) == sorted(table.paths) and set(written.splits_list) == {"train", "val", "test"}
    assert dict(zip(written.paths, written.labels)) == dict(zip(table.paths, table.labels))
    first = out.read_bytes()
    assert main(["data", "split", str(tmp_path / "photos"), "--labels", str(csv_path), "--out", str(out),
                 "--val", "0.2", "--test", "0.2", "--seed", "0"]) == 0
    assert out.read_bytes() == first  # seeded: the same bytes
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "multilabel" and set(report["label_counts"]) == {"train", "val", "test"}
    assert main(["data", "inspect", str(out)]) == 0
    assert "labels per image" in capsys.readouterr().out


def test_a_bad_labels_csv_is_one_line_and_writes_nothing(tmp_path, capsys):
    csv_path = _write(tmp_path / "photos", [("a.png", "x")])
    csv_path.write_text("path,labels\na.png,x\nmissing.png,y\n")
    out = tmp_path / "split.csv"
    assert main(["data", "split", str(tmp_path / "photos"), "--labels", str(csv_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.png" in err and ":3:" in err
    assert not out.exists()


def test_a_labels_csv_of_test_images_only_reads_for_evaluation(tmp_path):
    csv_path = _write(tmp_path, [("a.png", "x", "test"), ("b.png", "y", "test")], header="path,labels,split")
    table = read_labels_csv(csv_path)
    assert table.splits() == ["test"] and table.classes == ["x", "y"]
