"""The ``neuronmap`` command: each subcommand parses, calls the Python API, prints.

Every command that outputs data takes ``--json``; the default is a Rich table.
Bad input prints ``error: <one line>`` to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neuronmap.errors import NeuronmapError
from neuronmap.fsio import check_png, exit_on_signals, restore_signals

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def int_at_least(lo: int):
    """An argparse type: an integer >= ``lo``, refused at parse time (before any model loads)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer: expected a whole number >= {lo}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected a whole number >= {lo}")
        return value
    return parse


def finite_float(lo: float | None = None, hi: float | None = None):
    """An argparse type: a finite number within ``[lo, hi]`` (nan and inf are refused, never run as something else)."""
    want = "a number" + (f" from {lo:g} to {hi:g}" if lo is not None and hi is not None else f" >= {lo:g}" if lo is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: expected {want}") from None
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {want}")
        return value
    return parse


def _print_json(data: dict) -> None:
    # allow_nan=False: a nan or inf that reached here is a bug in a to_dict(), not something to print as invalid JSON.
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


# ------------------------------------------------------------------ map


def add_map(sub) -> None:
    p = sub.add_parser("map", help="decode every MLP neuron of a model into an atlas")
    p.add_argument("source", nargs="?", default=None,
                   help="checkpoint dir, .gguf file, hub id (org/name) or packaged model (smollm2-135m, gemma3-270m); default: the demo model")
    p.add_argument("-o", "--out", required=True, help="atlas directory to create")
    p.add_argument("--matrices", default=None, help="comma list of gate,up,down (default: all the model has)")
    p.add_argument("--layers", default=None, help="layers and ranges, e.g. 0-5,9 (default: all)")
    p.add_argument("--top-k", type=int_at_least(1), default=10, help="tokens kept per vector (default 10)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (bf16 screening, exact fp32 rescoring)")
    p.add_argument("--norm", default="final", help="final (the model's own final norm) | none")
    p.add_argument("--fold-input-norm", action="store_true", help="multiply gate/up vectors by the layer's pre-MLP norm gain")
    p.add_argument("--kernel", default="auto",
                   help="auto | eager | compiled: the vocabulary reductions fused by torch.compile (auto: for big models)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_map)


def cmd_map(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from neuronmap.mapper import MapOptions, map_model

    opts = MapOptions(matrices=args.matrices, layers=args.layers, top_k=args.top_k, device=args.device,
                      dtype=args.dtype, norm=args.norm, fold_input_norm=args.fold_input_norm, kernel=args.kernel)
    show = not args.json and err.is_terminal or os.environ.get("NEURONMAP_PROGRESS") == "1"
    with Progress(TextColumn("[bold]mapping"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=err, disable=not show, transient=True) as bar:
        task = bar.add_task("map", total=None, rate="")
        import time
        t0 = time.perf_counter()

        def progress(done: int, total: int, vectors: int) -> None:
            rate = vectors / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} neurons/s")

        result = map_model(args.source, args.out, opts, overwrite=args.overwrite, progress=progress)
    if args.json:
        _print_json(result.to_dict())
        return 0
    m = result.meta
    out.print(f"[bold]Mapped[/bold] {result.n_vectors:,} vectors ({m['n_rows']:,} rows with both poles) of "
              f"{m['source']['spec']} ({m['family']}: {m['n_layers']} layers x {m['d_mlp']} neurons, "
              f"matrices {','.join(m['decode']['matrices'])}) in {result.seconds:.1f} s, "
              f"{m['timings']['vectors_per_s']:,.0f} vectors/s on {m['device']} ({m['dtype']}, {m['kernel']} kernel).")
    out.print(f"Atlas: {result.path}")
    if result.highlights:
        t = Table(title="Some confident content-word neurons")
        for c in ("neuron", "matrix", "pole", "top token", "p"):
            t.add_column(c)
        for h in result.highlights:
            t.add_row(h["id"], h["matrix"], h["pole"], repr(h["token"]), f"{h['prob']:.3f}")
        out.print(t)
    return 0


# ------------------------------------------------------------------ clamp, generate, verify


def _model_args(p, source: bool = True) -> None:
    from neuronmap.intervene import POSITIONS, POSITIONS_DEFAULT
    from neuronmap.models import DEVICE, DTYPE

    if source:
        p.add_argument("source", nargs="?", default=None,
                       help="checkpoint dir, .gguf file, hub id or packaged model, as for map; default: the demo model")
    p.add_argument("--positions", default=POSITIONS_DEFAULT, help=f"{' | '.join(POSITIONS)} (default {POSITIONS_DEFAULT})")
    p.add_argument("--device", default=DEVICE, help=f"cpu | cuda | auto (default {DEVICE})")
    p.add_argument("--dtype", default=DTYPE, help=f"float32 | bfloat16 (default {DTYPE})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _ratio(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def _note_approximate(concept) -> None:
    if concept.approximate:
        err.print(f"notice: no variant of {concept.text!r} is a single token: measured by its first token(s) "
                  f"{', '.join(repr(t) for t in concept.tokens)}, which stand for more than the concept", markup=False)


def add_clamp(sub) -> None:
    from neuronmap.effects import DEFAULT_SWEEP
    from neuronmap.intervene import SPEC_HELP

    p = sub.add_parser("clamp", help="clamp neurons and measure a concept's next-token probability on neutral prompts")
    p.add_argument("--neuron", action="append", required=True, metavar="SPEC",
                   help=f"neuron and value, repeatable: {SPEC_HELP}")
    p.add_argument("--concept", required=True, help="the word whose next-token probability is measured, e.g. dog")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: ~20 bundled neutral prompts)")
    p.add_argument("--sweep", default=None, metavar="VALUES",
                   help=f"dose-response: one setting per value for every --neuron, e.g. {DEFAULT_SWEEP}")
    _model_args(p)
    p.set_defaults(func=cmd_clamp)


def cmd_clamp(args) -> int:
    from neuronmap.effects import clamp, read_prompts
    from neuronmap.intervene import check_positions, check_values, parse_spec, parse_sweep
    from neuronmap.models import load_model

    specs = [parse_spec(s) for s in args.neuron]
    if args.sweep:
        parse_sweep(args.sweep)  # a typo fails before the model loads
    check_values(specs, args.sweep)
    check_positions(args.positions)
    prompts = read_prompts(args.prompts) if args.prompts else None
    r = clamp(load_model(args.source, args.device, args.dtype), specs, args.concept, prompts, args.sweep, args.positions)
    _note_approximate(r.concept)
    if args.json:
        _print_json(r.to_dict())
        return 0
    out.print(f"Concept [bold]{escape(r.concept.text)}[/bold]: P(next token in {{{escape(', '.join(repr(v) for v in r.concept.tokens))}}}) "
              f"on {len(r.prompts)} prompts, positions {r.positions}.")
    if len(r.outcomes) == 1:
        o = r.outcomes[0]
        t = Table(title=f"{o.label}: baseline vs clamped")
        for c in ("prompt", "p baseline", "p clamped", "ratio", "top baseline", "top clamped"):
            t.add_column(c)
        for i, prompt in enumerate(r.prompts):
            b, c = r.baseline.probs[i], o.probs[i]
            t.add_row(escape(prompt), f"{b:.4f}", f"{c:.4f}", _ratio(c / b) if b > 0 else "inf",
                      _tok(r.baseline.top[i]), _tok(o.top[i]))
        out.print(t)
    t = Table(title="Dose-response" if len(r.outcomes) > 1 else "Summary")
    for c in ("setting", "mean p", "ratio", "prompts raised", "KL on reference (nats/token)"):
        t.add_column(c)
    t.add_row("baseline", f"{r.baseline.mean:.4f}", "1.00x", "-", "0")
    for o in r.outcomes:
        t.add_row(o.label, f"{o.mean:.4f}", _ratio(o.ratio), f"{o.raised}/{len(r.prompts)}", f"{o.kl:.3f}")
    out.print(t)
    return 0


def add_generate(sub) -> None:
    from neuronmap.effects import MAX_NEW_TOKENS, N_SAMPLES, SEED, TEMPERATURE
    from neuronmap.intervene import SPEC_HELP

    p = sub.add_parser("generate", help="sample answers without and with neurons clamped, side by side")
    p.add_argument("--clamp", action="append", required=True, metavar="SPEC", help=f"repeatable: {SPEC_HELP}")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    what.add_argument("--prompt", help="plain text to continue, no chat template")
    p.add_argument("-n", type=int_at_least(1), default=N_SAMPLES, help=f"samples per side (default {N_SAMPLES})")
    p.add_argument("--temperature", type=finite_float(0.0), default=TEMPERATURE, help=f"sampling temperature; 0 is greedy (default {TEMPERATURE:g})")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed, shared by both sides (default {SEED})")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=MAX_NEW_TOKENS, help=f"tokens per sample (default {MAX_NEW_TOKENS})")
    p.add_argument("--concept", action="append", default=[], help="report the share of samples mentioning this word (repeatable)")
    _model_args(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from neuronmap.effects import generate
    from neuronmap.intervene import check_positions, check_values, parse_spec
    from neuronmap.models import load_model

    specs = [parse_spec(s) for s in args.clamp]
    check_values(specs, None)
    check_positions(args.positions)
    m = load_model(args.source, args.device, args.dtype)
    r = generate(m, args.chat if args.chat is not None else args.prompt, specs, args.n, args.temperature, args.seed,
                 args.max_new_tokens, args.concept, args.positions, chat=args.chat is not None)
    if r.notice:
        err.print(f"notice: {r.notice}", markup=False)
    if args.json:
        _print_json(r.to_dict())
        return 0
    t = Table(title=escape(f"{r.text!r}: {len(r.baseline)} samples each, temperature {r.temperature:g}, seed {r.seed}"))
    t.add_column("#")
    t.add_column("baseline")
    t.add_column(f"clamped {r.label}")
    for i, (b, c) in enumerate(zip(r.baseline, r.clamped), 1):
        t.add_row(str(i), escape(b), escape(c))
    out.print(t)
    for s in r.shares:
        out.print(f"Samples mentioning {escape(repr(s.concept))}: baseline {s.baseline:.0%}, clamped {s.clamped:.0%}")
    return 0


def add_verify(sub) -> None:
    from neuronmap.verify import MIN_RATIO, SWEEP, TOP

    p = sub.add_parser("verify", help="clamp an atlas's top neurons for a concept and report which raise it")
    p.add_argument("atlas", help="atlas directory made by `neuronmap map`")
    p.add_argument("concept", help="the word, e.g. dog")
    p.add_argument("--top", type=int_at_least(1), default=TOP, help=f"candidate neurons to test (default {TOP})")
    p.add_argument("--sweep", default=SWEEP, help=f"values to set each neuron to, signed toward the concept (default {SWEEP})")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: the bundled neutral prompts)")
    p.add_argument("--min-ratio", type=finite_float(0.0), default=MIN_RATIO, help=f"ratio at which a neuron counts as causal (default {MIN_RATIO:g})")
    p.add_argument("--source", default=None,
                   help="the model (default: the checkpoint recorded in the atlas, sha256 checked); "
                        "another model's candidates come from the stored top-k")
    _model_args(p, source=False)
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    from neuronmap.effects import read_prompts
    from neuronmap.verify import verify

    prompts = read_prompts(args.prompts) if args.prompts else None
    r = verify(args.atlas, args.concept, args.source, args.top, args.sweep, args.min_ratio, prompts, args.positions,
               args.device, args.dtype)
    _note_approximate(r.concept)
    if args.json:
        _print_json(r.to_dict())
        return 0
    t = Table(title=f"Does clamping raise P({escape(repr(r.concept.text))})? Baseline mean p {r.baseline.mean:.4f} "
                    f"on {len(r.prompts)} prompts; candidates by {r.method} search")
    for c in ["neuron", "found as", *[f"ratio @{v}" for v in r.sweep], "best", "KL (nats/token)", f"causal (>= {r.min_ratio:g}x)"]:
        t.add_column(c)
    for v in r.rows:
        c = v.candidate
        t.add_row(c.id, f"{c.matrix}{c.pole} {_tok(c.token)} p={c.prob:.2f}", *[_ratio(o.ratio) for o in v.outcomes],
                  f"{v.best.value}: {_ratio(v.best.ratio)}", f"{v.best.kl:.3f}", "yes" if v.causal else "no")
    _table(t)
    return 0


# ------------------------------------------------------------------ search, show, stats


def _tok(t: str) -> str:
    """A token as Python writes it, so leading spaces and newlines show; escaped for Rich markup ('[' is a token too)."""
    return escape(repr(t))


def _table(tab: Table) -> None:
    # Piped or redirected output has no width; Rich would squeeze the table into 80 columns.
    (out if out.is_terminal else Console(highlight=False, soft_wrap=True, width=max(out.width, 200))).print(tab)


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
    from neuronmap.atlasdb import token_index_ready

    if stored and token_index_ready(files) is None:
        err.print("building the atlas's token index for --stored lookups (once; saved as token_index.parquet)", markup=False)


def add_search(sub) -> None:
    p = sub.add_parser("search", help="rank an atlas's vectors by the probability they decode to a concept")
    p.add_argument("atlas", help="atlas directory (from `neuronmap map`)")
    p.add_argument("concepts", nargs="+", metavar="CONCEPT", help="word or token, e.g. coffee or ' coffee'")
    _rows_options(p)
    p.add_argument("--top", type=int_at_least(1), default=10, help="hits per concept (default 10)")
    p.add_argument("--min-prob", type=finite_float(0.0, 1.0), default=0.0, help="drop hits below this probability (default 0)")
    p.add_argument("--exact-token", action="store_true", help="match each concept exactly as typed, no variants")
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
    from neuronmap.atlas import open_files
    from neuronmap.search import search

    files = open_files(args.atlas)
    _note_index(files, args.stored)
    r = search(files, args.concepts, args.matrices, args.layers, args.pole, args.top, args.min_prob,
               args.stored, args.weights, not args.exact_token)
    if args.json:
        _print_json(r.to_dict())
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
        toks = ", ".join(f"{_tok(s)} ({i})" for i, s in zip(c.token_ids, c.tokens))
        if c.approximate:
            out.print(f"\n[bold]{_tok(c.text)}[/bold]: [yellow]APPROXIMATE[/yellow], no variant is a single token; matched by "
                      f"its first token {toks}, which stands for more than the concept")
        else:
            out.print(f"\n[bold]{_tok(c.text)}[/bold]: single-token variants {toks}")
        tab = Table(show_edge=False)
        for col in ("rank", "neuron", "matrix", "pole", "p(concept)", "best variant", "top tokens (p)"):
            tab.add_column(col, justify="right" if col in ("rank", "p(concept)") else "left")
        for h in hits.itertuples():
            tops = "  ".join(f"{_tok(a)} {b:.2f}" for a, b in zip(h.top_tokens[:3], h.top_probs[:3]))
            tab.add_row(str(h.rank), h.id, h.matrix, h.pole, f"{h.prob:.3f}", f"{_tok(h.token)} {h.token_prob:.3f}", tops,
                        end_section=False)
        if len(hits):
            _table(tab)
        else:
            out.print("  no row reaches --min-prob" if args.min_prob else "  no row found")
    return 0


def add_show(sub) -> None:
    p = sub.add_parser("show", help="every matrix and pole of one neuron: top tokens, entropy, weight norm, rank")
    p.add_argument("atlas", help="atlas directory")
    p.add_argument("neuron", help="neuron id, e.g. L29N808")
    p.add_argument("--tokens", type=int_at_least(1), default=5, help="top tokens to print per row (default 5)")
    _weights_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    from neuronmap.atlas import open_files
    from neuronmap.search import show

    files = open_files(args.atlas)
    _note_index(files, args.stored)
    n = show(files, args.neuron, args.stored, args.weights)
    if args.json:
        _print_json(n.to_dict())
        return 0
    how = ("exact p of that token over every row, from the weights" if n.rank_method == "exact"
           else "stored p, among only the rows whose top-k holds that token")
    out.print(f"[bold]{n.id}[/bold] (layer {n.layer}, neuron {n.neuron}) of {escape(args.atlas)} "
              f"({files.meta['family']}, {files.meta.get('source', {}).get('spec', '?')}); rank: position for its own top token, by {how}")
    tab = Table(show_edge=False)
    for col in ("matrix", "pole", "|w|", "entropy", "rank for top token", f"top {args.tokens} tokens (p)"):
        tab.add_column(col, justify="right" if col in ("|w|", "entropy", "rank for top token") else "left")
    for r in n.rows.itertuples():
        tops = "  ".join(f"{_tok(a)} {b:.3f}" for a, b in zip(r.tokens[:args.tokens], r.probs[:args.tokens]))
        tab.add_row(r.matrix, r.pole, f"{r.weight_norm:.2f}", f"{r.entropy:.2f}", f"{r.rank:,} of {r.n_ranked:,}", tops)
    _table(tab)
    return 0


def add_stats(sub) -> None:
    p = sub.add_parser("stats", help="per layer and matrix: confident share, entropy, token classes, frequent tokens")
    p.add_argument("atlas", help="atlas directory")
    _rows_options(p)
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also write a PNG of these against depth")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_stats)


def cmd_stats(args) -> int:
    from neuronmap.atlas import open_files
    from neuronmap.stats import TOKEN_CLASSES, plot, stats

    files = open_files(args.atlas)
    if args.plot:
        check_png(args.plot)
    s = stats(files, args.matrices, args.layers, args.pole)
    if args.plot:
        plot(s, args.plot, f"{files.meta.get('source', {}).get('spec', '?')} ({files.meta['family']}): {s.n_rows:,} rows of {args.atlas}")
    if args.json:
        _print_json(s.to_dict())
        return 0
    out.print(f"[bold]stats[/bold] {escape(args.atlas)}: {s.n_rows:,} rows (vector x pole); confident = top token p > 0.5; "
              "token classes of the top token, as defined in `neuronmap.stats.token_class`")
    tab = Table(show_edge=False)
    short = {"word": "word", "subword": "sub", "number": "num", "punctuation": "punct", "whitespace": "space", "other": "other"}
    for col in ("layer", "matrix", "rows", "confident", "H p10", "H p50", "H p90", *[short[k] for k in TOKEN_CLASSES],
                "most frequent top tokens"):
        tab.add_column(col, justify="left" if col in ("matrix", "most frequent top tokens") else "right")
    for r in s.layers.itertuples():
        tab.add_row(str(r.layer), r.matrix, f"{r.rows:,}", f"{100 * r.confident:.1f}%", f"{r.entropy_p10:.2f}",
                    f"{r.entropy_p50:.2f}", f"{r.entropy_p90:.2f}", *[f"{100 * getattr(r, k):.0f}%" for k in TOKEN_CLASSES],
                    "  ".join(f"{_tok(a)} {n}" for a, n in r.top_tokens))
    _table(tab)
    top = Table(title="most frequent top tokens, all rows", show_edge=False)
    for col in ("token", "id", "rows", "share", "class"):
        top.add_column(col, justify="right" if col in ("id", "rows", "share") else "left")
    for r in s.top_tokens.head(10).to_dict("records"):  # records, not itertuples: "class" is a Python keyword
        top.add_row(_tok(r["token"]), str(r["token_id"]), f"{r['rows']:,}", f"{100 * r['share']:.2f}%", r["class"])
    _table(top)
    if args.plot:
        out.print(f"plot: {args.plot}")
    return 0


# ------------------------------------------------------------------ compare


def add_compare(sub) -> None:
    from neuronmap.compare import LEVELS, MIN_PROB, TOP
    from neuronmap.mapper import MapOptions

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
    p.add_argument("--device", default=d.device, help=f"when mapping a model source: auto | cpu | cuda (default {d.device})")
    p.add_argument("--dtype", default=d.dtype, help=f"when mapping a model source: auto | float32 | bfloat16 (default {d.dtype})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_compare)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def cmd_compare(args) -> int:
    from neuronmap.compare import compare, plot
    from neuronmap.mapper import MapOptions

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
        _print_json(c.to_dict())
        return 0
    ma, mb = c.a.meta, c.b.meta
    for name, s, m in (("A", c.a, ma), ("B", c.b, mb)):
        out.print(f"[bold]{name}[/bold] {s.spec} ({m['family']}: {m['n_layers']} layers x {m['d_mlp']} neurons, "
                  f"vocab {m['d_vocab']:,}, top-{m['decode']['top_k']})", markup=True)
    out.print(f"Level: [bold]{c.level}[/bold] ({c.reason}); matrices {','.join(c.matrices)}; "
              f"compared in {c.seconds:.2f} s.")
    if c.neuron is not None:
        _show_neuron(c.neuron)
    else:
        _show_concept(c.concept)
    if args.plot:
        out.print(f"Plot: {args.plot}")
    return 0


def _show_neuron(n) -> None:
    t = Table(title=f"Overall (top-k overlap over k={n.k}; JS in bits; changed = confident in both, p > {n.min_prob}, different top-1)")
    for col in ("matrix", "pole", "vectors", "same top-1", "top-k overlap", "mean JS", "changed"):
        t.add_column(col, justify="left" if col in ("matrix", "pole") else "right")
    for r in n.overall:
        t.add_row(r["matrix"], r["pole"], f"{r['n']:,}", _pct(r["same_top1"]), _pct(r["topk_overlap"]), f"{r['js']:.3f}", f"{r['changed']:,}")
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
        cells = [_pct(by[layer][m][1] / by[layer][m][0]) if m in by[layer] else "" for m in mats]
        tot = [sum(v[i] for v in by[layer].values()) for i in range(3)]
        t.add_row(str(layer), *cells, f"{tot[2] / tot[0]:.3f}")
    out.print(t)
    if n.changed:
        t = Table(title=f"Changed most: {n.n_changed:,} vectors have a confident top-1 in both, and different (most confident first)")
        for col in ("neuron", "matrix", "pole", "A top-1", "p A", "B top-1", "p B"):
            t.add_column(col)
        for r in n.changed:
            t.add_row(r["id"], r["matrix"], r["pole"], repr(r["token_a"]), f"{r['p_a']:.3f}", repr(r["token_b"]), f"{r['p_b']:.3f}")
        out.print(t)
    for title, rows, total in (("gained (confident top-1 in B, in no vector of A)", n.gained, n.n_gained),
                               ("lost (confident top-1 in A, in no vector of B)", n.lost, n.n_lost)):
        out.print(f"Concepts {title}: {total:,}")
        if rows:
            t = Table()
            for col in ("token", "vectors", "best", "matrix", "pole", "p"):
                t.add_column(col)
            for r in rows:
                t.add_row(repr(r["token"]), str(r["n_vectors"]), r["best"], r["matrix"], r["pole"], f"{r['p']:.3f}")
            out.print(t)


def _show_concept(c) -> None:
    corr = "n/a" if c.depth_corr is None else f"{c.depth_corr:.2f}"
    gap = "n/a" if c.depth_gap is None else f"{c.depth_gap:.2f}"
    out.print(f"Concepts (confident top-1 token strings, p > {c.min_prob}, strip+lowercase): A {c.n_a:,}, B {c.n_b:,}, "
              f"shared {c.n_shared:,}; Jaccard {c.jaccard:.3f}; B has {_pct(c.coverage_a)} of A's, A has {_pct(c.coverage_b)} of B's.")
    out.print(f"Relative depth (layer / (n_layers - 1)) of shared concepts: correlation A vs B {corr}, mean |gap| {gap}.")
    if c.shared:
        t = Table(title="Shared concepts, most vectors first")
        for col in ("concept", "A vectors", "A depth", "A best (p)", "B vectors", "B depth", "B best (p)"):
            t.add_column(col, no_wrap=True)
        for r in c.shared:
            a, b = r["a"], r["b"]
            t.add_row(repr(r["concept"]), str(a["n_vectors"]), f"{a['depth']:.2f}", f"{a['best']} {a['matrix']}{a['pole']} ({a['p']:.2f})",
                      str(b["n_vectors"]), f"{b['depth']:.2f}", f"{b['best']} {b['matrix']}{b['pole']} ({b['p']:.2f})")
        out.print(t)
    for title, rows in (("Only in A", c.only_a), ("Only in B", c.only_b)):
        if rows:
            t = Table(title=f"{title}, most vectors first")
            for col in ("concept", "vectors", "depth", "best", "p"):
                t.add_column(col)
            for r in rows:
                t.add_row(repr(r["concept"]), str(r["n_vectors"]), f"{r['depth']:.2f}", f"{r['best']} {r['matrix']}{r['pole']}", f"{r['p']:.2f}")
            out.print(t)


# ------------------------------------------------------------------ main

COMMANDS = [add_map, add_search, add_show, add_stats, add_clamp, add_generate, add_verify, add_compare]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what>; see `neuronmap CMD --help```, exit 2, no usage block."""

    def error(self, message: str):
        raise NeuronmapError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    from neuronmap import __version__

    parser = _Parser(prog="neuronmap", description="Decode MLP neurons with the model's own LM head.")
    parser.add_argument("--version", action="version", version=f"neuronmap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input and interrupts end in one line on stderr, never a traceback.

    Returns:
        0 on success, 2 on bad input; Ctrl-C and SIGTERM exit at once with 130 and 143 (``fsio.exit_on_signals``).
    """
    previous = exit_on_signals()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except NeuronmapError as e:
        err.print(f"error: {e}", markup=False)
        return 2
    except KeyboardInterrupt:  # signals left to the host (not the main thread)
        err.print("interrupted: nothing was written", markup=False)
        return 130
    except Exception as e:
        damaged = _damaged_data(e)
        if damaged is None:
            raise
        err.print(f"error: {damaged}", markup=False)
        return 2
    finally:
        restore_signals(previous)


def _damaged_data(e: Exception) -> str | None:
    """One line for a read error from DuckDB or Arrow: an atlas file that passed its footer checks but is damaged inside."""
    import duckdb
    import pyarrow as pa

    # Errors in neuronmap's own SQL are bugs and keep their traceback; the rest come from the data.
    bugs = (duckdb.ParserException, duckdb.SyntaxException, duckdb.BinderException, duckdb.CatalogException,
            duckdb.InvalidTypeException)
    if not isinstance(e, (duckdb.Error, pa.ArrowInvalid, pa.ArrowIOError)) or isinstance(e, bugs):
        return None
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return (f"cannot read the atlas's data ({first}): a file is damaged; rebuild the atlas with "
            "`neuronmap map SOURCE -o ATLAS --overwrite`")


if __name__ == "__main__":
    sys.exit(main())
