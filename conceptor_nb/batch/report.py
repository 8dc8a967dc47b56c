"""A static, offline HTML gallery of a batch (``conceptor report``): one file, pictures as data URIs.

Per concept: the word picture, the top-k table, the concept images above the pseudo-token's
reconstructions (same seeds), and the run's status; the index table sorts by a few lines of JavaScript.
"""
from __future__ import annotations

import base64
import html
from io import BytesIO
from pathlib import Path

from matplotlib.figure import Figure

from ..method.decomposition import Decomposition
from ..io import atomic_write
from ..viz import word_picture
from .runner import summary_rows

SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) { th.addEventListener("click", function () {
  var table = th.closest("table"), body = table.tBodies[0], asc = th.getAttribute("data-order") !== "asc";
  table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
  th.setAttribute("data-order", asc ? "asc" : "desc");
  Array.prototype.slice.call(body.rows).sort(function (a, b) {
    var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
    var nx = parseFloat(x), ny = parseFloat(y), c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return asc ? c : -c;
  }).forEach(function (r) { body.appendChild(r); });
}); });
"""
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; } table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .2em .6em; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; background: #f0f0f0; } .label { font-size: .85em; color: #555; }
table.sortable th[data-order=asc]::after { content: " \\25B2"; } table.sortable th[data-order=desc]::after { content: " \\25BC"; }
.card { border: 1px solid #bbb; border-radius: 6px; padding: 1em; margin: 1em 0; }
.card.failed { border-color: #c33; background: #fff4f4; } .row { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
.images img { display: block; max-width: 100%; image-rendering: pixelated; margin-bottom: .3em; }
"""
IMAGES = (("concept", "concept images"), ("reconstruction", "reconstructions from the top tokens (same seeds)"))
e = html.escape


def _img(png: bytes, cls: str, alt: str) -> str:
    return f'<img class="{cls}" alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _word_picture_png(dec, k: int) -> bytes:
    fig = Figure(figsize=(5, 2.2))  # no pyplot: the notebook's backend and figures are left alone
    word_picture(dec, k=min(k, 8), ax=fig.subplots())
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _fmt(v, digits: int = 3) -> str:
    return "" if v is None or v != v else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cell(v, digits: int = 3, num: bool = False) -> str:
    sort = "" if v is None or v != v else str(v)
    cls = ' class="num"' if num else ""
    return f'<td{cls} data-v="{e(sort)}">{e(_fmt(v, digits))}</td>'


def _card(out: Path, r: dict, top: int) -> str:
    slug, concept, status = r["slug"], r["concept"] or r["slug"], r["status"]
    head = f'<section class="card {e(status)}" id="c-{e(slug)}" data-concept="{e(concept)}"><h2>{e(concept)}</h2>'
    if status != "done":
        err = e(r.get("error") or "")
        return head + f"<p>status: <b>{e(status)}</b></p>" + (f"<pre>{err}</pre>" if err else "") + "</section>"
    dec = Decomposition.load(out / slug)
    table = "".join(f'<tr><td class="num">{int(t.rank)}</td><td>{e(str(t.token))}</td>'
                    f'<td class="num">{t.coefficient:.4f}</td><td class="num">{t.share:.1%}</td></tr>'
                    for t in dec.to_frame(top).itertuples())
    imgs = "".join(f'<div class="label">{label}</div>' + _img((out / slug / f"{name}.png").read_bytes(), name,
                                                              f"{concept}: {label}")
                   for name, label in IMAGES if (out / slug / f"{name}.png").exists())
    return (head + f'<div class="label">model {e(dec.model)}, settings {e(str(r.get("settings_hash")))}, '
            f"best validation step {e(_fmt(r.get('best_step')))} (score {e(_fmt(r.get('best_score')))})</div>"
            f'<div class="row"><div>{_img(_word_picture_png(dec, top), "words", f"{concept}: word picture")}'
            '<table class="top"><thead><tr><th>#</th><th>token</th><th>coefficient</th><th>share</th></tr></thead>'
            f'<tbody>{table}</tbody></table></div><div class="images">{imgs}</div></div></section>')


def _index_row(r: dict) -> str:
    concept = r["concept"] or r["slug"]
    tops = ", ".join(str(r.get(f"token_{i}")) for i in range(1, 4) if r.get(f"token_{i}"))
    return (f'<tr><td data-v="{e(concept)}"><a href="#c-{e(r["slug"])}">{e(concept)}</a></td>' + _cell(r["status"])
            + _cell(tops) + _cell(r.get("best_score"), 3, True) + _cell(r.get("best_step"), 0, True)
            + _cell(r.get("wall_s"), 1, True) + _cell(r.get("unet_total"), 0, True) + _cell(r.get("settings_hash"))
            + "</tr>")


def build_report(out, html_path=None, *, top: int = 10, title: str | None = None) -> Path:
    """Write the gallery of the batch in ``out`` to ``html_path`` (default ``out/index.html``); returns its path."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"no batch folder {out}")
    if not (rows := summary_rows(out)):
        raise FileNotFoundError(f"no concept folders in {out} (run `conceptor batch` first)")
    title = title or f"Conceptor batch: {out.resolve().name}"
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>{CSS}</style></head><body>
<h1>{e(title)}</h1>
<p>{sum(r['status'] == 'done' for r in rows)} of {len(rows)} concepts done. Click a column header to sort.</p>
<table class="sortable" id="index"><thead><tr><th>concept</th><th>status</th><th>top tokens</th><th>best score</th>
<th>best step</th><th>wall s</th><th>UNet evals</th><th>settings</th></tr></thead>
<tbody>{"".join(_index_row(r) for r in rows)}</tbody></table>
{"".join(_card(out, r, top) for r in rows)}
<script>{SORT_JS}</script>
</body></html>
"""
    html_path = Path(html_path) if html_path else out / "index.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(html_path, doc)
