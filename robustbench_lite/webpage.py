"""Self-contained HTML pages (``advbench leaderboard --format html``, a run's report.html) made from
the markdown advbench writes, so that a page carries exactly what its markdown says: one renderer
of the rows, two outputs.

``page(markdown)`` reads the subset of markdown that leaderboard.md and report.md use (``#``
headings, paragraphs, ``-`` lists, pipe tables with ``---:`` for right-aligned columns, images and
links, ``**bold**``, ``*emphasis*``, ``code``) and returns one HTML document with its CSS and a
small sort script inline: no external script, style sheet or font, nothing fetched. Every text is
escaped. Each table sorts by any column when its header is clicked (again: the other way):
right-aligned columns by their number (``≤ 45.10`` and ``45.10%`` by 45.1; a cell without a
number, ``–``, last either way), the others alphabetically. Images are embedded as data URIs
(``data_uri``; ``figure_data_uri`` for a matplotlib figure); ``pyplot()`` is matplotlib on the Agg
backend, the one way advbench draws.
"""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Callable, List, Optional

MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display); imported here, on the plotting path only."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def data_uri(path) -> str:
    """A file (an image) as a ``data:`` URI, to embed it in a page."""
    p = Path(path)
    return f"data:{MIME.get(p.suffix.lower(), 'application/octet-stream')};base64," + \
        base64.b64encode(p.read_bytes()).decode("ascii")


def figure_data_uri(plt, fig, dpi: int = 110) -> str:
    """A matplotlib figure as a PNG ``data:`` URI (the figure is closed)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")  # a legend outside the axes included
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_INLINE = re.compile(r"`([^`]*)`|\*\*(.+?)\*\*|\*(.+?)\*|!\[([^\]]*)\]\(([^)\s]*)\)|\[([^\]]*)\]\(([^)\s]*)\)")


def inline(text: str, image: Callable[[str], str] = str) -> str:
    """One line of markdown as escaped HTML (code, bold, emphasis, images, links)."""
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[last:m.start()]))
        code, bold, em, alt, src, label, href = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{inline(bold, image)}</strong>")
        elif em is not None:
            out.append(f"<em>{inline(em, image)}</em>")
        elif src is not None:
            out.append(f'<img alt="{html.escape(alt)}" src="{html.escape(image(src))}">')
        else:
            out.append(f'<a href="{html.escape(href)}">{inline(label, image)}</a>')
        last = m.end()
    return "".join(out) + html.escape(text[last:])


def _cells(line: str) -> List[str]:
    """A pipe table's row as its cells (``\\|`` is a pipe inside a cell)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def _table(lines: List[str], image: Callable[[str], str]) -> str:
    header, align, rows = _cells(lines[0]), _cells(lines[1]), [_cells(ln) for ln in lines[2:]]
    num = [a.endswith(":") for a in align]
    cls = [' class="num"' if n else "" for n in num]
    head = "".join(f'<th{c} tabindex="0" title="sort by {html.escape(h)}">{inline(h, image)}</th>'
                   for c, h in zip(cls, header))
    body = []
    for r in rows:
        tds = []
        for c, cell in zip(cls, r + [""] * (len(header) - len(r))):
            bound = ' title="an upper bound: weak attacks only"' if cell.startswith("≤") else ""
            tds.append(f"<td{c}{bound}>{inline(cell, image)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<table class="sortable">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body) +
            "\n</tbody>\n</table>")


def body_html(markdown: str, image: Callable[[str], str] = str) -> str:
    """The blocks of a markdown text as HTML; ``image`` maps an image's source to the one embedded."""
    out: List[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = re.match(r"(#{1,6}) (.*)", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2), image)}</h{n}>")
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].strip() and not re.match(r"#{1,6} ", lines[j]):
            j += 1
        block = lines[i:j]
        if block[0].startswith("|") and len(block) >= 2:
            out.append(_table(block, image))
        elif block[0].startswith("- "):
            items: List[str] = []
            for ln in block:  # a line that does not start a new item continues the one before
                if ln.startswith("- ") or not items:
                    items.append(ln[2:] if ln.startswith("- ") else ln)
                else:
                    items[-1] += " " + ln.strip()
            out.append("<ul>\n" + "\n".join(f"<li>{inline(it, image)}</li>" for it in items) + "\n</ul>")
        else:
            out.append(f"<p>{inline(' '.join(block), image)}</p>")
        i = j
    return "\n".join(out)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 78em;
       padding: 0 1.5em; color: #1d2733; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: .3em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d6dde5; }
table.sortable { border-collapse: collapse; margin: .8em 0 1.4em; font-size: .92em; }
th, td { padding: .35em .7em; border-bottom: 1px solid #e3e8ee; text-align: left; white-space: nowrap; }
th { background: #eef2f7; cursor: pointer; user-select: none; }
th:hover { background: #dde6f0; } th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #f8fafc; } tbody tr:hover { background: #fff7dd; }
td[title] { color: #8a5a00; } code { font-size: .92em; background: #f1f3f5; padding: 0 .25em; border-radius: 3px; }
img { max-width: 100%; border: 1px solid #e3e8ee; }
"""

# sorts a table by the clicked column: numbers (right-aligned columns) by value, other text alphabetically;
# a cell without a number goes last either way; clicking the same header again reverses the order
SORT_JS = """
(function () {
  function num(text) {
    var m = text.replace(/^\\s*\\u2264\\s*/, "").replace(/%\\s*$/, "").trim();
    return /^[-+]?(\\d+\\.?\\d*|\\.\\d+)([eE][-+]?\\d+)?$/.test(m) ? parseFloat(m) : NaN;
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var numeric = th.classList.contains("num");
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col] ? a.cells[col].textContent.trim() : "", y = b.cells[col] ? b.cells[col].textContent.trim() : "";
      if (numeric) {
        var p = num(x), q = num(y);
        if (isNaN(p) || isNaN(q)) { return isNaN(p) - isNaN(q); }
        return dir * (p - q);
      }
      return dir * x.localeCompare(y, undefined, {sensitivity: "base"});
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); } });
  });
})();
"""


def page(markdown: str, title: Optional[str] = None, image: Callable[[str], str] = str) -> str:
    """A self-contained HTML document from a markdown text (its title: ``title``, else the first heading)."""
    if title is None:
        m = re.search(r"^# (.*)$", markdown, flags=re.M)
        title = m.group(1) if m else "advbench"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"{body_html(markdown, image)}\n<script>{SORT_JS}</script>\n</body>\n</html>\n")
