"""``compare``: parse, call the API, render."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from neuronmap.cli.common import DEVICE_HELP, err, finite_float, int_at_least, out, print_json, show_token
from neuronmap.core.fsio import check_png


def add_compare(sub) -> None:
    from neuronmap.compare import LEVELS, MIN_PROB, TOP
    from neuronmap.mapping.part import MapOptions

    p = sub.add_parser("compare", help="what changed between two models' neuron maps (e.g. base vs fine-tuned)")
    p.add_argument("a", help="atlas directory or model source (mapped once into the cache)")
    p.add_argument("b", help="atlas directory or model source")
    p.add_argument("--level", default=LEVELS[0], choices=LEVELS,
                   help="neuron: pair neurons (same shapes and tokenizer); concept: compare confident token strings; auto: neuron when possible")
    p.add_argument("--matrices", default=None, help="comma list of gate,up,down (default: those both atlases hold)")
    p.add_argument("--layers", default=None, help="layers and ranges, e.g. 0-5,-1, read against each model's own depth (default: all mapped)")
    p.add_argument("--min-prob", type=finite_float(0.0, 1.0), default=MIN_PROB, help=f"a top-1 prob above this is confident (default {MIN_PROB:g})")
    p.add_argument("--top", type=int_at_least(0), default=TOP, help=f"rows listed per ranking; 0 lists all (default {TOP})")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw agreement against depth into a PNG")
    d = MapOptions()
    p.add_argument("--top-k", type=int_at_least(1), default=d.top_k, help=f"when mapping a model source: tokens kept per vector (default {d.top_k})")
    p.add_argument("--device", default=d.device, help="when mapping a model source: " + DEVICE_HELP)
    p.add_argument("--dtype", default=d.dtype, help=f"when mapping a model source: auto | split | float32 | bfloat16 (default {d.dtype})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_compare)


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def cmd_compare(args) -> int:
    from neuronmap.compare import compare, plot
    from neuronmap.mapping.part import MapOptions

    if args.plot:
        check_png(args.plot)  # before minutes of mapping, not after
    c = compare(args.a, args.b, level=args.level, matrices=args.matrices, layers=args.layers, min_prob=args.min_prob,
                top=args.top, options=MapOptions(top_k=args.top_k, device=args.device, dtype=args.dtype),
                progress=lambda msg: err.print(msg, markup=False))
    for w in c.warnings:
        err.print(f"warning: {w}", markup=False)
    if args.plot:
        plot(c, args.plot)
    if args.json:
        print_json(c.to_dict())
        return 0
    ma, mb = c.a.meta, c.b.meta
    for name, s, m in (("A", c.a, ma), ("B", c.b, mb)):
        out.print(f"[bold]{name}[/bold] {escape(s.spec)} ({m['family']}: {m['n_layers']} layers x {m['d_mlp']} neurons, "
                  f"vocab {m['d_vocab']:,}, top-{m['decode']['top_k']})", markup=True)
    out.print(f"Level: [bold]{c.level}[/bold] ({c.reason}); matrices {','.join(c.matrices)}; "
              f"compared in {c.seconds:.2f} s.")
    if c.neuron is not None:
        _show_neuron(c.neuron)
    else:
        _show_concept(c.concept)
    if args.plot:
        out.print(f"Plot: {args.plot}", markup=False)
    return 0


def _show_neuron(n) -> None:
    t = Table(title=f"Overall (top-k overlap over k={n.k}; JS in bits; changed = confident in both, p > {n.min_prob}, different top-1)")
    for col in ("matrix", "pole", "vectors", "same top-1", "top-k overlap", "mean JS", "changed"):
        t.add_column(col, justify="left" if col in ("matrix", "pole") else "right")
    for r in n.overall:
        t.add_row(r["matrix"], r["pole"], f"{r['n']:,}", percent(r["same_top1"]), percent(r["topk_overlap"]), f"{r['js']:.3f}", f"{r['changed']:,}")
    out.print(t)
    t = Table(title="Per layer (both poles): same top-1 share by matrix")
    t.add_column("layer", justify="right")
    mats = list(dict.fromkeys(r["matrix"] for r in n.layers))
    for m in mats:
        t.add_column(m, justify="right")
    t.add_column("mean JS", justify="right")
    by: dict = {}
    for r in n.layers:
        d = by.setdefault(r["layer"], {}).setdefault(r["matrix"], [0, 0.0, 0.0])
        d[0] += r["n"]
        d[1] += r["same_top1"] * r["n"]
        d[2] += r["js"] * r["n"]
    for layer in sorted(by):
        cells = [percent(by[layer][m][1] / by[layer][m][0]) if m in by[layer] else "" for m in mats]
        tot = [sum(v[i] for v in by[layer].values()) for i in range(3)]
        t.add_row(str(layer), *cells, f"{tot[2] / tot[0]:.3f}")
    out.print(t)
    if n.changed:
        t = Table(title=f"Changed most: {n.n_changed:,} vectors have a confident top-1 in both, and different (most confident first)")
        for col in ("neuron", "matrix", "pole", "A top-1", "p A", "B top-1", "p B"):
            t.add_column(col)
        for r in n.changed:
            t.add_row(r["id"], r["matrix"], r["pole"], show_token(r["token_a"]), f"{r['p_a']:.3f}", show_token(r["token_b"]), f"{r['p_b']:.3f}")
        out.print(t)
    for title, rows, total in (("gained (confident top-1 in B, in no vector of A)", n.gained, n.n_gained),
                               ("lost (confident top-1 in A, in no vector of B)", n.lost, n.n_lost)):
        out.print(f"Concepts {title}: {total:,}")
        if rows:
            t = Table()
            for col in ("token", "vectors", "best", "matrix", "pole", "p"):
                t.add_column(col)
            for r in rows:
                t.add_row(show_token(r["token"]), str(r["n_vectors"]), r["best"], r["matrix"], r["pole"], f"{r['p']:.3f}")
            out.print(t)


def _show_concept(c) -> None:
    corr = "n/a" if c.depth_corr is None else f"{c.depth_corr:.2f}"
    gap = "n/a" if c.depth_gap is None else f"{c.depth_gap:.2f}"
    out.print(f"Concepts (confident top-1 token strings, p > {c.min_prob}, strip+lowercase): A {c.n_a:,}, B {c.n_b:,}, "
              f"shared {c.n_shared:,}; Jaccard {c.jaccard:.3f}; B has {percent(c.coverage_a)} of A's, A has {percent(c.coverage_b)} of B's.")
    out.print(f"Relative depth (layer / (n_layers - 1)) of shared concepts: correlation A vs B {corr}, mean |gap| {gap}.")
    if c.shared:
        t = Table(title="Shared concepts, most vectors first")
        for col in ("concept", "A vectors", "A depth", "A best (p)", "B vectors", "B depth", "B best (p)"):
            t.add_column(col, no_wrap=True)
        for r in c.shared:
            a, b = r["a"], r["b"]
            t.add_row(show_token(r["concept"]), str(a["n_vectors"]), f"{a['depth']:.2f}", f"{a['best']} {a['matrix']}{a['pole']} ({a['p']:.2f})",
                      str(b["n_vectors"]), f"{b['depth']:.2f}", f"{b['best']} {b['matrix']}{b['pole']} ({b['p']:.2f})")
        out.print(t)
    for title, rows in (("Only in A", c.only_a), ("Only in B", c.only_b)):
        if rows:
            t = Table(title=f"{title}, most vectors first")
            for col in ("concept", "vectors", "depth", "best", "p"):
                t.add_column(col)
            for r in rows:
                t.add_row(show_token(r["concept"]), str(r["n_vectors"]), f"{r['depth']:.2f}", f"{r['best']} {r['matrix']}{r['pole']}", f"{r['p']:.2f}")
            out.print(t)
