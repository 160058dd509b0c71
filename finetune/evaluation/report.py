"""``report.html``: one self-contained page summarising an evaluation.

The page opens offline: styles and the few lines of script (table sorting and filtering, image zoom) are
inline, images are ``data:`` URIs, no font or script is fetched. Every piece of text that comes from the
data (class names, file paths, error messages, training-log values) is HTML-escaped, so a class folder
named ``<img src=x onerror=alert(1)>`` shows as that text.
"""
from __future__ import annotations

import base64
import html
from typing import Any, Mapping, Sequence

# Section ids, in page order; tests check that each is present.
SECTIONS = ("summary", "confusion", "per-class", "most-confused", "misclassified", "correct", "training", "details")

_HEADLINE = (
    ("accuracy", "Accuracy", "pct"),
    ("top5_accuracy", "Top-5 accuracy", "pct"),
    ("balanced_accuracy", "Balanced accuracy", "pct"),
    ("macro_f1", "Macro F1", "num"),
    ("macro_precision", "Macro precision", "num"),
    ("macro_recall", "Macro recall", "num"),
    ("weighted_f1", "Weighted F1", "num"),
    ("ece", "Calibration error (ECE)", "num"),
    ("loss", "Loss (NLL)", "num"),
    ("num_samples", "Images", "int"),
)

# The page style and script, shared by every self-contained page (report.html, audit.html).
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f6f8}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
nav a{margin-right:14px;color:#3451b2;text-decoration:none}
.muted{color:#6e6e73}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #e2e2e6;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#6e6e73;font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #e2e2e6;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none;background:#f0f0f4}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
.scroll{overflow:auto;max-height:80vh;border:1px solid #e2e2e6;background:#fff}
img.zoom{max-width:100%;cursor:zoom-in;display:block}img.zoom.full{max-width:none;cursor:zoom-out}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.figs{display:flex;flex-wrap:wrap;gap:16px}.figs>div{flex:1 1 520px;min-width:0}h3{font-size:15px;margin:12px 0 6px}
figure{margin:0;width:170px;background:#fff;border:1px solid #e2e2e6;border-radius:6px;padding:6px;overflow-wrap:anywhere}
figure img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
figcaption{font-size:12px}.bad{color:#b42318}.good{color:#067647}
input[type=search]{padding:4px 8px;margin:6px 0;width:260px}
"""

_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.dataset.dir !== "asc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = asc ? "asc" : "desc";
      var num = th.dataset.type === "num", body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        return (num ? x - y : x.localeCompare(y)) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.querySelectorAll("input[data-filter]").forEach(function (input) {
  var table = document.getElementById(input.dataset.filter);
  input.addEventListener("input", function () {
    var q = input.value.toLowerCase();
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      r.style.display = r.cells[0].textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none";
    });
  });
});
document.querySelectorAll("img.zoom").forEach(function (img) {
  img.addEventListener("click", function () { img.classList.toggle("full"); });
});
"""


def render_report(
    *,
    title: str,
    metrics: Mapping[str, Any],
    per_class: Sequence[Mapping[str, Any]],
    most_confused: Sequence[tuple[str, str, int]],
    misclassified: Sequence[Mapping[str, Any]],
    confusion_figures: Sequence[tuple[str, bytes]],
    training_curves: bytes | None = None,
    training_log: Sequence[Mapping[str, str]] = (),
    details: Mapping[str, Any] | None = None,
    unreadable: Sequence[tuple[str, str]] = (),
    correct: Sequence[Mapping[str, Any]] = (),
    explanation_note: str = "",
    reliability: bytes | None = None,
) -> str:
    """The HTML text of the report.

    Args:
        title: the page title (escaped).
        metrics: the headline metrics (:func:`~finetune.evaluation.classification_metrics` keys).
        per_class: rows of :func:`~finetune.evaluation.per_class_rows`.
        most_confused: ``(true, predicted, count)`` pairs, most frequent first.
        misclassified: the worst misclassifications, worst first: dicts with ``path``, ``true``,
            ``predicted``, ``confidence``, ``thumbnail`` (JPEG bytes, or ``None`` when unreadable) and
            optionally ``heatmap`` (JPEG bytes of the image with its class-activation map), shown instead.
        confusion_figures: ``(caption, PNG bytes)`` of the confusion-matrix plots.
        training_curves: the run's ``training_curves.png``, when the checkpoint comes from a run.
        training_log: the run's ``metrics.csv`` rows, when the checkpoint comes from a run.
        details: what was evaluated (checkpoint, data, split, ...), shown as a key/value table.
        unreadable: ``(path, reason)`` of images that could not be read and were left out.
        correct: a sample of correct predictions per class, as ``misclassified`` (``heatmap``, no
            ``thumbnail``).
        explanation_note: what the heat-maps show (or why there are none), above both galleries.
        reliability: the reliability diagram (PNG), shown in the summary. The summary also compares
            ``metrics["tta"]`` (test-time augmentation) and ``metrics["calibration"]`` (before and after the
            temperature) with the plain metrics when present.

    Returns:
        The complete HTML document.
    """
    return html_page(title, SECTIONS, [
        _summary(metrics, len(unreadable), _calibration_and_tta(metrics, reliability)),
        _confusion(confusion_figures),
        _per_class(per_class),
        _most_confused(most_confused),
        _misclassified(misclassified, explanation_note),
        _correct(correct, explanation_note),
        _training(training_curves, training_log),
        _details(details or {}, unreadable),
    ])


def html_page(title: str, sections: Sequence[str], body: Sequence[str]) -> str:
    """A self-contained page: ``title``, a navigation bar to the ``sections`` ids, the ``body`` parts (HTML),
    the shared stylesheet and the table-sorting script."""
    nav = "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in sections)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{escape(title)}</h1><nav>{nav}</nav>",
        *body,
        f"</main><script>{_SCRIPT}</script></body></html>",
    ]) + "\n"


def escape(value: Any) -> str:
    """``str(value)`` HTML-escaped, quotes included (safe in text and in attribute values)."""
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    """``data`` as an inline ``data:`` URI, so a page needs no file beside it."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _format(value: Any, kind: str) -> str:
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "int":
        return f"{int(value):,}"
    return f"{value:.4f}"


def _summary(metrics: Mapping[str, Any], num_unreadable: int, extra: str = "") -> str:
    cards = "".join(
        f'<div class="card"><b>{_format(metrics[key], kind)}</b><span>{label}</span></div>'
        for key, label, kind in _HEADLINE if key in metrics
    )
    note = (f'<p class="bad">{num_unreadable} unreadable image(s) were left out; see '
            f'<a href="#details">details</a>.</p>' if num_unreadable else "")
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{cards}</div>{note}{extra}</section>'


def _calibration_and_tta(metrics: Mapping[str, Any], reliability: bytes | None) -> str:
    """Side-by-side tables: without and with test-time augmentation; before and after calibration; and the
    reliability diagram."""
    parts = []
    tta = metrics.get("tta")
    if tta:
        rows = "".join(
            f"<tr><td>{label}</td><td class=n>{_format(metrics[key], kind)}</td>"
            f"<td class=n>{_format(tta[key], kind)}</td></tr>"
            for key, label, kind in _HEADLINE if key in tta and key in metrics
        )
        parts.append(f"<h3>Test-time augmentation ({escape(tta['views'])})</h3><table><thead><tr><th>metric</th>"
                     f"<th>without TTA</th><th>with TTA</th></tr></thead><tbody>{rows}</tbody></table>")
    calibration = metrics.get("calibration")
    if calibration:
        parts.append(
            f"<h3>Calibration (temperature {calibration['temperature']:.4f})</h3><table><thead><tr><th>metric</th>"
            f"<th>before (T = 1)</th><th>after</th></tr></thead><tbody>"
            f"<tr><td>Calibration error (ECE)</td><td class=n>{calibration['ece_before']:.4f}</td>"
            f"<td class=n>{calibration['ece_after']:.4f}</td></tr>"
            f"<tr><td>Loss (NLL)</td><td class=n>{calibration['loss_before']:.4f}</td>"
            f"<td class=n>{calibration['loss_after']:.4f}</td></tr></tbody></table>")
    if reliability:
        parts.append(f'<h3>Reliability diagram</h3><img alt="reliability diagram" '
                     f'src="{data_uri(reliability, "image/png")}">')
    return "".join(parts)


def _confusion(figures: Sequence[tuple[str, bytes]]) -> str:
    blocks = "".join(
        f'<div><h3>{escape(caption)}</h3><div class="scroll"><img class="zoom" alt="{escape(caption)}" '
        f'src="{data_uri(png, "image/png")}"></div></div>'
        for caption, png in figures
    )
    return (
        '<section id="confusion"><h2>Confusion matrix</h2>'
        '<p class="muted">Rows are true classes, columns predictions. Click a plot to see it at full size.</p>'
        f'<div class="figs">{blocks}</div></section>'
    )


def _per_class(rows: Sequence[Mapping[str, Any]]) -> str:
    body = []
    for r in sorted(rows, key=lambda r: (r["f1"], r["class"])):
        confusion = f'{escape(r["top_confusion"])} ({r["top_confusion_count"]})' if r["top_confusion"] else ""
        body.append(
            f'<tr><td data-v="{escape(r["class"])}">{escape(r["class"])}</td>'
            + "".join(f'<td class="n" data-v="{r[k]:.6f}">{r[k]:.3f}</td>' for k in ("f1", "precision", "recall"))
            + f'<td class="n" data-v="{r["support"]}">{r["support"]}</td>'
            f'<td data-v="{escape(r["top_confusion"])}">{confusion}</td></tr>'
        )
    head = "".join(
        f'<th data-type="{kind}">{label}</th>'
        for label, kind in (("class", "text"), ("F1", "num"), ("precision", "num"), ("recall", "num"),
                            ("support", "num"), ("most often predicted instead", "text"))
    )
    return (
        '<section id="per-class"><h2>Per class</h2>'
        '<p class="muted">Worst F1 first; click a column heading to sort by it.</p>'
        '<input type="search" placeholder="filter classes" data-filter="per-class-table">'
        f'<div class="scroll"><table id="per-class-table" class="sortable"><thead><tr>{head}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table></div></section>'
    )


def _most_confused(pairs: Sequence[tuple[str, str, int]]) -> str:
    if not pairs:
        return '<section id="most-confused"><h2>Most confused pairs</h2><p>No misclassification.</p></section>'
    body = "".join(
        f'<tr><td>{escape(t)}</td><td>{escape(p)}</td><td class="n">{c}</td></tr>' for t, p, c in pairs
    )
    return (
        '<section id="most-confused"><h2>Most confused pairs</h2>'
        '<div class="scroll"><table><thead><tr><th>true</th><th>predicted</th><th>count</th></tr></thead>'
        f"<tbody>{body}</tbody></table></div></section>"
    )


def _misclassified(items: Sequence[Mapping[str, Any]], note: str = "") -> str:
    if not items:
        return '<section id="misclassified"><h2>Worst misclassifications</h2><p>No misclassification.</p></section>'
    return (
        '<section id="misclassified"><h2>Worst misclassifications</h2>'
        f'<p class="muted">The most confident wrong predictions; all are in misclassified.csv. {escape(note)}</p>'
        f'<div class="grid">{"".join(_figure(item, "bad") for item in items)}</div></section>'
    )


def _correct(items: Sequence[Mapping[str, Any]], note: str) -> str:
    if not items:
        return '<section id="correct"><h2>Correct predictions</h2><p>No correct prediction.</p></section>'
    return (
        '<section id="correct"><h2>Correct predictions</h2>'
        f'<p class="muted">The most confident correct prediction of each class. {escape(note)}</p>'
        f'<div class="grid">{"".join(_figure(item, "good") for item in items)}</div></section>'
    )


def _figure(item: Mapping[str, Any], verdict: str) -> str:
    """A thumbnail (its heat-map version when there is one) with the true and predicted class."""
    picture, kind = (item["heatmap"], "heat-map") if item.get("heatmap") else (item.get("thumbnail"), "image")
    image = (f'<img class="{kind}" alt="{escape(item["path"])}" src="{data_uri(picture, "image/jpeg")}">'
             if picture else '<div class="muted">(image unreadable)</div>')
    true = f'<div class="good">true: {escape(item["true"])}</div>' if verdict == "bad" else ""
    return (
        f'<figure title="{escape(item["path"])}">{image}<figcaption>{true}'
        f'<div class="{verdict}">predicted: {escape(item["predicted"])} ({100 * item["confidence"]:.1f}%)</div>'
        f'<div class="muted">{escape(item["path"])}</div></figcaption></figure>'
    )


def _training(curves: bytes | None, log: Sequence[Mapping[str, str]]) -> str:
    if curves is None and not log:
        return ('<section id="training"><h2>Training</h2><p class="muted">The checkpoint does not come from a '
                "run folder, so there are no training curves.</p></section>")
    parts = ['<section id="training"><h2>Training</h2>']
    if curves is not None:
        parts.append(f'<img class="zoom" alt="training curves" src="{data_uri(curves, "image/png")}">')
    if log:
        columns = list(log[0])
        head = "".join(f"<th>{escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{escape(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in log)
        parts.append(f'<details><summary>metrics.csv ({len(log)} rows)</summary><div class="scroll"><table>'
                     f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div></details>")
    parts.append("</section>")
    return "".join(parts)


def _details(details: Mapping[str, Any], unreadable: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in details.items())
    parts = [f'<section id="details"><h2>Details</h2><table>{rows}</table>']
    if unreadable:
        items = "".join(f"<li>{escape(path)}: {escape(reason)}</li>" for path, reason in unreadable)
        parts.append(f'<h3>Unreadable images ({len(unreadable)})</h3><ul>{items}</ul>')
    parts.append("</section>")
    return "".join(parts)
