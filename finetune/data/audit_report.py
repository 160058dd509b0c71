"""``audit.html``: one self-contained page of `finetune data audit`'s findings, in ``report.html``'s style.

Like the evaluation report it opens offline (inline styles, ``data:`` thumbnails) and escapes every piece
of text that comes from the data (class names, paths), so a class folder named ``<script>`` shows as text.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from finetune.evaluation.evaluator import _thumbnail
from finetune.evaluation.report import _CSS, _SCRIPT, _data_uri, _e

if TYPE_CHECKING:
    from finetune.data.audit import Audit

SECTIONS = ("summary", "classes", "near-duplicates", "label-issues", "outliers")
TOP = 24
"""Items of each list shown with thumbnails (all are in the CSV files)."""


def render_audit(audit: "Audit", summary: str) -> str:
    """The HTML text of the audit page."""
    root = audit.manifest.root
    thumbs: dict[str, bytes | None] = {}

    def thumb(path: str) -> bytes | None:
        if path not in thumbs:
            thumbs[path] = _thumbnail(str(root / path))
        return thumbs[path]

    nav = "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in SECTIONS)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Data audit: {_e(root)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>Data audit: {_e(root)}</h1><nav>{nav}</nav>",
        f'<section id="summary"><h2>Summary</h2><p>{_e(summary)}</p>{_settings(audit.settings)}</section>',
        _classes(audit),
        _duplicates(audit.near_duplicates[:TOP], thumb, len(audit.near_duplicates)),
        _figures("label-issues", "Label issues", audit.label_issues, thumb,
                 lambda r: (f'<div class="good">given: {_e(r["given"])} ({100 * r["p_given"]:.1f}%)</div>'
                            f'<div class="bad">suggested: {_e(r["suggested"])} ({100 * r["p_suggested"]:.1f}%)</div>'),
                 "Most likely wrong first (out-of-fold confident learning); all are in label_issues.csv."),
        _figures("outliers", "Outliers", audit.outliers, thumb,
                 lambda r: (f'<div>{_e(r["class"])}; nearest: {_e(r["nearest_class"])}</div>'
                            f'<div class="{"bad" if r["flagged"] else "muted"}">distance {r["distance"]:.3f}</div>'),
                 "Farthest from every class centroid first; all listed are in outliers.csv."),
        f"</main><script>{_SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _settings(settings: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in settings.items())
    return f"<table>{rows}</table>"


def _classes(audit: "Audit") -> str:
    counts = audit.manifest.counts()
    splits = list(counts)
    issues: dict[str, int] = {}
    for r in audit.label_issues:
        issues[r["given"]] = issues.get(r["given"], 0) + 1
    dups: dict[str, int] = {}
    for g in audit.near_duplicates:
        for c in g["classes"]:
            dups[c] = dups.get(c, 0) + 1
    head = "".join(f'<th data-type="{t}">{_e(h)}</th>' for h, t in
                   [("class", "text"), *((s, "num") for s in splits), ("near-duplicates", "num"), ("label issues", "num")])
    body = []
    for c in audit.manifest.classes:
        cells = [counts[s][c] for s in splits] + [dups.get(c, 0), issues.get(c, 0)]
        body.append(f'<tr><td data-v="{_e(c)}">{_e(c)}</td>'
                    + "".join(f'<td class="n" data-v="{v}">{v}</td>' for v in cells) + "</tr>")
    return ('<section id="classes"><h2>Per class</h2>'
            '<input type="search" placeholder="filter classes" data-filter="classes-table">'
            f'<div class="scroll"><table id="classes-table" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></section>')


def _figure(path: str, thumb, caption: str) -> str:
    data = thumb(path)
    image = (f'<img alt="{_e(path)}" src="{_data_uri(data, "image/jpeg")}">' if data
             else '<div class="muted">(image unreadable)</div>')
    return (f'<figure title="{_e(path)}">{image}<figcaption>{caption}'
            f'<div class="muted">{_e(path)}</div></figcaption></figure>')


def _duplicates(groups: Sequence[Mapping[str, Any]], thumb, total: int) -> str:
    if not groups:
        return '<section id="near-duplicates"><h2>Near-duplicates</h2><p>None found.</p></section>'
    blocks = []
    for g in groups:
        title = f'group {g["group"]}' + (' <b class="bad">LEAK across splits</b>' if g["leak"] else "")
        figures = "".join(_figure(p, thumb, f"<div>{_e(s)} / {_e(c)}</div>")
                          for p, s, c in zip(g["paths"], g["splits"], g["classes"]))
        blocks.append(f'<h3>{title}</h3><div class="grid">{figures}</div>')
    return ('<section id="near-duplicates"><h2>Near-duplicates</h2>'
            f'<p class="muted">{total} group(s), leaking ones first; all are in near_duplicates.csv.</p>'
            f'{"".join(blocks)}</section>')


def _figures(section: str, title: str, rows: Sequence[Mapping[str, Any]], thumb, caption, note: str) -> str:
    if not rows:
        return f'<section id="{section}"><h2>{title}</h2><p>None found.</p></section>'
    figures = "".join(_figure(r["path"], thumb, f'<div class="muted">{_e(r["split"])}</div>' + caption(r))
                      for r in rows[:TOP])
    return (f'<section id="{section}"><h2>{title}</h2><p class="muted">{_e(note)}</p>'
            f'<div class="grid">{figures}</div></section>')
