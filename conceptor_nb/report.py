"""A static, offline HTML gallery of a batch: ``conceptor report runs/ --html runs/index.html``.

One file, no server and no network: the pictures are embedded as data URIs and the index table is
sorted by a few lines of inline JavaScript. Per concept: the word picture, the top-k table, the
concept images above the pseudo-token's reconstructions (same seeds), and the run's status.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var asc = th.getAttribute("data-order") !== "asc";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", asc ? "asc" : "desc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .2em .6em; text-align: left; }
table.sortable th { cursor: pointer; background: #f0f0f0; }
table.sortable th[data-order=asc]::after { content: " \\25B2"; }
table.sortable th[data-order=desc]::after { content: " \\25BC"; }
.card { border: 1px solid #bbb; border-radius: 6px; padding: 1em; margin: 1em 0; }
.card.failed { border-color: #c33; background: #fff4f4; }
.row { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
.images img { display: block; max-width: 100%; image-rendering: pixelated; margin-bottom: .3em; }
.label { font-size: .85em; color: #555; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _word_picture_png(dec, k: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .viz import word_picture

    fig, ax = plt.subplots(figsize=(5, 2.2))
    word_picture(dec, k=min(k, 8), ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(v, digits: int = 3, num: bool = False) -> str:
    sort = "" if v is None or (isinstance(v, float) and v != v) else str(v)
    cls = ' class="num"' if num else ""
    return f'<td{cls} data-v="{html.escape(sort)}">{html.escape(_fmt(v, digits))}</td>'


def _rows(out: Path) -> list[dict]:
    from .batch import summary_row

    order = []
    if (out / "summary.json").exists():
        order = [r["slug"] for r in json.loads((out / "summary.json").read_text())["rows"]]
    found = {p.parent.name for p in out.glob("*/decomposition.json")} | {p.parent.name for p in out.glob("*/batch.json")}
    slugs = [s for s in order if s in found or (out / s).is_dir()] + sorted(found - set(order))
    return [summary_row(out, s) for s in slugs]


def build_report(out, html_path=None, *, top: int = 10, title: str | None = None) -> Path:
    """Write the gallery of the batch in ``out`` to ``html_path`` (default ``out/index.html``); returns its path."""
    from .conceptor import Decomposition

    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"no batch folder {out}")
    html_path = Path(html_path) if html_path else out / "index.html"
    rows = _rows(out)
    if not rows:
        raise FileNotFoundError(f"no concept folders in {out} (run `conceptor batch` first)")
    title = title or f"Conceptor batch: {out.resolve().name}"
    index, cards = [], []
    for r in rows:
        slug, concept, status = r["slug"], r["concept"] or r["slug"], r["status"]
        tops = ", ".join(str(r.get(f"token_{i}")) for i in range(1, 4) if r.get(f"token_{i}"))
        index.append(
            "<tr>" + f'<td data-v="{html.escape(concept)}"><a href="#c-{html.escape(slug)}">{html.escape(concept)}</a></td>'
            + _cell(status) + _cell(tops) + _cell(r.get("best_score"), 3, True) + _cell(r.get("best_step"), 0, True)
            + _cell(r.get("wall_s"), 1, True) + _cell(r.get("unet_total"), 0, True) + _cell(r.get("settings_hash")) + "</tr>")
        if status != "done":
            err = html.escape(r.get("error") or "")
            cards.append(f'<section class="card {html.escape(status)}" id="c-{html.escape(slug)}" data-concept="{html.escape(concept)}">'
                         f"<h2>{html.escape(concept)}</h2><p>status: <b>{html.escape(status)}</b></p>"
                         + (f"<pre>{err}</pre>" if err else "") + "</section>")
            continue
        dec = Decomposition.load(out / slug)
        frame = dec.to_frame(top)
        table = "".join(f"<tr><td class=\"num\">{int(t.rank)}</td><td>{html.escape(str(t.token))}</td>"
                        f"<td class=\"num\">{t.coefficient:.4f}</td><td class=\"num\">{t.share:.1%}</td></tr>"
                        for t in frame.itertuples())
        imgs = ""
        for name, label in (("concept", "concept images"), ("reconstruction", "reconstructions from the top tokens (same seeds)")):
            f = out / slug / f"{name}.png"
            if f.exists():
                imgs += (f'<div class="label">{label}</div><img class="{name}" alt="{html.escape(concept)}: {label}" '
                         f'src="{_data_uri(f.read_bytes())}">')
        cards.append(
            f'<section class="card done" id="c-{html.escape(slug)}" data-concept="{html.escape(concept)}">'
            f"<h2>{html.escape(concept)}</h2>"
            f'<div class="label">model {html.escape(dec.model)}, settings {html.escape(str(r.get("settings_hash")))}, '
            f"best validation step {html.escape(_fmt(r.get('best_step')))} (score {html.escape(_fmt(r.get('best_score')))})</div>"
            f'<div class="row"><div><img class="words" alt="{html.escape(concept)}: word picture" '
            f'src="{_data_uri(_word_picture_png(dec, top))}">'
            f'<table class="top"><thead><tr><th>#</th><th>token</th><th>coefficient</th><th>share</th></tr></thead>'
            f"<tbody>{table}</tbody></table></div>"
            f'<div class="images">{imgs}</div></div></section>')
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{sum(r['status'] == 'done' for r in rows)} of {len(rows)} concepts done. Click a column header to sort.</p>
<table class="sortable" id="index"><thead><tr><th>concept</th><th>status</th><th>top tokens</th><th>best score</th>
<th>best step</th><th>wall s</th><th>UNet evals</th><th>settings</th></tr></thead>
<tbody>{"".join(index)}</tbody></table>
{"".join(cards)}
<script>{SORT_JS}</script>
</body></html>
"""
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(html_path)
    return html_path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="a static offline HTML gallery of a batch folder")
    p.add_argument("out", help="the batch folder (conceptor batch --out)")
    p.add_argument("--html", help="the HTML file to write (default: OUT/index.html)")
    p.add_argument("--top", type=int, default=10, help="tokens per concept in the tables")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    path = build_report(args.out, args.html, top=args.top)
    print(f"wrote {path}")
    return 0
