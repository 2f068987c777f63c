"""HTML building blocks: escaping, tokens, bars, tables, links and the page layout.

Every string that comes from an atlas or a request goes through ``esc`` (or
``tok`` for a token); nothing is placed in HTML any other way. Tokens are shown
as Python writes them (``repr``), so a leading space, a newline, a control
character or a partial UTF-8 byte is visible, and ``<script>`` is text. Data for
the charts travels in ``<script type="application/json">`` blocks, with ``<``,
``>`` and ``&`` escaped so no token can close the block. The pages run no inline
script (the Content-Security-Policy forbids it): bars are SVG attributes, the
behaviour is in static/app.js.
"""

from __future__ import annotations

import html
import json
import math
from urllib.parse import urlencode

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def esc(x: object) -> str:
    """Text for HTML (element content or a quoted attribute)."""
    return html.escape(str(x), quote=True)


def tok(t: object) -> str:
    """A token, visible and inert: ``' coffee'``, ``'\\n'``, ``'<script>'``."""
    return f'<code class="tok">{esc(repr(t) if isinstance(t, str) else t)}</code>'


def num(x: object, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, fmt) if isinstance(x, (int, float)) else esc(x)


def bar(p: float | None, width: int = 120, cls: str = "bar") -> str:
    """A horizontal bar of length ``p`` (0..1) as SVG attributes (no inline style, so the CSP holds)."""
    w = 0.0 if p is None or not math.isfinite(p) else max(0.0, min(1.0, float(p))) * width
    return (f'<svg class="{cls}" width="{width}" height="10" viewBox="0 0 {width} 10" aria-hidden="true">'
            f'<rect class="track" width="{width}" height="10"/><rect class="fill" width="{w:.1f}" height="10"/></svg>')


def url(path: str, **params: object) -> str:
    """``path?k=v&...`` with the None values left out, every value URL-encoded."""
    q = {k: v for k, v in params.items() if v is not None and v != ""}
    return path + ("?" + urlencode(q) if q else "")


def link(href: str, inner_html: str, cls: str = "") -> str:
    """``inner_html`` must already be escaped (``esc``/``tok``)."""
    c = f' class="{esc(cls)}"' if cls else ""
    return f'<a href="{esc(href)}"{c}>{inner_html}</a>'


def table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML (already escaped); headers are HTML too (sort links)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def json_block(element_id: str, data: object) -> str:
    """Data for app.js, unable to end its own ``<script>`` element whatever tokens it holds."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def error_box(message: str) -> str:
    return f'<p class="error" role="alert">error: {esc(message)}</p>'


def layout(title: str, body: str, names: list[str], atlas: str | None, q: str = "", reports: list[str] = ()) -> str:
    """A whole page: the bar (atlas, search box, compare, removal reports), then ``body``."""
    here = {"atlas": atlas if atlas and names and atlas != names[0] else None}
    picks = " ".join(link(url("/", atlas=n if n != names[0] else None), esc(n), "current" if n == atlas else "")
                     for n in names) if len(names) > 1 else ""
    compare = link(url("/compare", a=names[0], b=names[1]), "compare") if len(names) > 1 else ""
    # Every report is listed, even one alone: unlike the first atlas, no report is reachable from the brand link.
    shown = (' <span class="reports">report: ' + " ".join(link(f"/report/{r}", esc(r)) for r in reports) + "</span>"
             if reports else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · neuronmap</title><link rel="stylesheet" href="/static/style.css"></head>
<body><header><nav>
<a class="brand" href="{esc(url('/', **here))}">neuronmap</a>
<form class="search" action="/search" method="get" role="search">
<input id="q" name="q" type="search" value="{esc(q)}" placeholder="concept or neuron id (press /)" aria-label="search" autocomplete="off">
{'<input type="hidden" name="atlas" value="' + esc(here['atlas']) + '">' if here['atlas'] else ''}
<button type="submit">search</button></form>
<span class="atlases">{picks}</span> {compare}{shown}
</nav></header>
<main>{body}</main>
<footer>neuronmap viewer · local, offline · <a href="/api/atlases">API</a></footer>
<script src="/static/app.js"></script></body></html>"""
