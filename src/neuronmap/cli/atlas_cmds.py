"""``map``, ``search``, ``show``, ``stats``: parse, call the API, render."""

from __future__ import annotations

import json
import os
import sys

from rich.markup import escape
from rich.table import Table

from neuronmap.cli.common import DEVICE_HELP, err, finite_float, int_at_least, out, print_json, print_table, show_token
from neuronmap.core.fsio import check_png


def map_arguments(p) -> None:
    """What to map and how, where to run it, and --overwrite/--resume: shared by ``map`` and ``map-many``."""
    from neuronmap.mapping.part import MapOptions

    d = MapOptions()
    p.add_argument("--matrices", default=None, help="comma list of gate,up,down (default: all the model has)")
    p.add_argument("--layers", default=None, help="layers and ranges, e.g. 0-5,9 (default: all)")
    p.add_argument("--top-k", type=int_at_least(1), default=d.top_k, help=f"tokens kept per vector (default {d.top_k})")
    p.add_argument("--device", default=d.device, help=DEVICE_HELP)
    p.add_argument("--dtype", default=d.dtype, help=f"auto | split | float32 | bfloat16 (default {d.dtype}: split, exact bf16 halves "
                   "with fp32 accumulation, where the CPU has AVX512-BF16 or on CUDA, else float32; bfloat16: bf16 "
                   "screening, exact fp32 rescoring)")
    p.add_argument("--norm", default=d.norm, help=f"final (the model's own final norm) | none (default {d.norm})")
    p.add_argument("--fold-input-norm", action="store_true", help="multiply gate/up vectors by the layer's pre-MLP norm gain")
    p.add_argument("--kernel", default=d.kernel,
                   help="auto | eager | compiled: with --dtype float32 or bfloat16, the vocabulary reductions fused by "
                   "torch.compile (auto: for big models); split always runs its own fused kernel")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing atlas (never a directory that is not an atlas, nor the model's own files)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted map into the same -o from its finished parts (same weights and options)")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="decode the (matrix, layer) parts as tasks on a Ray cluster: local (start one here), auto (the "
                        "default: the running cluster Ray finds), HOST:PORT or ray://HOST:PORT; pip install 'neuronmap[ray]'")


def map_options(args):
    """The ``MapOptions`` that ``map_arguments`` parsed."""
    from neuronmap.mapping.part import MapOptions

    return MapOptions(matrices=args.matrices, layers=args.layers, top_k=args.top_k, device=args.device,
                      dtype=args.dtype, norm=args.norm, fold_input_norm=args.fold_input_norm, kernel=args.kernel,
                      sae=getattr(args, "sae", None))


def add_map(sub) -> None:
    p = sub.add_parser("map", help="decode every MLP neuron of a model into an atlas")
    p.add_argument("source", nargs="?", default=None,
                   help="checkpoint dir, .gguf file, hub id (org/name) or packaged model (smollm2-135m, gemma3-270m); default: the demo model")
    p.add_argument("-o", "--out", required=True, help="atlas directory to create")
    p.add_argument("--sae", default=None, metavar="PATH",
                   help="decode the features of a SAELens SAE or transcoder (a directory: cfg.json and its safetensors), or a "
                        "directory of them one per layer, instead of the MLP neurons: ids L{layer}F{index}, matrices "
                        "enc,dec (see docs/features.md)")
    map_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_map)


def cmd_map(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from neuronmap.mapping.mapper import map_model

    opts = map_options(args)
    show = not args.json and err.is_terminal or os.environ.get("NEURONMAP_PROGRESS") == "1"
    with Progress(TextColumn("[bold]mapping"), BarColumn(), MofNCompleteColumn(), TextColumn("parts (matrix x layer)"),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=err, disable=not show, transient=True) as bar:
        task = bar.add_task("map", total=None, rate="")
        import time
        t0 = time.perf_counter()

        def progress(done: int, total: int, vectors: int) -> None:
            rate = vectors / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} neurons/s")

        result = map_model(args.source, args.out, opts, overwrite=args.overwrite, progress=progress, resume=args.resume,
                           ray=args.ray)
    for line in result.notes:
        err.print(f"note: {line}", markup=False)
    if args.json:
        print_json(result.to_dict())
        return 0
    m = result.meta
    unit = (f"{len(m['sae'])} SAE{'s' if len(m['sae']) > 1 else ''} ({m['sae'][0]['architecture']}) x {m['d_mlp']} features"
            if m.get("sae") else f"{m['n_layers']} layers x {m['d_mlp']} neurons")
    out.print(f"[bold]Mapped[/bold] {result.n_vectors:,} vectors ({m['n_rows']:,} rows with both poles) of "
              f"{escape(m['source']['spec'])} ({m['family']}: {unit}, "
              f"matrices {','.join(m['decode']['matrices'])}) in {result.seconds:.1f} s, "
              f"{m['timings']['vectors_per_s']:,.0f} vectors/s on {m['device']} ({m['dtype']}, {m['kernel']} kernel).")
    out.print(f"Atlas: {result.path}", markup=False)
    if result.highlights:
        kind = "feature" if m.get("sae") else "neuron"
        t = Table(title=f"Some confident content-word {kind}s")
        for c in (kind, "matrix", "pole", "top token", "p"):
            t.add_column(c)
        for h in result.highlights:
            t.add_row(h["id"], h["matrix"], h["pole"], show_token(h["token"]), f"{h['prob']:.3f}")
        out.print(t)
    return 0


def _rows_options(p) -> None:
    p.add_argument("--matrices", default=None, help="comma list of gate,up,down (default: all the atlas has)")
    p.add_argument("--layers", default=None, help="layers and ranges, e.g. 20-29 (default: all the atlas has)")
    p.add_argument("--pole", default=None, choices=["+", "-", "both"], help="+ (the vector), - (its negation) or both (default)")


def _weights_options(p) -> None:
    p.add_argument("--stored", action="store_true",
                   help="use only the stored top-k lists, no weights (a row is found only where the token is in its top-k)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="where the mapped weights are now, if they moved (their sha256 must match meta.json)")


def _note_index(files, stored: bool) -> None:
    from neuronmap.atlas.store import token_index_ready

    if stored and token_index_ready(files) is None:
        err.print("building the atlas's token index for --stored lookups (once; saved as token_index.parquet)", markup=False)


def add_search(sub) -> None:
    from neuronmap.atlas.search import MIN_PROB, POOL, SORTS, TOP

    p = sub.add_parser("search", help="rank an atlas's vectors by the probability they decode to a concept")
    p.add_argument("atlas", help="atlas directory (from `neuronmap map`)")
    p.add_argument("concepts", nargs="+", metavar="CONCEPT", help="word or token, e.g. coffee or ' coffee'")
    _rows_options(p)
    p.add_argument("--top", type=int_at_least(1), default=TOP, help=f"hits per concept (default {TOP})")
    p.add_argument("--min-prob", type=finite_float(0.0, 1.0), default=MIN_PROB,
                   help=f"drop hits below this probability (default {MIN_PROB:g})")
    p.add_argument("--exact-token", action="store_true", help="match each concept exactly as typed, no variants")
    p.add_argument("--sort", choices=SORTS, default="prob",
                   help=f"prob (default), or agreement: the best {POOL} x --top rows by prob, ranked by how often "
                        "the text's next token is among their decoded top-k at their top activations (needs `neuronmap record`)")
    _weights_options(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the result as JSON")
    fmt.add_argument("--csv", action="store_true", help="print the hits as CSV")
    p.set_defaults(func=cmd_search)


def _method_line(method: str, n_scored: int, top_k: int) -> str:
    if method == "exact":
        return (f"exact: p over all {n_scored:,} chosen rows (vector x pole), from the weights (sha256 checked) "
                "and the stored log-sum-exp")
    return (f"stored top-{top_k}, no weights read: only rows with a variant among their top {top_k} of {n_scored:,} "
            "are found, and p is a lower bound")


def cmd_search(args) -> int:
    from neuronmap.atlas.handle import Atlas
    from neuronmap.atlas.search import check_concepts, search

    check_concepts(args.concepts)  # before the token index is built: a refused search does no work
    files = Atlas.open(args.atlas)
    _note_index(files, args.stored)
    r = search(files, args.concepts, args.matrices, args.layers, args.pole, args.top, args.min_prob,
               args.stored, args.weights, not args.exact_token, args.sort)
    if args.json:
        print_json(r.to_dict())
        return 0
    t = r.table
    if args.csv:
        flat = t.assign(top_tokens=[json.dumps(list(x), ensure_ascii=False) for x in t["top_tokens"]],
                        top_probs=[json.dumps([round(float(v), 6) for v in x]) for x in t["top_probs"]])
        sys.stdout.write(flat.to_csv(index=False))
        return 0
    out.print(f"[bold]search[/bold] {escape(args.atlas)}: {_method_line(r.method, r.n_scored, r.top_k)}; {r.seconds:.1f} s")
    for c in r.concepts:
        hits = t[t["concept"] == c.text]
        toks = ", ".join(f"{show_token(s)} ({i})" for i, s in zip(c.token_ids, c.tokens))
        if c.approximate:
            out.print(f"\n[bold]{show_token(c.text)}[/bold]: [yellow]APPROXIMATE[/yellow], no variant is a single token; matched by "
                      f"its first token {toks}, which stands for more than the concept")
        else:
            out.print(f"\n[bold]{show_token(c.text)}[/bold]: single-token variants {toks}")
        tab = Table(show_edge=False)
        evidence = "evidence" in files.meta
        cols = ("rank", "feature" if files.meta.get("sae") else "neuron", "matrix", "pole", "p(concept)", "best variant", "top tokens (p)") + \
            (("agreement (base)",) if evidence else ())
        for col in cols:
            tab.add_column(col, justify="right" if col in ("rank", "p(concept)", "agreement (base)") else "left")
        pct = lambda x: "-" if x is None or x != x else f"{100 * x:.0f}%"  # noqa: E731
        for h in hits.itertuples():
            tops = "  ".join(f"{show_token(a)} {b:.2f}" for a, b in zip(h.top_tokens[:3], h.top_probs[:3]))
            more = (f"{pct(h.agreement)} ({pct(h.agreement_base)})",) if evidence else ()
            tab.add_row(str(h.rank), h.id, h.matrix, h.pole, f"{h.prob:.3f}", f"{show_token(h.token)} {h.token_prob:.3f}", tops,
                        *more, end_section=False)
        if len(hits):
            print_table(tab)
        else:
            out.print("  no row reaches --min-prob" if args.min_prob else "  no row found")
    return 0


def add_show(sub) -> None:
    p = sub.add_parser("show", help="every matrix and pole of one neuron: top tokens, entropy, weight norm, rank")
    p.add_argument("atlas", help="atlas directory")
    p.add_argument("neuron", help="neuron id, e.g. L29N808")
    p.add_argument("--tokens", type=int_at_least(1), default=5, help="top tokens to print per row (default 5)")
    p.add_argument("-n", type=int_at_least(1), default=5,
                   help="activation examples per pole, where the atlas holds evidence (default 5)")
    _weights_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    from neuronmap.atlas.handle import Atlas
    from neuronmap.atlas.search import show

    from neuronmap.core.ids import parse_neuron_id

    files = Atlas.open(args.atlas)
    parse_neuron_id(args.neuron, int(files.meta["n_layers"]), int(files.meta["d_mlp"]))  # before building an index
    _note_index(files, args.stored)
    n = show(files, args.neuron, args.stored, args.weights, args.n)
    if args.json:
        print_json(n.to_dict())
        return 0
    how = ("exact p of that token over every row, from the weights" if n.rank_method == "exact"
           else "stored p, among only the rows whose top-k holds that token")
    out.print(f"[bold]{n.id}[/bold] (layer {n.layer}, neuron {n.neuron}) of {escape(args.atlas)} "
              f"({files.meta['family']}, {escape(str(files.meta.get('source', {}).get('spec', '?')))}); rank: position for its own top token, by {how}")
    tab = Table(show_edge=False)
    for col in ("matrix", "pole", "|w|", "entropy", "rank for top token", f"top {args.tokens} tokens (p)"):
        tab.add_column(col, justify="right" if col in ("|w|", "entropy", "rank for top token") else "left")
    for r in n.rows.itertuples():
        tops = "  ".join(f"{show_token(a)} {b:.3f}" for a, b in zip(r.tokens[:args.tokens], r.probs[:args.tokens]))
        tab.add_row(r.matrix, r.pole, f"{r.weight_norm:.2f}", f"{r.entropy:.2f}", f"{r.rank:,} of {r.n_ranked:,}", tops)
    print_table(tab)
    if n.evidence is not None:
        from neuronmap.cli.evidence_cmds import render_evidence

        out.print()
        render_evidence(n.evidence)
    else:
        out.print(f"no activation evidence: `neuronmap record {escape(args.atlas)} --corpus PATH` adds what it fires on in text")
    return 0


def add_stats(sub) -> None:
    p = sub.add_parser("stats", help="per layer and matrix: confident share, entropy, token classes, frequent tokens")
    p.add_argument("atlas", help="atlas directory")
    _rows_options(p)
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also write a PNG of these against depth")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_stats)


def cmd_stats(args) -> int:
    from neuronmap.atlas.handle import Atlas
    from neuronmap.atlas.stats import TOKEN_CLASSES, plot, stats

    files = Atlas.open(args.atlas)
    if args.plot:
        check_png(args.plot)
    s = stats(files, args.matrices, args.layers, args.pole)
    if args.plot:
        plot(s, args.plot, f"{files.meta.get('source', {}).get('spec', '?')} ({files.meta['family']}): {s.n_rows:,} rows of {args.atlas}")
    if args.json:
        print_json(s.to_dict())
        return 0
    out.print(f"[bold]stats[/bold] {escape(args.atlas)}: {s.n_rows:,} rows (vector x pole); confident = top token p > 0.5; "
              "token classes of the top token, as defined in `neuronmap.atlas.stats.token_class`")
    tab = Table(show_edge=False)
    short = {"word": "word", "subword": "sub", "number": "num", "punctuation": "punct", "whitespace": "space", "other": "other"}
    for col in ("layer", "matrix", "rows", "confident", "H p10", "H p50", "H p90", *[short[k] for k in TOKEN_CLASSES],
                "most frequent top tokens"):
        tab.add_column(col, justify="left" if col in ("matrix", "most frequent top tokens") else "right")
    for r in s.layers.itertuples():
        tab.add_row(str(r.layer), r.matrix, f"{r.rows:,}", f"{100 * r.confident:.1f}%", f"{r.entropy_p10:.2f}",
                    f"{r.entropy_p50:.2f}", f"{r.entropy_p90:.2f}", *[f"{100 * getattr(r, k):.0f}%" for k in TOKEN_CLASSES],
                    "  ".join(f"{show_token(a)} {n}" for a, n in r.top_tokens))
    print_table(tab)
    top = Table(title="most frequent top tokens, all rows", show_edge=False)
    for col in ("token", "id", "rows", "share", "class"):
        top.add_column(col, justify="right" if col in ("id", "rows", "share") else "left")
    for r in s.top_tokens.head(10).to_dict("records"):  # records, not itertuples: "class" is a Python keyword
        top.add_row(show_token(r["token"]), str(r["token_id"]), f"{r['rows']:,}", f"{100 * r['share']:.2f}%", r["class"])
    print_table(top)
    if args.plot:
        out.print(f"plot: {args.plot}", markup=False)
    return 0
