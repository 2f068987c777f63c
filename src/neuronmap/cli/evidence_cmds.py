"""``record`` and ``examples``: parse, call the API, render."""

from __future__ import annotations

import os
import time

from rich.markup import escape
from rich.table import Table

from neuronmap.cli.common import DEVICE_HELP, err, int_at_least, out, print_json, print_table, show_token


def add_record(sub) -> None:
    from neuronmap.runtime.models import DEVICE
    from neuronmap.evidence.record import BATCH_TOKENS, CONTEXT, EXAMPLES, MAX_EXAMPLES

    p = sub.add_parser("record", help="add activation evidence to an atlas: what each neuron fires on in a corpus")
    p.add_argument("atlas", help="atlas directory made by `neuronmap map`")
    p.add_argument("--corpus", required=True, help="a .txt or .md file, a directory of them, .jsonl, .parquet, a dictd "
                   ".dict.dz (e.g. /usr/share/dictd/gcide.dict.dz), or hf:NAME[:CONFIG[:SPLIT]] from the local "
                   "Hugging Face datasets cache; regular files only (no pipes or devices)")
    p.add_argument("--text-column", default=None, help="the text column of a .jsonl, .parquet or hf: corpus (default text)")
    p.add_argument("--every", type=int_at_least(1), default=1,
                   help="read the first of each N documents: a spread-out slice of a large corpus (default 1: all)")
    p.add_argument("--tokens", type=int_at_least(1), default=None, help="record at most this many tokens (default: all)")
    p.add_argument("--context", type=int_at_least(1), default=CONTEXT, help=f"tokens per sequence the model reads (default {CONTEXT})")
    p.add_argument("--examples", type=int_at_least(1), default=EXAMPLES,
                   help=f"top and bottom examples kept per neuron, at most {MAX_EXAMPLES} (default {EXAMPLES})")
    p.add_argument("--batch-tokens", type=int_at_least(1), default=BATCH_TOKENS,
                   help=f"tokens per forward pass (default {BATCH_TOKENS})")
    p.add_argument("--source", default=None,
                   help="the model, if it moved since mapping (its sha256 must match the atlas's); default: the recorded path")
    p.add_argument("--device", default=DEVICE, help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace the evidence the atlas already holds")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_record)


def cmd_record(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from neuronmap.atlas.handle import Atlas
    from neuronmap.evidence.record import RecordOptions, record

    options = RecordOptions(args.text_column, args.every, args.tokens, args.context, args.examples, args.batch_tokens,
                            args.device)
    options.check()  # before the atlas is opened and checked: a bad number is found at once
    atlas = Atlas.open(args.atlas)

    show = not args.json and err.is_terminal or os.environ.get("NEURONMAP_PROGRESS") == "1"
    with Progress(TextColumn("[bold]recording"), BarColumn(), TextColumn("{task.completed:,.0f} tokens"),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=err, disable=not show, transient=True) as bar:
        task = bar.add_task("record", total=args.tokens, rate="")
        t0 = time.perf_counter()

        def progress(done: int) -> None:
            bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")

        r = record(atlas, args.corpus, options, args.source, args.overwrite, progress)
    if args.json:
        print_json(r.to_dict())
        return 0
    e = r.evidence
    out.print(f"[bold]Recorded[/bold] {e['tokens']:,} tokens of {escape(e['corpus']['name'])} ({e['documents']:,} documents, "
              f"{e['sequences']:,} sequences of <= {e['context']} tokens) in {e['record_s']:.1f} s, "
              f"{e['tokens_per_s']:,.0f} tokens/s on {e['device']}; {e['examples']} top and bottom examples per neuron.")
    out.print(f"Atlas: {r.path}", markup=False)
    if e.get("kernel") == "torch" and e["device"] == "cpu":
        from neuronmap.decode import native

        err.print(f"note: the C kernel for record was not used ({escape(str(native.why_not('record')))}); the torch path "
                  "gave the same statistics, about 1.4x slower")
    from neuronmap.evidence.agreement import overall

    _agreement(overall(e["agreement"]), "Agreement of decoded tokens with activations, mean over neurons", "neurons")
    return 0


def _agreement(rows: list[dict], title: str, count: str) -> None:
    """Scores per (matrix, pole) as a table; ``count`` is the key of the number of neurons or examples."""
    t = Table(title=f"{title} (base: another neuron's top-k on the same examples)", show_edge=False)
    for c in ("matrix", "pole", count, "next in top-k", "base", "current in top-k", "base", "effect share", "base"):
        t.add_column(c, justify="left" if c in ("matrix", "pole") else "right")
    f = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for a in rows:
        t.add_row(a["matrix"], a["pole"], f"{a[count]:,}", f(a["next_hit"]), f(a["next_base"]), f(a["current_hit"]),
                  f(a["current_base"]), f(a["effect_share"]), f(a["effect_base"]))
    print_table(t)


def add_examples(sub) -> None:
    p = sub.add_parser("examples", help="one neuron's max- and min-activating contexts, quantiles and agreement")
    p.add_argument("atlas", help="atlas directory with evidence (`neuronmap record`)")
    p.add_argument("neuron", help="neuron id, e.g. L29N750")
    p.add_argument("-n", type=int_at_least(1), default=None, help="examples per pole (default: all kept)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_examples)


def context_line(ex: dict, width: int = 12) -> str:
    """An example as Rich markup: the last ``width`` tokens before, the firing token bold and bracketed, a few after."""
    before = "".join(escape(t) for t in ex["before"][-width:]).replace("\n", "⏎")
    after = "".join(escape(t) for t in ex["after"]).replace("\n", "⏎")
    return f"{before}[bold reverse]{show_token(ex['token'])}[/bold reverse]{after}"


def cmd_examples(args) -> int:
    from neuronmap.atlas.handle import Atlas
    from neuronmap.atlas.evidence import neuron_evidence

    files = Atlas.open(args.atlas)
    ev = neuron_evidence(files, args.neuron, args.n)
    if args.json:
        print_json(ev.to_dict())
        return 0
    render_evidence(ev)
    return 0


def render_evidence(ev) -> None:
    """A ``NeuronEvidence`` as text: statistics, quantiles, max- and min-activating contexts, agreement."""
    out.print(f"[bold]{ev.id}[/bold] in {ev.tokens:,} tokens of {escape(str(ev.corpus['name']))}: mean {ev.stats['mean']:.3f}, "
              f"min {ev.stats['min']:.3f}, max {ev.stats['max']:.3f}, density (share > 0) {100 * ev.stats['density']:.1f}%")
    out.print("quantiles: " + "  ".join(f"{100 * q:g}% {v:.3f}" for q, v in ev.quantiles))
    for pole, title in (("+", "max-activating"), ("-", "min-activating")):
        t = Table(title=f"{title} contexts (firing token reversed)", show_edge=False)
        for c in ("#", "activation", "document", "context"):
            t.add_column(c, justify="right" if c in ("#", "activation") else "left")
        for ex in ev.examples[pole]:
            t.add_row(str(ex["rank"]), f"{ex['activation']:.3f}", escape(f"{ex['doc']}@{ex['position']}"), context_line(ex))
        print_table(t)
    _agreement([{**a, "examples": a["n"]} for a in ev.agreement], "Agreement with the decoded top-k", "examples")
