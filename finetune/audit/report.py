"""``audit.html``: one self-contained page of the findings of `finetune.audit`, in ``report.html``'s style, and
the files of an audit folder (`write_audit`: CSVs and the page, one folder swapped in atomically).

Like the evaluation report it opens offline (inline styles, ``data:`` thumbnails) and escapes every piece
of text that comes from the data (class names, paths), so a class folder named ``<script>`` shows as text.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from finetune._io import csv_text, write_dir_atomic
from finetune.audit.auditor import Audit
from finetune.data.manifest import Manifest
from finetune.data.multilabel import LabelsTable
from finetune.errors import FinetuneError
from finetune.evaluation.evaluator import thumbnail
from finetune.evaluation.report import data_uri, escape, html_page

SECTIONS = ("summary", "classes", "near-duplicates", "label-issues", "outliers")
TOP = 24
"""Items of each list shown with thumbnails (all are in the CSV files)."""


def render_audit(
    manifest: Manifest,
    near_duplicates: Sequence[Mapping[str, Any]],
    label_issues: Sequence[Mapping[str, Any]],
    outliers: Sequence[Mapping[str, Any]],
    *,
    summary: str,
    settings: Mapping[str, Any],
    labels: LabelsTable | None = None,
) -> str:
    """The HTML text of the audit page.

    Args:
        manifest: The audited images (root, classes, splits).
        near_duplicates: Groups as in ``finetune.audit.findings.Audit.near_duplicates``, leaking ones first.
        label_issues: Rows as in ``Audit.label_issues``, most likely wrong first.
        outliers: Rows as in ``Audit.outliers``, farthest first.
        summary: The one-paragraph summary.
        settings: Shown as a table under the summary.
        labels: multi-label data's table: a per-label table, and label issues captioned with their label.
    """
    root = manifest.root
    thumbs: dict[str, bytes | None] = {}

    def thumb(path: str) -> bytes | None:
        if path not in thumbs:
            thumbs[path] = thumbnail(str(root / path))
        return thumbs[path]

    return html_page(f"Data audit: {root}", SECTIONS, [
        f'<section id="summary"><h2>Summary</h2><p>{escape(summary)}</p>{_settings(settings)}</section>',
        _classes(manifest, near_duplicates, label_issues) if labels is None else _labels(labels, label_issues),
        _duplicates(near_duplicates[:TOP], thumb, len(near_duplicates)),
        _figures("label-issues", "Label issues", label_issues, thumb,
                 lambda r: (f'<div class="good">given: {escape(r["given"])} ({100 * r["p_given"]:.1f}%)</div>'
                            f'<div class="bad">suggested: {escape(r["suggested"])} ({100 * r["p_suggested"]:.1f}%)</div>'),
                 "Most likely wrong first (out-of-fold confident learning); all are in label_issues.csv.")
        if labels is None else
        _figures("label-issues", "Label issues", label_issues, thumb,
                 lambda r: (f'<div class="bad">{escape(r["label"])} likely {escape(r["kind"])} '
                            f'({100 * r["p_suggested"]:.1f}% {"present" if r["kind"] == "missing" else "absent"})</div>'
                            f'<div class="muted">labels: {escape(r["given"])}</div>'),
                 "Per label, most likely wrong first (out-of-fold confident learning of each label, present or "
                 "absent): missing = a label the image likely shows, extra = one it likely does not; all are in "
                 "label_issues.csv."),
        _figures("outliers", "Outliers", outliers, thumb,
                 lambda r: (f'<div>{escape(r["class"])}; nearest: {escape(r["nearest_class"])}</div>'
                            f'<div class="{"bad" if r["flagged"] else "muted"}">distance {r["distance"]:.3f}</div>'),
                 "Farthest from every class centroid first; all listed are in outliers.csv."),
    ])


def _settings(settings: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in settings.items())
    return f"<table>{rows}</table>"


def _classes(manifest: Manifest, near_duplicates: Sequence[Mapping[str, Any]],
             label_issues: Sequence[Mapping[str, Any]]) -> str:
    counts = manifest.counts()
    splits = list(counts)
    issues: dict[str, int] = {}
    for r in label_issues:
        issues[r["given"]] = issues.get(r["given"], 0) + 1
    dups: dict[str, int] = {}
    for g in near_duplicates:
        for c in g["classes"]:
            dups[c] = dups.get(c, 0) + 1
    head = "".join(f'<th data-type="{t}">{escape(h)}</th>' for h, t in
                   [("class", "text"), *((s, "num") for s in splits), ("near-duplicates", "num"), ("label issues", "num")])
    body = []
    for c in manifest.classes:
        cells = [counts[s][c] for s in splits] + [dups.get(c, 0), issues.get(c, 0)]
        body.append(f'<tr><td data-v="{escape(c)}">{escape(c)}</td>'
                    + "".join(f'<td class="n" data-v="{v}">{v}</td>' for v in cells) + "</tr>")
    return ('<section id="classes"><h2>Per class</h2>'
            '<input type="search" placeholder="filter classes" data-filter="classes-table">'
            f'<div class="scroll"><table id="classes-table" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></section>')


def _labels(table: LabelsTable, label_issues: Sequence[Mapping[str, Any]]) -> str:
    splits = table.splits()
    counts = {s: {c: 0 for c in table.classes} for s in splits}
    for labels, split in zip(table.labels, table.splits_list):
        for c in labels:
            counts[split][c] += 1
    flagged = {(c, k): 0 for c in table.classes for k in ("missing", "extra")}
    for r in label_issues:
        flagged[(r["label"], r["kind"])] += 1
    head = "".join(f'<th data-type="{t}">{escape(h)}</th>' for h, t in
                   [("label", "text"), *((s, "num") for s in splits), ("likely missing", "num"), ("likely extra", "num")])
    body = []
    for c in table.classes:
        cells = [counts[s][c] for s in splits] + [flagged[(c, "missing")], flagged[(c, "extra")]]
        body.append(f'<tr><td data-v="{escape(c)}">{escape(c)}</td>'
                    + "".join(f'<td class="n" data-v="{v}">{v}</td>' for v in cells) + "</tr>")
    return ('<section id="classes"><h2>Per label</h2><p class="muted">Images showing each label, per split.</p>'
            '<input type="search" placeholder="filter labels" data-filter="classes-table">'
            f'<div class="scroll"><table id="classes-table" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></section>')


def _figure(path: str, thumb, caption: str) -> str:
    data = thumb(path)
    image = (f'<img alt="{escape(path)}" src="{data_uri(data, "image/jpeg")}">' if data
             else '<div class="muted">(image unreadable)</div>')
    return (f'<figure title="{escape(path)}">{image}<figcaption>{caption}'
            f'<div class="muted">{escape(path)}</div></figcaption></figure>')


def _duplicates(groups: Sequence[Mapping[str, Any]], thumb, total: int) -> str:
    if not groups:
        return '<section id="near-duplicates"><h2>Near-duplicates</h2><p>None found.</p></section>'
    blocks = []
    for g in groups:
        title = f'group {g["group"]}' + (' <b class="bad">LEAK across splits</b>' if g["leak"] else "")
        figures = "".join(_figure(p, thumb, f"<div>{escape(s)} / {escape(c)}</div>")
                          for p, s, c in zip(g["paths"], g["splits"], g["classes"]))
        blocks.append(f'<h3>{title}</h3><div class="grid">{figures}</div>')
    return ('<section id="near-duplicates"><h2>Near-duplicates</h2>'
            f'<p class="muted">{total} group(s), leaking ones first; all are in near_duplicates.csv.</p>'
            f'{"".join(blocks)}</section>')


def _figures(section: str, title: str, rows: Sequence[Mapping[str, Any]], thumb, caption, note: str) -> str:
    if not rows:
        return f'<section id="{section}"><h2>{title}</h2><p>None found.</p></section>'
    figures = "".join(_figure(r["path"], thumb, f'<div class="muted">{escape(r["split"])}</div>' + caption(r))
                      for r in rows[:TOP])
    return (f'<section id="{section}"><h2>{title}</h2><p class="muted">{escape(note)}</p>'
            f'<div class="grid">{figures}</div></section>')

FILES = ("near_duplicates.csv", "blank_images.csv", "label_issues.csv", "outliers.csv", "audit.html")
"""What an audit folder holds."""


# -------------------------------------------------------------------------------------------- writers

def summary_text(audit: Audit, out_dir: str | os.PathLike | None = None) -> str:
    """The one-paragraph summary ``finetune data audit`` prints."""
    s = audit.summary()
    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    size = "×".join(str(v) for v in audit.settings.get("input_size", []))
    total = sum(audit.seconds.values())
    if audit.labels is not None:
        return (
            f"Audited {s['images']} multi-label images of {s['classes']} labels ({splits}) with "
            f"{audit.settings.get('backbone')} at {size} px ({'cached features' if audit.features_cached else 'features extracted'}; "
            f"{total:.1f}s). Near-duplicates: {s['near_duplicate_groups']} group(s) of {s['near_duplicate_images']} "
            f"images, {s['leaking_groups']} spanning splits (leakage: {s['leaked_images']} val/test image(s) with a "
            f"near-copy in train). Blank or single-colour images: {s['blank_images']}. Label issues: "
            f"{sum(r['kind'] == 'missing' for r in audit.label_issues)} label(s) likely missing and "
            f"{sum(r['kind'] == 'extra' for r in audit.label_issues)} likely extra, per the out-of-fold classifier "
            "of each label. Outliers: not computed for multi-label data."
        ) + (f" Details in {out_dir}." if out_dir is not None else "")
    text = (
        f"Audited {s['images']} images of {s['classes']} classes ({splits}) with {audit.settings.get('backbone')} "
        f"at {size} px ({'cached features' if audit.features_cached else 'features extracted'}; {total:.1f}s). "
        f"Near-duplicates: {s['near_duplicate_groups']} group(s) of {s['near_duplicate_images']} images, "
        f"{s['leaking_groups']} spanning splits (leakage: {s['leaked_images']} val/test image(s) with a near-copy "
        f"in train). Blank or single-colour images: {s['blank_images']} (listed on their own; copies only of one "
        f"of the same size and colour). Label issues: {s['label_issues']} image(s) whose label the out-of-fold classifier confidently "
        f"contradicts. Outliers: {s['outliers_flagged']} image(s) far from every class."
    )
    return text + (f" Details in {out_dir}." if out_dir is not None else "")


def to_json(audit: Audit, files: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``--json`` object: summary, settings, seconds, the three lists and the files written."""
    return {"summary": audit.summary(), "settings": audit.settings, "features_cached": audit.features_cached,
            "seconds": {k: round(v, 3) for k, v in audit.seconds.items()}, "near_duplicates": audit.near_duplicates,
            "label_issues": audit.label_issues, "outliers": audit.outliers, "blank_images": audit.blank_images,
            "files": files or {}}


def write_audit(audit: Audit, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``near_duplicates.csv``, ``blank_images.csv``, ``label_issues.csv``, ``outliers.csv`` and
    ``audit.html`` into ``out_dir``, as one folder swapped in atomically (as checkpoints are): a crash leaves
    the previous audit there, or none, never a mix of old and new files or a half-written one.

    Returns:
        File name → path written.

    Raises:
        FinetuneError: ``out_dir`` is a file, or a folder holding anything but an earlier audit's files
            (replacing it would delete them), or cannot be written.
    """
    out = Path(out_dir)
    check_audit_folder(out)
    duplicates = [
        (g["group"], int(g["leak"]), path, split, label, g["similarity"])
        for g in audit.near_duplicates for path, split, label in zip(g["paths"], g["splits"], g["classes"])
    ]
    tables = {
        "near_duplicates.csv": (("group", "leak", "path", "split", "class", "similarity"), duplicates),
        "blank_images.csv": (("path", "split", "class", "colour"),
                             [(b["path"], b["split"], b["class"], b["colour"]) for b in audit.blank_images]),
        "label_issues.csv": (("rank", "path", "split", "given", "suggested", "score", "p_given", "p_suggested",
                              *(("label", "kind") if audit.labels is not None else ())),
                             [(n, *r.values()) for n, r in enumerate(audit.label_issues, 1)]),
        "outliers.csv": (("rank", "path", "split", "class", "distance", "nearest_class", "flagged"),
                         [(n, *list(r.values())[:-1], int(r["flagged"])) for n, r in enumerate(audit.outliers, 1)]),
    }
    html = render_audit(audit.manifest, audit.near_duplicates, audit.label_issues, audit.outliers,
                        summary=summary_text(audit), settings=audit.settings, labels=audit.labels)

    def write(tmp: Path) -> None:
        for name, (header, rows) in tables.items():
            (tmp / name).write_text(csv_text(header, rows), encoding="utf-8")
        (tmp / "audit.html").write_text(html, encoding="utf-8")

    write_dir_atomic(out, write)
    return {name: str(out / name) for name in FILES}


def check_audit_folder(out: Path, data_root: str | os.PathLike | None = None) -> None:
    """Refuse an audit ``--out`` that is a file, holds anything but an earlier audit's `FILES` (the audit
    replaces the whole folder), or is (or is inside) the data root, as ``finetune train`` refuses a run
    folder there: the next scan would take the audit's files for data."""
    if data_root is not None:
        root, resolved = Path(data_root).resolve(), out.resolve()
        if resolved == root or root in resolved.parents:
            raise FinetuneError(f"--out {out} is inside the data root {data_root}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file; give a folder for the audit")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if others:
            raise FinetuneError(f"--out {out} holds files that are not an audit's ({', '.join(others[:3])}"
                                f"{', …' if len(others) > 3 else ''}); the audit replaces the whole folder: give a "
                                "new folder or an earlier audit's")
