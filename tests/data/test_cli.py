import json

from finetune.cli import main
from finetune.data import Manifest


def run(capsys, *argv):
    status = main(["data", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_inspect_json_reports_every_odd_file_without_crashing(odd_root, capsys):
    status, out, _ = run(capsys, "inspect", str(odd_root), "--json")
    assert status == 0
    report = json.loads(out)
    assert set(report) == {
        "root", "layout", "split_folders", "classes", "counts", "num_images",
        "image_size", "modes", "bad_files", "duplicates",
    }  # fmt: skip
    assert report["layout"] == "folder" and report["classes"] == ["bad", "good", "kinds", "linked"]
    assert report["counts"] == {"all": {"bad": 0, "good": 4, "kinds": 13, "linked": 2}}
    reasons = {b["path"]: b["reason"] for b in report["bad_files"]}
    assert sorted(reasons) == ["bad/bomb.png", "bad/empty.jpg", "bad/text.jpg", "bad/truncated.jpg", "bad/truncated.png"]
    assert reasons["bad/empty.jpg"] == "empty file (0 bytes)"
    assert reasons["bad/text.jpg"] == "not an image (unrecognised format)"
    assert "truncated" in reasons["bad/truncated.jpg"] and "truncated" in reasons["bad/truncated.png"]
    assert reasons["bad/bomb.png"].startswith("too many pixels")
    assert report["modes"] == {"CMYK": 1, "I;16": 1, "L": 1, "P": 2, "RGB": 13, "RGBA": 1}
    assert report["image_size"]["height"] == {"min": 20, "median": 20, "max": 30}
    assert report["duplicates"] == []


def test_inspect_pre_split_reports_counts_per_split_and_leaks(bird_root, capsys):
    (bird_root / "test" / "CROW" / "dup.jpg").write_bytes((bird_root / "train" / "CROW" / "1.jpg").read_bytes())
    status, out, _ = run(capsys, "inspect", str(bird_root), "--json")
    report = json.loads(out)
    assert report["layout"] == "pre-split" and report["split_folders"] == {"train": "train", "val": "valid", "test": "test"}
    assert report["counts"]["val"] == {"AFRICAN CROWNED CRANE": 2, "BALD EAGLE": 2, "CROW": 2}
    assert report["counts"]["test"]["CROW"] == 3
    assert report["duplicates"] == [{"paths": ["test/CROW/dup.jpg", "train/CROW/1.jpg"], "splits": ["train", "test"], "leak": True}]


def test_inspect_text_lists_classes_bad_files_and_leaks(bird_root, capsys):
    (bird_root / "valid" / "CROW" / "dup.jpg").write_bytes((bird_root / "train" / "CROW" / "2.jpg").read_bytes())
    (bird_root / "train" / "CROW" / "broken.jpg").write_text("nope")
    status, out, _ = run(capsys, "inspect", str(bird_root))
    assert status == 0
    assert "layout: pre-split (train/, valid/, test/)" in out
    assert "AFRICAN CROWNED CRANE       6       2       2" in out
    assert "train/CROW/broken.jpg: not an image (unrecognised format)" in out
    assert "LEAK train/CROW/2.jpg = valid/CROW/dup.jpg" in out


def test_inspect_accepts_a_manifest_kept_in_its_root(bird_root, capsys):
    _, out, _ = run(capsys, "split", str(bird_root), "--out", str(bird_root / "split.csv"))
    assert "relative to" not in out
    status, out, _ = run(capsys, "inspect", str(bird_root / "split.csv"), "--json")
    report = json.loads(out)
    assert report["layout"] == "manifest" and sum(report["counts"]["train"].values()) == 18


def test_split_writes_a_reproducible_manifest_and_a_bad_file_report(caltech_root, tmp_path, capsys, caplog):
    (caltech_root / "Faces" / "broken.jpg").write_bytes(b"")
    argv = ["split", str(caltech_root), "--train-per-class", "3", "--val", "0", "--exclude", "BACKGROUND_Google", "--seed", "4"]
    status, out, _ = run(capsys, *argv, "--out", str(tmp_path / "a.csv"))
    assert status == 0
    assert out.splitlines() == [
        f"wrote {tmp_path / 'a.csv'}: 3 classes; train 7, test 16",
        f"paths in it are relative to {caltech_root}: give that root along with the manifest "
        "(data.root, --set data.root=ROOT), or write the manifest into it",
        f"bad files: 1, listed in {tmp_path / 'a.bad.csv'}",
    ]
    assert "train: 1 class(es) too small to get 3 images: 'tiny' (n=2)" in caplog.text
    assert (tmp_path / "a.bad.csv").read_text() == "path,reason\nFaces/broken.jpg,empty file (0 bytes)\n"
    run(capsys, *argv, "--out", str(tmp_path / "b.csv"))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    manifest = Manifest.read_csv(tmp_path / "a.csv", root=caltech_root)
    assert manifest.classes == ["Faces", "accordion", "tiny"]


def test_split_with_a_card_takes_its_protocol(caltech_root, tmp_path, capsys):
    card = tmp_path / "mini.yaml"
    card.write_text(
        "name: mini\ntitle: Mini Caltech\nlayout: folder\nfolder: 101_ObjectCategories\nnum_classes: 3\n"
        "split: {train_per_class: 2, val: 0.0, exclude: [BACKGROUND_Google]}\nsource: {url: https://example.org}\n"
    )
    status, out, _ = run(capsys, "split", str(caltech_root), "--card", str(card), "--out", str(tmp_path / "m.csv"), "--no-scan")
    assert status == 0 and out.splitlines()[0] == f"wrote {tmp_path / 'm.csv'}: 3 classes; train 5, test 18"


def test_split_errors_are_one_line_with_status_2(bird_root, tmp_path, capsys):
    status, _, err = run(capsys, "split", str(bird_root), "--val", "0.2", "--out", str(tmp_path / "m.csv"))
    assert status == 2
    assert err.strip().splitlines()[-1] == f"finetune data: error: val cannot be used: {bird_root} is already split into folders"
    assert not (tmp_path / "m.csv").exists()


def test_sample_digits_builds_offline(tmp_path, capsys):
    status, out, _ = run(capsys, "sample", "digits", str(tmp_path / "digits"), "--size", "12")
    assert status == 0 and str(tmp_path / "digits") in out
    assert len(list((tmp_path / "digits").glob("*/*.png"))) == 1797


def test_data_without_subcommand_prints_help(capsys):
    status, out, _ = run(capsys)
    assert status == 0 and "inspect" in out and "split" in out and "sample" in out
