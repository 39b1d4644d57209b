"""`advbench leaderboard --format html`: one self-contained page (the markdown's text and rows, every text
escaped, the robustness curves embedded, nothing fetched), and its tables sorted by a click in a real
browser: Debian's chromium, headless, driven over the DevTools protocol (tests/browser.py). A screenshot
is written for a person to look at (and copied to $ADVBENCH_SCREENSHOT_DIR when that is set)."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from typer.testing import CliRunner

from browser import Chromium, needs_chromium
from robustbench_lite import leaderboard as lb
from robustbench_lite.cli import app
from robustbench_lite.specs import CASCADE, PER_ATTACK, WEAK
from test_leaderboard import run_rows

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
SECTION = "mnist-5k · linf eps=0.3"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def entry(run_id, model, accs, worst, evaluation=WEAK, mode=PER_ATTACK, **kw):
    rows = run_rows(run_id, model, accs, worst, **kw)
    for r in rows:
        r.update(evaluation=evaluation, mode=mode)
    return rows


def board(results: Path) -> Path:
    """Four model entries at mnist-5k linf 0.3 (two reportable, two weak), two of them at 0.1 too, and one
    at l2 0.5: three tables, two robustness curves."""
    rows = []
    rows += entry("std-a", "wrn-28-10", {"apgd-ce": 0.50, "apgd-t": 0.451}, 0.451, "standard", CASCADE, clean=0.9,
                  sha="a1")
    rows += entry("std-b", "lenet", {"apgd-ce": 1.0, "apgd-t": 1.0}, 1.0, "standard", CASCADE, clean=1.0, sha="b2")
    rows += entry("weak-c", "alexnet", {"fgsm": 0.9, "pgd": 0.8}, 0.8, clean=1.0, sha="c3")
    rows += entry("weak-d", "smallcnn", {"fgsm": 0.3, "pgd": 0.095}, 0.095, sha="d4")
    rows += entry("weak-c1", "alexnet", {"fgsm": 0.95, "pgd": 0.9}, 0.9, clean=1.0, sha="c3", eps=0.1)
    rows += entry("weak-d1", "smallcnn", {"fgsm": 0.6, "pgd": 0.5}, 0.5, sha="d4", eps=0.1)
    rows += entry("l2-e", "<b>resnet</b>|x", {"pgd": 0.4}, 0.4, norm="l2", eps=0.5, sha="e5")
    lb.append(results, rows)
    return results


def test_html_page_has_the_markdowns_rows_escaped_and_the_curves_embedded(tmp_path):
    df = lb.read(board(tmp_path))
    md, page = lb.render_markdown(df), lb.render_html(df)
    assert page.startswith("<!DOCTYPE html>") and "<title>advbench leaderboard</title>" in page
    # every cell of every markdown table is in the page, in the same order: one renderer of the rows
    tables = re.findall(r"<tbody>(.*?)</tbody>", page, flags=re.S)
    md_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| # |")]
    html_rows = [re.findall(r"<td[^>]*>(.*?)</td>", tr) for t in tables for tr in re.findall(r"<tr>.*?</tr>", t)]
    assert len(html_rows) == len(md_rows) == 4 + 2 + 1
    first = html_rows[[r[0] for r in html_rows].index("1", 2)]  # the eps 0.3 table (the 3rd): its top row
    assert first[1:7] == ["lenet", "standard", "relu", "<code>b2</code>", "100", "standard (cascade)"]
    weak = next(r for r in html_rows if r[1] == "smallcnn" and r[-1] == "<code>weak-d</code>")
    assert weak[-2] == "≤ 9.50"  # a weak worst case is an upper bound, as in the markdown
    assert html.escape(lb.SELECTION_RULE.split("`")[0]) in page and "upper bound (marked ≤)" in page
    # the model name is text: escaped, its pipe kept (the markdown escapes it as \|)
    assert "&lt;b&gt;resnet&lt;/b&gt;|x" in page and "<b>resnet" not in page
    assert "| &lt;b&gt;resnet&lt;/b&gt;\\|x |" not in page
    # self-contained: one inline script, no link or external source; one curve per dataset x norm
    assert page.count("<script") == 1 and "<link" not in page and "http://" not in page and "https://" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == PNG for s in srcs)
    assert [h for h in re.findall(r"<h2>(.*?)</h2>", page)] == [
        "mnist-5k · l2: robustness curves", html.escape("mnist-5k · l2 eps=0.5"),
        "mnist-5k · linf: robustness curves", "mnist-5k · linf eps=0.1", html.escape(SECTION)]
    # right-aligned markdown columns sort as numbers in the page
    assert '<th class="num" tabindex="0" title="sort by worst case">worst case</th>' in page
    assert '<th tabindex="0" title="sort by model">model</th>' in page
    # the markdown file itself has no curves
    assert "robustness curves" not in (tmp_path / "leaderboard.md").read_text()


def test_cli_format_html_to_stdout_and_to_a_file(tmp_path):
    board(tmp_path)
    r = run("leaderboard", "--results-dir", tmp_path, "--format", "HTML", "--norm", "l2")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("<!DOCTYPE html>") and r.stdout.count("data:image/png;base64,") == 1
    assert "wrn-28-10" not in r.stdout  # the filter applies
    out = tmp_path / "site" / "leaderboard.html"
    r = run("leaderboard", "--results-dir", tmp_path, "--format", "html", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"wrote {out}\n"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n") and "wrn-28-10" in page
    assert [p.name for p in out.parent.iterdir()] == ["leaderboard.html"]  # no temp file left behind
    r = run("leaderboard", "--results-dir", tmp_path, "--format", "md", "--out", tmp_path / "lb.md")
    assert r.exit_code == 0 and (tmp_path / "lb.md").read_text() == (tmp_path / "leaderboard.md").read_text()


def test_cli_html_errors_are_one_line(tmp_path):
    board(tmp_path)
    r = run("leaderboard", "--results-dir", tmp_path, "--format", "htm")
    assert r.exit_code == 2 and r.stderr == "error: invalid --format 'htm': expected md, csv, json or html\n"
    r = run("leaderboard", "--results-dir", tmp_path, "--format", "html", "--out", tmp_path)
    assert r.exit_code == 2
    assert r.stderr == (f"error: --out {tmp_path} is a directory, not a file: move it away or choose another "
                        f"path\n")
    r = run("leaderboard", "--results-dir", tmp_path / "none", "--format", "html", "--out", tmp_path / "x.html")
    assert r.exit_code == 0 and "no results yet in" in r.stderr
    assert "No results yet." in (tmp_path / "x.html").read_text()


def _number(cell: str) -> float:
    return float(cell.replace("≤", "").strip())


@needs_chromium
def test_clicking_a_header_sorts_the_table_in_chromium(tmp_path):
    page = tmp_path / "leaderboard.html"
    page.write_text(lb.render_html(lb.read(board(tmp_path / "results"))), encoding="utf-8")
    with Chromium.start(tmp_path / "profile") as browser:
        browser.open(page.as_uri())
        # nothing fetched but the page and its embedded images; no script error; both curves drawn
        assert {u.split(":", 1)[0] for u in browser.requests} == {"file", "data"}
        assert browser.requests[0] == page.as_uri()
        assert browser.evaluate("Array.from(document.images, i => i.complete && i.naturalWidth > 0)") == [True, True]
        before = browser.column(SECTION, "model")
        assert before == ["lenet", "wrn-28-10", "alexnet", "smallcnn"]  # reportable first, then by worst case
        runs = browser.column(SECTION, "run")

        browser.click_header(SECTION, "model")  # text: alphabetically
        after = browser.column(SECTION, "model")
        assert after != before and after == sorted(before) == ["alexnet", "lenet", "smallcnn", "wrn-28-10"]
        assert dict(zip(after, browser.column(SECTION, "run"))) == dict(zip(before, runs))  # rows move whole
        browser.click_header(SECTION, "model")  # again: the other way
        assert browser.column(SECTION, "model") == after[::-1]

        browser.click_header(SECTION, "worst case")  # numbers, "≤ 80.00" by its number (not as text)
        worst = browser.column(SECTION, "worst case")
        assert worst == ["≤ 9.50", "45.10", "≤ 80.00", "100.00"]
        assert [_number(c) for c in worst] == sorted(_number(c) for c in worst)
        assert browser.column(SECTION, "model") == ["smallcnn", "wrn-28-10", "alexnet", "lenet"]
        browser.click_header(SECTION, "worst case")
        assert browser.column(SECTION, "worst case") == worst[::-1]

        browser.click_header(SECTION, "pgd")  # a cell without a number ("–") goes last, either way
        assert browser.column(SECTION, "pgd") == ["9.50", "80.00", "–", "–"]
        browser.click_header(SECTION, "pgd")
        assert browser.column(SECTION, "pgd") == ["80.00", "9.50", "–", "–"]
        # the other tables did not move
        assert browser.column("mnist-5k · linf eps=0.1", "model") == ["alexnet", "smallcnn"]
        assert browser.errors == []
        browser.click_header(SECTION, "worst case")  # leave it sorted by worst case for the person looking
        shot = browser.screenshot_for_people(tmp_path, "leaderboard.png")
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 20_000
