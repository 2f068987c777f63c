"""``trace``: parse, call neuronmap.intervene.trace, render."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from neuronmap.cli.common import DEVICE_HELP, MODEL_DTYPE_HELP, int_at_least, out, print_json, print_table, show_token


def add_trace(sub) -> None:
    from neuronmap.intervene.trace import TOP
    from neuronmap.runtime.models import DEVICE, DTYPE

    p = sub.add_parser("trace", help="which neurons wrote a predicted token: every neuron's direct contribution to its "
                                     "logit, labelled from an atlas, and the logit lens per layer")
    p.add_argument("args", nargs="+", metavar="[SOURCE] TEXT",
                   help="the model (checkpoint dir, .gguf, hub id or packaged name; default: the atlas's model, else "
                        "the demo model), then the text to trace")
    p.add_argument("--target", default=None,
                   help="the token whose logit is traced (Paris means ' Paris' where that is one token); "
                        "default: the model's top next token")
    p.add_argument("--atlas", default=None, help="an atlas of the same model (sha256 checked): labels the neurons")
    p.add_argument("--top", type=int_at_least(1), default=TOP, help=f"top and bottom contributors shown (default {TOP})")
    p.add_argument("--positions", default="last",
                   help="last | all | a token index (default last); all also lists each token's most active neurons")
    p.add_argument("--ablate", type=int_at_least(0), default=0, metavar="N",
                   help="zero the top N contributors one at a time and measure the logit change (default 0)")
    p.add_argument("--device", default=DEVICE, help=DEVICE_HELP)
    p.add_argument("--dtype", default=DTYPE, help=MODEL_DTYPE_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_trace)


def cmd_trace(args) -> int:
    from neuronmap.atlas.handle import Atlas
    from neuronmap.core.errors import NeuronmapError
    from neuronmap.intervene.trace import parse_positions, trace, trace_model

    if len(args.args) > 2:
        raise NeuronmapError(f"trace takes [SOURCE] TEXT, got {len(args.args)} arguments: quote the text, "
                             "e.g. neuronmap trace 'The capital of France is'")
    source, text = (None, args.args[0]) if len(args.args) == 1 else args.args
    positions = parse_positions(args.positions)
    atlas = Atlas.open(args.atlas) if args.atlas else None
    r = trace(trace_model(source, atlas, args.device, args.dtype), text, args.target, atlas, args.top, positions,
              args.ablate)
    if args.json:
        print_json(r.to_dict())
        return 0
    for p in r.positions:
        _render_position(r, p)
    if r.ablations:
        t = Table(title="Ablations: each neuron zeroed at the last traced position")
        for c in ("neuron", "direct", "logit change", "change, final norm frozen"):
            t.add_column(c, justify="right" if c != "neuron" else "left")
        for a in r.ablations:
            t.add_row(a.neuron, f"{a.direct:+.4f}", f"{a.change:+.4f}", f"{a.change_frozen:+.4f}")
        print_table(t)
    return 0


def _label(label: dict | None, key: str) -> str:
    if not label or key not in label:
        return ""
    return escape(" ".join(repr(t) for t in label[key][:3]))


def _render_position(r, p) -> None:
    nxt = ", ".join(f"{show_token(t)} {q:.3f}" for t, q in p.next)
    out.print(f"[bold]{escape(repr(r.text))}[/bold] position {p.position} ({show_token(p.token)}): next {nxt}")
    cap = f" (before the softcap {p.logit_before_softcap:.4f})" if p.logit_before_softcap is not None else ""
    out.print(f"Target {show_token(p.target)}: logit {p.logit:.4f}{cap}, p {p.prob:.4f}; sum of contributions "
              f"{p.sum_of_contributions:.4f}, difference {p.difference:+.2e}; final norm scale {p.norm_scale:.4g}")
    t = Table(title=f"Neurons by direct contribution to the {escape(repr(p.target))} logit (top, then bottom)")
    labelled = r.atlas is not None
    for c in ("neuron", "activation", "contribution", *(("down (written)", "up", "gate", "next hit") if labelled else ())):
        t.add_column(c, justify="right" if c in ("activation", "contribution", "next hit") else "left")
    for n in p.neurons:
        hit = ((n.label or {}).get("agreement") or {}).get("next_hit")
        labels = (_label(n.label, "down"), _label(n.label, "up"), _label(n.label, "gate"),
                  "" if hit is None else f"{hit:.2f}") if labelled else ()
        t.add_row(n.neuron, f"{n.activation:+.3f}", f"{n.contribution:+.4f}", *labels)
    print_table(t)
    g = Table(title="Groups (the mlp rows hold the neurons above)")
    g.add_column("group")
    g.add_column("contribution", justify="right")
    big = sorted(p.groups, key=lambda x: -abs(x["contribution"]))[:12]
    for x in big:
        g.add_row(x["group"] + ("" if x["layer"] is None else f" L{x['layer']}"), f"{x['contribution']:+.4f}")
    g.add_row(f"... {len(p.groups) - len(big)} more", "")
    print_table(g)
    lens = ", ".join(f"L{x['layer']} {x['prob']:.3f}" for x in p.lens if x["prob"] >= 0.001)
    out.print(f"Logit lens, P({escape(repr(p.target))}) after each layer (those >= 0.001): {lens or 'none'}")
    if p.active:
        a = Table(title=f"Most active neurons at {escape(repr(p.token))} (by {r.active_rank})")
        for c in ("neuron", "activation", "score", "down (written)"):
            a.add_column(c)
        for x in p.active[:10]:
            a.add_row(x["neuron"], f"{x['activation']:+.3f}", f"{x['score']:.3f}", _label(x.get("label"), "down"))
        print_table(a)
