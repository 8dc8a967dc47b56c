"""The HTML gallery of a batch: self-contained, and rendered by a real headless Chromium."""
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conceptor_nb import batch
from conceptor_nb.batch.report import build_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str | None:
    for name in (os.environ.get("CONCEPTOR_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if name and Path(name).exists():
            return name
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipe, tiny_clip):
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPTOR_CACHE", str(root / "cache"))
        concepts = ["a dog", "a <cat> & friends", {"concept": "a broken one", "n_train": 0}]
        batch.decompose_many(tiny_pipe, concepts, root / "runs", clip=tiny_clip, verbose=False,
                             steps=4, n_train=4, val_every=2)
    return root / "runs"


def test_report_is_one_offline_file_with_every_concept(runs, tmp_path):
    page = build_report(runs, tmp_path / "gallery" / "index.html")
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from anywhere
    assert text.count('<section class="card done"') == 2 and text.count('<section class="card failed"') == 1
    assert "a &lt;cat&gt; &amp; friends" in text and "<cat>" not in text  # escaped
    assert "n_train must be an integer &gt;= 1" in text
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(srcs) == 2 * 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    # the top-10 table of a concept holds its first 10 tokens, in order
    dog = batch.load_decompositions(runs)["a dog"]
    card = re.split(r'id="c-a-dog(-[0-9a-f]{8})?"', text)[-1].split("</section>")[0]  # (the folder may end in a hash)
    assert re.findall(r"<tr><td class=\"num\">\d+</td><td>([^<]*)</td>", card) == dog.tokens[:10]


def test_report_command_writes_the_page(runs, tmp_path):
    out = tmp_path / "i.html"
    env = dict(os.environ, PYTHONPATH=str(Path(batch.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "conceptor_nb", "report", str(runs), "--html", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "a dog" in out.read_text()


def test_gallery_renders_in_headless_chromium(runs, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium); the gallery's browser check needs one")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    page_file = build_report(runs, tmp_path / "index.html")
    shots = Path(os.environ.get("CONCEPTOR_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            outside = []
            page.on("request", lambda req: outside.append(req.url) if not req.url.startswith(("file:", "data:")) else None)
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            cards = page.eval_on_selector_all("section.card", "els => els.map(e => e.dataset.concept)")
            assert sorted(cards) == sorted(["a dog", "a <cat> & friends", "a broken one"])
            images = page.eval_on_selector_all(
                "section.card.done img", "els => els.map(e => [e.className, e.complete, e.naturalWidth, e.naturalHeight])")
            assert len(images) == 6 and sorted(c for c, *_ in images) == ["concept", "concept", "reconstruction",
                                                                           "reconstruction", "words", "words"]
            assert all(done and w > 0 and h > 0 for _, done, w, h in images), images
            # concept images above the reconstructions, in every card
            tops = page.eval_on_selector_all("section.card.done", """els => els.map(e =>
                e.querySelector('img.concept').getBoundingClientRect().bottom
                <= e.querySelector('img.reconstruction').getBoundingClientRect().top)""")
            assert tops == [True, True]
            # the index sorts: by concept, then the other way
            names = lambda: page.eval_on_selector_all("#index tbody tr td:first-child", "els => els.map(e => e.innerText)")
            page.click("#index th:first-child")
            asc = names()
            assert asc == page.evaluate("xs => xs.slice().sort((a, b) => a.localeCompare(b))", asc)
            assert len(set(asc)) == 3
            page.click("#index th:first-child")
            assert names() == asc[::-1]
            assert outside == []
            page.screenshot(path=str(shots / "gallery.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "gallery.png").stat().st_size > 10_000


def test_report_never_replaces_an_existing_file_named_by_html(runs, capsys):
    """`conceptor report DIR --html DIR/a-dog/decomposition.json` once replaced a result with HTML (issue 25, item 3)."""
    from conceptor_nb.cli import main

    result = next(runs.glob("a-dog*")) / "decomposition.json"  # (the folder may end in a hash)
    before = result.read_bytes()
    assert main(["report", str(runs), "--html", str(result)]) == 2
    assert "exists" in capsys.readouterr().err and result.read_bytes() == before
    assert main(["report", str(runs)]) == 0 and main(["report", str(runs)]) == 0  # its own index.html: rewritten
    page = runs / "index.html"
    assert main(["report", str(runs), "--html", str(page), "--overwrite"]) == 0 and "a dog" in page.read_text()


def test_report_compare_shows_two_runs_side_by_side(runs, tmp_path, capsys):
    """Issue 24: two runs (or the concepts two batches share) side by side, with their comparison table and bars."""
    from conceptor_nb.cli import main

    dog_run, cat_run = (next(runs.glob(f"{name}*")) for name in ("a-dog", "a-cat-friends"))
    page = build_report(dog_run, tmp_path / "c.html", compare=cat_run)
    text = page.read_text()
    assert text.count('<section class="card done"') == 2
    assert f'id="ca-{dog_run.name}"' in text and f'id="cb-{cat_run.name}"' in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    table = text.split('<table class="compare">')[1].split("</table>")[0]
    dog, cat = (batch.load_decompositions(runs)[c] for c in ("a dog", "a <cat> & friends"))
    tokens = set(re.findall(r"<tr><td>([^<]*)</td>", table))
    assert tokens == {html.escape(t) for t in dog.tokens[:dog.n_tokens] + cat.tokens[:cat.n_tokens]}
    assert "no error bars" in table  # one fit each: said, not invented
    assert len(re.findall(r'<img class="compare"', text)) == 1
    # two batch folders: every concept done in both (here a batch against itself)
    both = build_report(runs, tmp_path / "b.html", compare=runs).read_text()
    assert both.count('<section class="pair"') == 2
    assert main(["report", str(dog_run), "--compare", str(cat_run)]) == 0
    assert (dog_run / f"compare-{cat_run.name}.html").exists()
    assert main(["report", str(dog_run), "--compare", str(runs)]) == 1  # a run against a batch: refused
    assert "two run folders or two batch folders" in capsys.readouterr().err
