"""A static, offline HTML gallery of a batch (``conceptor report``): one file, pictures as data URIs.

Per concept: the word picture, the top-k table, the concept images above the pseudo-token's
reconstructions (same seeds), and the run's status; the index table sorts by a few lines of JavaScript.
``compare=``: two runs (or the concepts two batches share) side by side, with their comparison.
"""
from __future__ import annotations

import base64
import html
from io import BytesIO
from pathlib import Path

from matplotlib.figure import Figure

from ..method.decomposition import Decomposition
from ..method.transfer import compare as compare_decs
from ..io import atomic_write, slug as slugify
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
.pair > .row > .card { flex: 1 1 0; min-width: 20em; } .up { color: #b22; } .down { color: #226; }
"""
IMAGES = (("concept", "concept images"), ("reconstruction", "reconstructions from the top tokens (same seeds)"))
e = html.escape


def _img(png: bytes, cls: str, alt: str) -> str:
    return f'<img class="{cls}" alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _png(draw, figsize=(5, 2.2)) -> bytes:
    fig = Figure(figsize=figsize)  # no pyplot: the notebook's backend and figures are left alone
    draw(fig.subplots())
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _fmt(v, digits: int = 3) -> str:
    return "" if v is None or v != v else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cell(v, digits: int = 3, num: bool = False) -> str:
    sort = "" if v is None or v != v else str(v)
    cls = ' class="num"' if num else ""
    return f'<td{cls} data-v="{e(sort)}">{e(_fmt(v, digits))}</td>'


def _card(out: Path, r: dict, top: int, side: str = "") -> str:
    slug, concept, status = r["slug"], r["concept"] or r["slug"], r["status"]
    head = f'<section class="card {e(status)}" id="c{side}-{e(slug)}" data-concept="{e(concept)}"><h2>{e(concept)}</h2>'
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
    lora, words = dec.history.get("lora") or {}, f"{concept}: word picture"
    model = dec.model + (f" + LoRA {lora['lora']} x{lora['scale']:g}" if lora else "")
    return (head + f'<div class="label">model {e(model)}, settings {e(str(r.get("settings_hash")))}, '
            f"best validation step {e(_fmt(r.get('best_step')))} (score {e(_fmt(r.get('best_score')))})</div>"
            f'<div class="row"><div>{_img(_png(lambda ax: word_picture(dec, k=min(top, 8), ax=ax)), "words", words)}'
            '<table class="top"><thead><tr><th>#</th><th>token</th><th>coefficient</th><th>share</th></tr></thead>'
            f'<tbody>{table}</tbody></table></div><div class="images">{imgs}</div></div></section>')


def _index_row(r: dict) -> str:
    concept = r["concept"] or r["slug"]
    tops = ", ".join(str(r.get(f"token_{i}")) for i in range(1, 4) if r.get(f"token_{i}"))
    return (f'<tr><td data-v="{e(concept)}"><a href="#c-{e(r["slug"])}">{e(concept)}</a></td>' + _cell(r["status"])
            + _cell(tops) + _cell(r.get("best_score"), 3, True) + _cell(r.get("best_step"), 0, True)
            + _cell(r.get("wall_s"), 1, True) + _cell(r.get("unet_total"), 0, True) + _cell(r.get("clip_similarity"), 3, True)
            + _cell(r.get("settings_hash"))
            + "</tr>")


def _pair(a: Path, b: Path, top: int) -> str:
    """Two run folders side by side, then their comparison (``method.transfer.compare``): table and bars."""
    c = compare_decs(Decomposition.load(a), Decomposition.load(b))
    f = c.to_frame()
    rows = "".join(f'<tr><td>{e(str(t.token))}</td><td class="num">{t.a:.3f}</td><td class="num">{t.b:.3f}</td>'
                   f'<td class="num {"up" if t.diff > 0 else "down"}">{t.diff:+.3f}</td><td class="num">{_fmt(t.error)}</td>'
                   f'<td>{"no error bars" if t.exceeds_spread is None else "yes" if t.exceeds_spread else "no"}</td></tr>'
                   for t in f.itertuples())
    cards = "".join(_card(d.parent, {"slug": d.name, "concept": f"{label}: {d.name}", "status": "done"}, top, side)
                    for d, label, side in ((a, c.label_a, "a"), (b, c.label_b, "b")))
    plot = _img(_png(c.plot, (6, 0.3 * len(f) + 1.2)), "compare", f"{c.label_a} against {c.label_b}")
    return (f'<section class="pair" id="p-{e(a.name)}"><div class="row">{cards}</div><h3>share of the top tokens: '
            f'{e(c.label_a)} (a) and {e(c.label_b)} (b)</h3><div class="row"><table class="compare"><thead><tr><th>token</th>'
            f'<th>a</th><th>b</th><th>b - a</th><th>2 sd</th><th>beyond the spread</th></tr></thead><tbody>{rows}'
            f'</tbody></table>{plot}</div>{f"<p>{e(c.note)}</p>" if c.note else ""}</section>')


def build_report(out, html_path=None, *, top: int = 10, title: str | None = None, compare=None) -> Path:
    """Write the gallery of the batch in ``out`` to ``html_path`` (default ``out/index.html``); returns its path.
    ``compare``: another run folder (``out`` being one) or batch folder: the two side by side (for batches, every
    concept done in both), default file ``out/compare-<name>.html``."""
    out = Path(out)
    if compare is not None:
        return _build_comparison(out, Path(compare), html_path, top, title)
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
<th>best step</th><th>wall s</th><th>UNet evals</th><th>faithfulness</th><th>settings</th></tr></thead>
<tbody>{"".join(_index_row(r) for r in rows)}</tbody></table>
{"".join(_card(out, r, top) for r in rows)}
<script>{SORT_JS}</script>
</body></html>
"""
    html_path = Path(html_path) if html_path else out / "index.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(html_path, doc)


def _build_comparison(a: Path, b: Path, html_path, top: int, title: str | None) -> Path:
    runs = [(a / "decomposition.json").is_file(), (b / "decomposition.json").is_file()]
    if runs[0] != runs[1] or not all(d.is_dir() for d in (a, b)):
        raise FileNotFoundError(f"compare two run folders or two batch folders: {a} and {b}")
    if runs[0]:
        pairs = [(a, b)]
    else:
        done = [{r["slug"] for r in summary_rows(d) if r["status"] == "done"} for d in (a, b)]
        pairs = [(a / s, b / s) for s in sorted(done[0] & done[1])]
        if not pairs:
            raise FileNotFoundError(f"{a} and {b} have no finished concept in common")
    title = title or f"Conceptor: {a.resolve().name} and {b.resolve().name}"
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style>'
           f'</head><body>\n<h1>{e(title)}</h1>\n{"".join(_pair(x, y, top) for x, y in pairs)}\n</body></html>\n')
    html_path = Path(html_path) if html_path else a / f"compare-{slugify(b.resolve().name)}.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(html_path, doc)
