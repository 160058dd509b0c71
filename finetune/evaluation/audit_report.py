"""``audit.html``: one self-contained page of the findings of `finetune.audit`, in ``report.html``'s style.

Like the evaluation report it opens offline (inline styles, ``data:`` thumbnails) and escapes every piece
of text that comes from the data (class names, paths), so a class folder named ``<script>`` shows as text.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from finetune.data import Manifest
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
) -> str:
    """The HTML text of the audit page.

    Args:
        manifest: The audited images (root, classes, splits).
        near_duplicates: Groups as in ``finetune.audit.Audit.near_duplicates``, leaking ones first.
        label_issues: Rows as in ``Audit.label_issues``, most likely wrong first.
        outliers: Rows as in ``Audit.outliers``, farthest first.
        summary: The one-paragraph summary.
        settings: Shown as a table under the summary.
    """
    root = manifest.root
    thumbs: dict[str, bytes | None] = {}

    def thumb(path: str) -> bytes | None:
        if path not in thumbs:
            thumbs[path] = thumbnail(str(root / path))
        return thumbs[path]

    return html_page(f"Data audit: {root}", SECTIONS, [
        f'<section id="summary"><h2>Summary</h2><p>{escape(summary)}</p>{_settings(settings)}</section>',
        _classes(manifest, near_duplicates, label_issues),
        _duplicates(near_duplicates[:TOP], thumb, len(near_duplicates)),
        _figures("label-issues", "Label issues", label_issues, thumb,
                 lambda r: (f'<div class="good">given: {escape(r["given"])} ({100 * r["p_given"]:.1f}%)</div>'
                            f'<div class="bad">suggested: {escape(r["suggested"])} ({100 * r["p_suggested"]:.1f}%)</div>'),
                 "Most likely wrong first (out-of-fold confident learning); all are in label_issues.csv."),
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
