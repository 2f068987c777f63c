"""The viewer's pages, each built from the same result object its ``/api/...`` twin serializes.

Every function returns the page body (HTML); ``render.layout`` wraps it.
"""

from __future__ import annotations

import math

import pandas as pd

from neuronmap.core.ids import ALL_MATRICES, id_letter, neuron_id
from neuronmap.atlas.stats import TOKEN_CLASSES
from neuronmap.viewer.render import bar, esc, json_block, link, num, table, tok, url


def _a(name: str, first: str) -> str | None:
    """The ``atlas`` query value: left out for the first atlas, so the common URLs stay short."""
    return None if name == first else name


def neuron_link(nid: str, name: str, first: str) -> str:
    return link(url(f"/neuron/{nid}", atlas=_a(name, first)), esc(nid))


def _depth_series(layers: pd.DataFrame | list[dict], value: str, by: str = "matrix") -> list[dict]:
    df = pd.DataFrame(layers)
    out = []
    for key, g in df.groupby(by, sort=False):
        g = g.sort_values("layer")
        out.append({"name": str(key), "points": [[int(x), None if pd.isna(y) else float(y)] for x, y in zip(g["layer"], g[value])]})
    return out


# ------------------------------------------------------------------ /


def overview(name: str, first: str, meta: dict, stats, words: pd.DataFrame) -> str:
    dec = meta["decode"]
    t = meta.get("timings") or {}
    facts = [
        ("model", esc(meta["source"]["spec"])), ("family", esc(meta["family"])),
        ("shape", esc(f"{meta['n_layers']} layers × {meta['d_mlp']} neurons, d_model {meta['d_model']}, d_vocab {meta['d_vocab']}")),
        ("rows", esc(f"{meta['n_rows']:,} ({meta['n_vectors']:,} vectors × 2 poles)")),
        ("decode", esc(f"matrices {','.join(dec['matrices'])}; norm {dec['norm']} ({dec.get('final_norm')}); "
                       f"top-k {dec['top_k']}; fold input norm {dec.get('fold_input_norm')}; softcap {dec.get('softcap')}")),
        ("mapped", esc(f"{meta.get('created', '?')} on {meta.get('device', '?')}, {meta.get('dtype', '?')}"
                       + (f", {t['total_s']:.1f} s ({t.get('vectors_per_s', 0):,.0f} vectors/s)" if "total_s" in t else ""))),
    ]
    s = stats.to_dict()
    metrics = {"confident": "share of rows with top-1 p > 0.5", "entropy_p50": "median entropy (nats)",
               **{c: f"share of top-1 tokens that are {c}" for c in TOKEN_CLASSES}}
    charts = {k: {"label": v, "series": _depth_series(s["layers"], k)} for k, v in metrics.items()}
    layer_links = " ".join(link(url(f"/layer/{x}", atlas=_a(name, first)), str(x)) for x in dec["layers"])
    word_rows = [[neuron_link(r.id, name, first), esc(r.matrix), esc(r.pole), tok(r.token), bar(r.prob, 80) + " " + num(r.prob, ".3f")]
                 for r in words.itertuples()]
    top_rows = [[tok(r["token"]), esc(r["class"]), f"{r['rows']:,}", num(r["share"], ".2%")] for r in s["top_tokens"][:10]]
    return f"""<h1>{esc(name)}</h1>
<dl class="facts">{''.join(f'<dt>{k}</dt><dd>{v}</dd>' for k, v in facts)}</dl>
<section><h2>Against depth</h2>
<label>metric <select id="metric">{''.join(f'<option value="{esc(k)}">{esc(v)}</option>' for k, v in metrics.items())}</select></label>
<div id="depth-chart" class="chart" data-source="depth-data" data-select="metric"></div>
{json_block('depth-data', charts)}</section>
<section><h2>Layers</h2><p class="layers">{layer_links}</p></section>
<section><h2>Most confident content-word neurons</h2>
{table(['neuron', 'matrix', 'pole', 'top token', 'p'], word_rows) if word_rows else '<p>none above p 0.3</p>'}</section>
<section><h2>Most frequent top-1 tokens</h2>{table(['token', 'class', 'rows', 'share'], top_rows)}</section>"""


# ------------------------------------------------------------------ /search


def search_form(name: str, first: str, q: str, matrices: str, layers: str, pole: str, method: str, sort: str = "prob",
                evidence: bool = False) -> str:
    def opt(v, cur, label=None):
        return f'<option value="{esc(v)}"{" selected" if v == cur else ""}>{esc(label or v)}</option>'
    hidden = f'<input type="hidden" name="atlas" value="{esc(name)}">' if name != first else ""
    # Sorting by agreement needs activation evidence (neuronmap record); without it the choice is not offered.
    sorter = (f'<label>sort <select name="sort">{opt("prob", sort)}{opt("agreement", sort)}</select></label>\n'
              if evidence else "")
    return f"""<form class="filters" action="/search" method="get">{hidden}
<input name="q" value="{esc(q)}" aria-label="concept" placeholder="concept, e.g. coffee">
<label>matrices <input name="matrices" value="{esc(matrices)}" placeholder="all" size="10"></label>
<label>layers <input name="layers" value="{esc(layers)}" placeholder="all" size="8"></label>
<label>pole <select name="pole">{opt('', pole, 'both')}{opt('+', pole)}{opt('-', pole)}</select></label>
<label>method <select name="method">{opt('auto', method)}{opt('exact', method)}{opt('stored', method)}</select></label>
{sorter}<button type="submit">search</button></form>"""


def search_results(name: str, first: str, r, note: str | None, evidence: bool = False) -> str:
    d = r.to_dict()
    method = (f"exact: p over all {d['n_scored']:,} chosen rows, from the weights (sha256 checked)" if d["method"] == "exact"
              else f"from the stored top-{d['top_k']}: only rows with a variant among their top {d['top_k']} are found; p is a lower bound")
    parts = [f'<p class="method" data-method="{esc(d["method"])}">{esc(method)} · {d["seconds"]:.2f} s</p>']
    if note:
        parts.append(f'<p class="notice">{esc(note)}</p>')
    for c in d["concepts"]:
        variants = ", ".join(tok(t["token"]) for t in c["tokens"]) or "none"
        extra = " (approximate: no variant is a single token)" if c["approximate"] else ""
        hits = [h for h in d["results"] if h["concept"] == c["concept"]]
        pct = lambda x: "–" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        rows = [[str(h["rank"]), neuron_link(h["id"], name, first), esc(h["matrix"]), esc(h["pole"]),
                 bar(h["prob"]) + " " + num(h["prob"]), tok(h["token"]),
                 " ".join(tok(t) for t in h["top_tokens"][:3]), num(h["entropy"], ".2f")]
                + ([f'{pct(h["agreement"])} ({pct(h["agreement_base"])})'] if evidence else []) for h in hits]
        head = ["#", "neuron", "matrix", "pole", "p(concept)", "best variant", "top tokens", "entropy"] + \
            (["agreement (base)"] if evidence else [])
        parts.append(f'<section class="concept"><h2>{esc(c["concept"])}</h2><p>variants: {variants}{esc(extra)}</p>'
                     + (table(head, rows, "hits") if rows else "<p>no row puts probability on it</p>") + "</section>")
    return "".join(parts)


# ------------------------------------------------------------------ /neuron


def neuron(name: str, first: str, meta: dict, report, weights_ok: bool, weights_note: str | None, evidence=None) -> str:
    d = report.to_dict()
    n_layers, d_mlp = int(meta["n_layers"]), int(meta["d_mlp"])
    L, N = d["layer"], d["neuron"]
    c, layers = id_letter(meta), meta["decode"]["layers"]
    # Across a layer's edge only to a layer the atlas holds (a feature atlas may hold a single SAE's layer).
    prev = f"L{L}{c}{N - 1}" if N > 0 else (f"L{L - 1}{c}{d_mlp - 1}" if L > 0 and L - 1 in layers else None)
    nxt = f"L{L}{c}{N + 1}" if N + 1 < d_mlp else (f"L{L + 1}{c}0" if L + 1 < n_layers and L + 1 in layers else None)
    nav = " · ".join(x for x in [
        link(url(f"/neuron/{prev}", atlas=_a(name, first)), "← " + esc(prev)) if prev else "",
        link(url(f"/layer/{L}", atlas=_a(name, first)), f"layer {L}"),
        link(url(f"/neuron/{nxt}", atlas=_a(name, first)), esc(nxt) + " →") if nxt else ""] if x)
    cards = []
    for r in d["rows"]:
        rows = [[tok(t), bar(p) + " " + num(p), num(lg, ".2f")] for t, p, lg in zip(r["tokens"], r["probs"], r["logits"])]
        rank = (f"rank {r['rank']:,} of {r['n_ranked']:,} for {tok(r['top_token'])} ({esc(r['rank_method'])})")
        cards.append(f"""<section class="card" data-matrix="{esc(r['matrix'])}" data-pole="{esc(r['pole'])}">
<h3>{esc(r['matrix'])} {esc(r['pole'])}</h3>
<p class="sub">entropy {num(r['entropy'], '.3f')} nats · weight norm {num(r['weight_norm'], '.3f')} · {rank}</p>
{table(['token', 'p', 'logit'], rows, 'tokens')}</section>""")
    similar = ('<div id="similar" data-src="' + esc(url(f"/api/similar/{d['id']}", atlas=_a(name, first))) + '" data-atlas="'
               + esc(_a(name, first) or "") + '"><p>computing cosines over the weights…</p></div>') if weights_ok else \
        f'<p class="notice">{esc(weights_note or "the weights are not available")}</p>'
    steer = ('<p class="notice">steering SAE features is not built yet: see docs/features.md</p>' if meta.get("sae")
             else _steer_form(name, d["id"]) if weights_ok
             else f'<p class="notice">steering needs the weights: {esc(weights_note)}</p>')
    return f"""<h1>{esc(d['id'])} <small>{esc(name)}</small></h1><p class="nav">{nav}</p>
<div class="cards">{''.join(cards)}</div>
<section><h2>Most similar vectors</h2><p class="sub">|cosine| over the weights, same matrix, any layer; a negative cosine pairs with the other neuron's − pole</p>{similar}</section>
<section id="evidence"><h2>Activation evidence</h2>{evidence_panel(evidence)}</section>
<section><h2>Steer</h2>{steer}</section>"""


def _context(ex: dict, width: int = 16) -> str:
    """An example's window: each token escaped, the firing one marked; newlines shown as ⏎."""
    def show(t: str) -> str:
        return esc(t.replace("\n", "⏎"))
    return ('<span class="ctx">' + "".join(show(t) for t in ex["before"][-width:])
            + f'<mark class="fire">{show(ex["token"])}</mark>' + "".join(show(t) for t in ex["after"]) + "</span>")


def _histogram(edges: list[float], counts: list[int], width: int = 400, height: int = 80) -> str:
    """The non-empty span of the histogram as SVG bars (log counts), attributes only (the CSP holds)."""
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return ""
    lo, hi = nz[0], nz[-1]
    top = math.log1p(max(counts))
    w = width / (hi - lo + 1)
    bars = "".join(f'<rect class="fill" x="{(i - lo) * w:.1f}" y="{height - h:.1f}" width="{max(w - 1, 1):.1f}" height="{h:.1f}">'
                   f"<title>{esc(_bin_label(edges, i))}: {counts[i]:,}</title></rect>"
                   for i in range(lo, hi + 1) for h in [height * math.log1p(counts[i]) / top])
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="histogram of activations">{bars}</svg>'
            f'<p class="sub">{esc(_bin_label(edges, lo))} … {esc(_bin_label(edges, hi))}; bar height: log(1 + count)</p>')


def _bin_label(edges: list[float], i: int) -> str:
    """Bin ``i`` of the stored histogram: ``[lo, hi)`` at and above 0, ``(lo, hi]`` below (neuronmap.atlas.bins)."""
    lo = f"{edges[i - 1]:.3g}" if i > 0 else "-inf"
    hi = f"{edges[i]:.3g}" if i < len(edges) else "inf"
    return f"({lo}, {hi}]" if i < len(edges) and edges[i] <= 0 else f"[{lo}, {hi})"


def evidence_panel(ev) -> str:
    """The neuron page's evidence section from a ``NeuronEvidence`` (None: the atlas has none)."""
    if ev is None:
        return '<p class="sub">this atlas holds no activation evidence: add it with <code>neuronmap record ATLAS --corpus CORPUS</code></p>'
    d = ev.to_dict()
    head = (f'<p class="sub">{d["tokens"]:,} tokens of {esc(d["corpus"]["name"])} · mean {num(d["mean"], ".3f")} · '
            f'min {num(d["min"], ".3f")} · max {num(d["max"], ".3f")} · density (share &gt; 0) {num(d["density"], ".1%")}</p>')
    qs = table([esc(f"{100 * q['q']:g}%") for q in d["quantiles"]], [[num(q["value"], ".3f") for q in d["quantiles"]]], "quantiles")
    parts = [head, qs, _histogram(d["histogram"]["edges"], d["histogram"]["counts"])]
    for pole, title in (("+", "Max-activating"), ("-", "Min-activating")):
        rows = [[str(x["rank"]), num(x["activation"], ".3f"), esc(f"{x['doc']}@{x['position']}"), _context(x)] for x in d["examples"][pole]]
        parts.append(f"<h3>{title}</h3>" + (table(["#", "activation", "document", "context"], rows, f"examples pole{'plus' if pole == '+' else 'minus'}")
                                            if rows else "<p>none</p>"))
    pct = lambda x: num(x, ".1%")  # noqa: E731
    rows = [[esc(a["matrix"]), esc(a["pole"]), str(a["n"]), pct(a["next_hit"]), pct(a["next_base"]), pct(a["current_hit"]),
             pct(a["current_base"]), pct(a["effect_share"]), pct(a["effect_base"])] for a in d["agreement"]]
    parts.append('<h3>Agreement with the decoded top-k</h3><p class="sub">at the examples where the pole is the residual\'s side; '
                 "base: another neuron's top-k on the same examples (docs/method.md)</p>"
                 + table(["matrix", "pole", "examples", "next in top-k", "base", "current in top-k", "base", "effect share", "base"],
                         rows, "agreement"))
    return "".join(parts)


def _steer_form(name: str, nid: str) -> str:
    return f"""<form id="steer" class="steer" data-atlas="{esc(name)}" data-neuron="{esc(nid)}">
<label>value <input name="value" value="20x" size="6" aria-label="value"></label>
<label>positions <select name="positions"><option>all</option><option>prompt</option><option>generated</option><option>last</option></select></label>
<label>concept <input name="concept" placeholder="e.g. dog" size="12" aria-label="concept" required></label>
<label class="wide">message <input name="text" value="What is your favourite animal?" size="40" aria-label="message"></label>
<label><input type="checkbox" name="chat" checked> chat template</label>
<label>samples <input name="n" value="3" size="3" aria-label="samples"></label>
<button type="submit">run</button></form>
<div id="steer-status" class="status" aria-live="polite"></div>
<div id="steer-result"></div>"""


# ------------------------------------------------------------------ /layer


def layer(name: str, first: str, meta: dict, lr) -> str:
    d = lr.to_dict()
    here = dict(atlas=_a(name, first), matrix=d["matrix"], pole=d["pole"], **{"class": d["token_class"]})

    def sort_link(key: str, label: str) -> str:
        desc = not d["descending"] if key == d["sort"] else None
        mark = (" ↓" if d["descending"] else " ↑") if key == d["sort"] else ""
        return link(url(f"/layer/{d['layer']}", **here, sort=key, desc=None if desc is None else int(desc)), esc(label + mark))

    rows = [[neuron_link(r["id"], name, first), esc(r["pole"]), tok(r["top_token"]), bar(r["top_prob"], 80) + " " + num(r["top_prob"], ".3f"),
             esc(r["token_class"]), num(r["entropy"], ".3f"), num(r["weight_norm"], ".3f"),
             " ".join(tok(t) for t in r["tokens"][1:4])] for r in d["rows"]]
    mats = " ".join(link(url(f"/layer/{d['layer']}", **{**here, "matrix": m}), esc(m), "current" if m == d["matrix"] else "")
                    for m in ALL_MATRICES if m in meta["decode"]["matrices"])
    classes = " ".join(link(url(f"/layer/{d['layer']}", **{**here, "class": c}), esc(c or "all"),
                            "current" if c == (d["token_class"] or "") else "") for c in ["", *TOKEN_CLASSES])
    page = d["offset"] // d["limit"]
    keep = dict(here, sort=d["sort"], desc=int(d["descending"]))
    pager = " ".join(x for x in [
        link(url(f"/layer/{d['layer']}", **keep, page=page - 1 or None), "← previous") if page > 0 else "",
        esc(f"rows {d['offset'] + 1}–{min(d['offset'] + d['limit'], d['n_matching'])} of {d['n_matching']:,}"
            if d["offset"] < d["n_matching"] else f"no rows on this page ({d['n_matching']:,} in all)"),
        link(url(f"/layer/{d['layer']}", **keep, page=page + 1), "next →") if d["offset"] + d["limit"] < d["n_matching"] else ""] if x)
    layers = meta["decode"]["layers"]
    i = layers.index(d["layer"])
    around = " · ".join(x for x in [
        link(url(f"/layer/{layers[i - 1]}", **here), f"← layer {layers[i - 1]}") if i > 0 else "",
        link(url(f"/layer/{layers[i + 1]}", **here), f"layer {layers[i + 1]} →") if i + 1 < len(layers) else ""] if x)
    return f"""<h1>Layer {d['layer']} · {esc(d['matrix'])} <small>{esc(name)}</small></h1><p class="nav">{around}</p>
<p>matrix: {mats}</p><p>top-1 token class: {classes}</p><p class="pager">{pager}</p>
{table(['neuron', 'pole', sort_link('confidence', 'top token · p'), 'p', 'class', sort_link('entropy', 'entropy'), sort_link('norm', 'weight norm'), 'next tokens'], rows, 'layer')}
<p class="pager">{pager}</p>"""


# ------------------------------------------------------------------ /compare


def compare(a: str, b: str, first: str, c) -> str:
    d = c.to_dict()
    head = (f'<h1>{esc(a)} vs {esc(b)}</h1><p class="sub">{esc(d["level"])} level: {esc(d["reason"])}</p>'
            + "".join(f'<p class="notice">{esc(w)}</p>' for w in d["warnings"]))
    if d["level"] == "neuron":
        n = d["neuron"]
        layers = [dict(r, series=f"{r['matrix']} {r['pole']}") for r in n["layers"]]
        charts = {k: {"label": v, "series": _depth_series(layers, k, "series"), "zero": False} for k, v in
                  {"same_top1": "share of rows with the same top-1 token", "topk_overlap": f"top-{n['k']} overlap",
                   "js": "Jensen-Shannon divergence (bits)"}.items()}
        overall = [[esc(r["matrix"]), esc(r["pole"]), num(r["same_top1"], ".1%"), num(r["topk_overlap"], ".1%"), num(r["js"], ".3f")]
                   for r in n["overall"]]
        changed = [[link(url(f"/neuron/{r['id']}", atlas=_a(a, first)), esc(r["id"])) + " " +
                    link(url(f"/neuron/{r['id']}", atlas=_a(b, first)), "(B)"), esc(r["matrix"]), esc(r["pole"]),
                    tok(r["token_a"]) + " " + num(r["p_a"], ".2f"), tok(r["token_b"]) + " " + num(r["p_b"], ".2f"),
                    num(r["js"], ".3f")] for r in n["changed"]]

        def only(rows: list[dict], side: str) -> list[list[str]]:
            return [[tok(r["token"]), f"{r['n_vectors']:,}", link(url(f"/neuron/{r['best']}", atlas=_a(side, first)), esc(r["best"]))
                     + f" {esc(r['matrix'])} {esc(r['pole'])}", num(r["p"], ".2f")] for r in rows]
        concepts, lost = only(n["gained"], b), only(n["lost"], a)
        return head + f"""<section><h2>Agreement against depth</h2>
<label>metric <select id="metric">{''.join(f'<option value="{esc(k)}">{esc(v["label"])}</option>' for k, v in charts.items())}</select></label>
<div id="depth-chart" class="chart" data-source="depth-data" data-select="metric"></div>{json_block('depth-data', charts)}
{table(['matrix', 'pole', 'same top-1', f'top-{n["k"]} overlap', 'JS'], overall)}</section>
<section><h2>Changed most ({n['n_changed']:,} confident rows changed their top token)</h2>
{table(['neuron (A, B)', 'matrix', 'pole', f'top in {esc(a)}', f'top in {esc(b)}', 'JS'], changed)}</section>
<section class="two"><div><h2>Gained in {esc(b)} ({n['n_gained']:,})</h2>{table(['token', 'vectors', 'best', 'p'], concepts)}</div>
<div><h2>Lost from {esc(a)} ({n['n_lost']:,})</h2>{table(['token', 'vectors', 'best', 'p'], lost)}</div></section>"""
    k = d["concept"]

    def concepts(rows: list[dict], side: str) -> list[list[str]]:
        return [[esc(r["concept"]), tok(r["token"]), f"{r['n_vectors']:,}",
                 link(url(f"/neuron/{r['best']}", atlas=_a(side, first)), esc(r["best"])), num(r["p"], ".2f")] for r in rows]
    shared = [[esc(r["concept"]), link(url(f"/neuron/{r['a']['best']}", atlas=_a(a, first)), esc(r["a"]["best"])),
               link(url(f"/neuron/{r['b']['best']}", atlas=_a(b, first)), esc(r["b"]["best"]))] for r in k["shared"]]
    summary = (f"{k['n_a']:,} confident concepts in {a}, {k['n_b']:,} in {b}, {k['n_shared']:,} shared "
               f"(Jaccard {k['jaccard']:.3f})")
    return head + f"""<section><p>{esc(summary)}</p>{table(['shared concept', f'best in {esc(a)}', f'best in {esc(b)}'], shared)}</section>
<section class="two"><div><h2>Only in {esc(b)} (gained)</h2>{table(['concept', 'token', 'vectors', 'best', 'p'], concepts(k['only_b'], b))}</div>
<div><h2>Only in {esc(a)} (lost)</h2>{table(['concept', 'token', 'vectors', 'best', 'p'], concepts(k['only_a'], a))}</div></section>"""


# ------------------------------------------------------------------ /report/NAME


def report_index(reports: list[dict]) -> str:
    """The ``/`` page's list of removal reports, from the payload of ``/api/reports`` (nothing without any)."""
    if not reports:
        return ""
    rows = [[link(url(f"/report/{r['name']}"), esc(r["name"])), esc(", ".join(r["concepts"])), str(r["edits"]),
             esc(r["control"] or "none"), esc(r["source"])] for r in reports]
    return (f'<section id="reports"><h2>Removal reports</h2><p class="sub">what <code>neuronmap remove</code> edited and '
            f'measured</p>{table(["report", "removed", "edits", "control", "source"], rows, "reports")}</section>')


def _ratio(x: float | None) -> str:
    """A ratio as the CLI prints it (``0.0123x``); ``–`` where P before was 0."""
    return "–" if x is None else esc(f"{x:.3g}x")


def _p(x: float) -> str:
    return bar(x, 60) + " " + num(x, ".4g")  # .4g: a control at 5e-05 stays legible, unlike .4f


def report(rep, models: list[tuple[str, str, frozenset[int]]], first: str) -> str:
    """A removal report (``/report/NAME``) from ``Report.to_dict()``, the JSON ``remove --json`` printed.

    ``models`` are the served atlases of the edited model (``source``) and of the checkpoint written (``edited``),
    from ``data.report_atlases``: each edited neuron links to its page in the first that maps its layer.
    """
    d = rep.to_dict()

    def atlas_of(side: str, layer: int) -> str | None:
        return next((n for n, s, layers in models if s == side and layer in layers), None)

    def neuron_cell(e: dict) -> str:
        nid = neuron_id(e["layer"], e["neuron"])  # from the two integers, never the recorded string: it becomes a URL
        before, after = atlas_of("source", e["layer"]), atlas_of("edited", e["layer"])
        cell = neuron_link(nid, before, first) if before else esc(nid)
        if after:
            cell += " " + link(url(f"/neuron/{nid}", atlas=_a(after, first)), "edited", "sub")
        return cell

    sides = {"source": "the model edited", "edited": "the checkpoint written"}
    served = "; ".join(f"{link(url('/', atlas=_a(n, first)), esc(n))} ({sides[s]})" for n, s, _ in models) or \
        ("none of the served atlases is of this model, so the neurons are not linked: map it "
         f"(<code>neuronmap map {esc(d['source'])} -o ATLAS</code>) or the edited checkpoint, and serve the atlas beside the report")
    files = "; ".join(f"{esc(n)}: sha256 {esc(str(f.get('before', '?'))[:12])}… → {esc(str(f.get('after', '?'))[:12])}…"
                      for n, f in d["files"].items() if isinstance(f, dict))
    facts = [("source", esc(d["source"])), ("edited checkpoint", esc(d["out"]) + f' <span class="sub">({esc(d["base"])})</span>'),
             ("options", esc(", ".join(f"{k} {'per selection (see each step)' if v is None else v}"
                                       for k, v in d["options"].items()))), ("control", esc(d["control"] or "none")),
             ("files rewritten", files or "none"), ("atlases", served), ("record", esc(rep.path))]
    parts = [f'<h1>Removal report {esc(rep.name)} <small>{esc(", ".join(s["concept"] for s in d["steps"]))}</small></h1>'
             f'<dl class="facts">{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)}</dl>']
    for i, s in enumerate(d["steps"], 1):
        t = s.get("targeting")
        target = (f'<p class="targeting">targeting vector: P({esc(s["concept"])}) {num(t["approx_prob"], ".4g")} before '
                  f'refinement → {num(t["prob"], ".4g")} after; top tokens {" ".join(tok(x) for x in t["top"])}; cosine '
                  f'{num(t["cosine_to_approx"], ".3f")} with the concept vector</p>') if t else ""
        edits = [[neuron_cell(e), esc(e["matrix"]), esc(e["pole"]), num(e["cosine"], ".3f"), num(e["score"], ".3f"),
                  num(e["old_norm"], ".3f"), " ".join(tok(x) for x in e["old_top"]) + " → " + " ".join(tok(x) for x in e["new_top"])]
                 for e in s["edits"]]
        measures = []
        for x in s["measures"]:
            measures += [[esc(x["concept"]), esc(x["role"]), esc(q["kind"]), esc(q["prompt"]), esc(q["answer"]), _p(q["before"]),
                          _p(q["after"]), _ratio(q["after"] / q["before"] if q["before"] > 0 else None)] for q in x["prompts"]]
            measures.append([esc(x["concept"]), esc(x["role"]), "<strong>mean</strong>", "", "", _p(x["mean_before"]),
                             _p(x["mean_after"]), f'<strong>{_ratio(x["ratio"])}</strong>'])
        how = s.get("method")  # absent in reports written before --select auto
        method = (f'<p class="method">removed with <code>--select {esc(how["select"])} --edit {esc(how["edit"])} '
                  f'--strength {num(how["strength"], "g")}</code></p>') if how else ""
        parts.append(f"""<section class="step"><h2>Step {i}: removed {esc(s['concept'])}</h2>{method}{target}
<h3>Edits</h3>{table(['neuron', 'matrix', 'pole', 'cosine', 'score', 'old norm', 'top tokens before → after'], edits, 'edits')}
<h3>P(answer) before and after</h3><p class="sub">every concept removed so far, and the control, after this step</p>
{table(['concept', 'role', 'kind', 'prompt', 'answer', 'P before', 'P after', 'ratio'], measures, 'measures')}
<p class="kl">collateral KL on the reference text: median {num(s['kl_median'], '.4g')}, 95th percentile {num(s['kl_p95'], '.4g')} nats/token</p></section>""")
    return "".join(parts)
