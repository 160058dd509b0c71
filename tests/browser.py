"""Render a self-contained page (report.html, audit.html) in headless Chromium and check it after its scripts ran.

The page is copied with two scripts added: one first in ``<head>`` that records script errors and dialogs
(which would otherwise block headless Chromium), and one at the end of ``<body>`` that, once the page has
loaded, clicks the first numeric column of every sortable table twice, measures every image, and writes
what it saw as JSON into ``<pre id="browser-check">``.
One ``chromium --dump-dom --screenshot`` run returns the DOM after that and photographs the page.

Chromium missing is a skip, except where ``CI`` is set (``.ci/run`` installs it): there it fails.
"""
from __future__ import annotations

import html
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-dev-shm-usage", "--enable-logging=stderr", "--virtual-time-budget=10000"]
WINDOW = (1280, 2000)

_RECORD_ERRORS = """<script>window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
window.alert = window.confirm = window.prompt = function (m) { window.__errors.push("dialog: " + m); };</script>"""

_CHECK = """<script>window.addEventListener("load", function () {
  var out = {errors: window.__errors, scripts: document.scripts.length, tables: []};
  var images = Array.prototype.slice.call(document.images);
  out.images = images.map(function (i) {
    return {data: i.src.indexOf("data:image/") === 0, width: i.naturalWidth, loaded: i.complete};
  });
  out.handlers = Array.prototype.filter.call(document.querySelectorAll("*"), function (e) {
    return Array.prototype.some.call(e.attributes, function (a) { return a.name.indexOf("on") === 0; });
  }).length;
  out.cells = Array.prototype.map.call(document.querySelectorAll("td"), function (td) { return td.textContent; });
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    var column = function (c) {
      return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return Number(r.cells[c].dataset.v); });
    };
    for (var c = 0; c < heads.length; c++) {
      if (heads[c].dataset.type !== "num" || new Set(column(c)).size < 2) continue;
      var before = column(c);
      heads[c].click(); var first = column(c);
      heads[c].click(); var second = column(c);
      out.tables.push({id: table.id, column: heads[c].textContent, before: before, first: first, second: second});
      break;
    }
  });
  var pre = document.createElement("pre");
  pre.id = "browser-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def chromium() -> str:
    """The Chromium executable; skips the test without one, fails it where ``CI`` is set."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Chromium is not installed (.ci/run installs it with apt)")
        pytest.skip("needs chromium or chromium-browser on PATH (set CI to make this a failure)")
    return path


def render(page: Path, tmp_path: Path) -> tuple[dict, np.ndarray, str]:
    """Load ``page`` in headless Chromium.

    Returns:
        ``(checks, screenshot, stderr)``: the JSON the check script wrote, the screenshot as an RGB array of
        :data:`WINDOW` size, and Chromium's log.
    """
    browser = chromium()
    text = page.read_text(encoding="utf-8")
    assert text.count("<head>") == 1 and text.count("</body>") == 1
    harness = tmp_path / f"harness-{page.name}"
    harness.write_text(text.replace("<head>", "<head>" + _RECORD_ERRORS).replace("</body>", _CHECK + "</body>"),
                       encoding="utf-8")
    flags = [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    url = harness.resolve().as_uri()
    shot_path = tmp_path / f"{page.stem}.png"
    done = subprocess.run([browser, *flags, "--dump-dom", f"--screenshot={shot_path}", "--hide-scrollbars",
                           f"--window-size={WINDOW[0]},{WINDOW[1]}", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    start = done.stdout.find('<pre id="browser-check">')
    assert start >= 0, f"the check script did not run:\n{done.stderr[-2000:]}"
    payload = done.stdout[start + len('<pre id="browser-check">'):done.stdout.index("</pre>", start)]
    screenshot = np.asarray(Image.open(io.BytesIO(shot_path.read_bytes())).convert("RGB"))
    return json.loads(html.unescape(payload)), screenshot, done.stderr


def assert_page_works(checks: dict, screenshot: np.ndarray, log: str, *, tables: int, literal: str) -> None:
    """What every self-contained page must show in a browser.

    Args:
        checks, screenshot, log: from :func:`render`.
        tables: how many sortable tables with a numeric column of differing values the page has.
        literal: a data string with HTML in it (a class name) that must show as the text of a table cell.
    """
    assert checks["errors"] == [] and "Uncaught" not in log  # the page's script ran without errors
    assert checks["scripts"] == 3  # the page's own and the two the harness added: none from the data
    assert checks["handlers"] == 0  # no element carries an on...= attribute (e.g. from <img onerror=...>)
    assert literal in checks["cells"]  # the class name is text in a cell, not markup
    images = checks["images"]
    assert images and all(i["data"] and i["loaded"] and i["width"] > 0 for i in images), images
    assert len(checks["tables"]) == tables
    for table in checks["tables"]:  # one click sorts ascending, the next descending
        assert table["first"] == sorted(table["before"]), table
        assert table["second"] == sorted(table["before"], reverse=True), table
        assert table["first"] != table["second"]
    assert screenshot.shape == (WINDOW[1], WINDOW[0], 3)
    grey = screenshot.mean(axis=2)
    assert grey.std() > 10  # not a blank page
    assert len(np.unique(screenshot.reshape(-1, 3)[::7], axis=0)) > 200  # text and pictures, not flat fills
    assert grey[:300].std() > 5  # the heading and the first section are drawn at the top
