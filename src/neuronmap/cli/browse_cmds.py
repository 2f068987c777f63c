"""``layer``, ``similar``, ``serve``: parse, call the API (neuronmap.atlas.browse, neuronmap.atlas.similar, neuronmap.viewer), render."""

from __future__ import annotations

import contextlib

from rich.markup import escape
from rich.table import Table

from neuronmap.cli.common import DEVICE_HELP, MODEL_DTYPE_HELP, err, int_at_least, out, print_json, print_table, show_token
from neuronmap.core.errors import NeuronmapError


def add_layer(sub) -> None:
    from neuronmap.atlas.browse import MAX_PAGE, PAGE, SORTS
    from neuronmap.atlas.stats import TOKEN_CLASSES

    p = sub.add_parser("layer", help="the neurons of one layer and matrix, sorted by confidence, entropy or norm")
    p.add_argument("atlas", help="atlas directory")
    p.add_argument("layer", type=int_at_least(0), help="layer number, e.g. 29")
    p.add_argument("--matrix", default=None, help="gate, up or down (default up; a feature atlas: enc or dec, default dec)")
    p.add_argument("--pole", default=None, choices=["+", "-", "both"], help="+ (the vector), - (its negation) or both (default)")
    p.add_argument("--sort", default="confidence", choices=SORTS, help="confidence (top-1 p), entropy, norm or neuron (default confidence)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--asc", dest="descending", action="store_false", default=None, help="ascending")
    order.add_argument("--desc", dest="descending", action="store_true", help="descending (default for confidence and norm)")
    p.add_argument("--class", dest="token_class", default=None, choices=TOKEN_CLASSES, help="only rows whose top-1 token is of this class")
    p.add_argument("--offset", type=int_at_least(0), default=0, help="rows to skip (default 0)")
    p.add_argument("--limit", type=int_at_least(1), default=PAGE, help=f"rows to print, at most {MAX_PAGE} (default {PAGE})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_layer)


def cmd_layer(args) -> int:
    from neuronmap.atlas.handle import Atlas
    from neuronmap.atlas.browse import layer_rows

    files = Atlas.open(args.atlas)
    r = layer_rows(files, args.layer, args.matrix, args.pole, args.sort, args.descending, args.token_class, args.offset, args.limit)
    if args.json:
        print_json(r.to_dict())
        return 0
    shown = f"{r.offset + 1}-{r.offset + len(r.rows)}" if len(r.rows) else "none"
    out.print(f"[bold]layer {r.layer}[/bold] {r.matrix} of {escape(args.atlas)}: rows {shown} of {r.n_matching:,}"
              f"{' with a ' + r.token_class + ' top token' if r.token_class else ''}, by {r.sort} "
              f"({'descending' if r.descending else 'ascending'})")
    tab = Table(show_edge=False)
    unit = "feature" if len(r.rows) and "F" in str(r.rows["id"].iloc[0]) else "neuron"  # L20F885: an SAE feature
    for col in (unit, "pole", "top token", "p", "class", "entropy", "|w|", "next tokens"):
        tab.add_column(col, justify="right" if col in ("p", "entropy", "|w|") else "left")
    for x in r.rows.to_dict("records"):
        tab.add_row(x["id"], x["pole"], show_token(x["top_token"]), f"{x['top_prob']:.3f}", x["token_class"], f"{x['entropy']:.3f}",
                    f"{x['weight_norm']:.3f}", "  ".join(show_token(t) for t in list(x["tokens"])[1:4]))
    print_table(tab)
    return 0


def add_similar(sub) -> None:
    from neuronmap.atlas.similar import TOP

    p = sub.add_parser("similar", help="the vectors most aligned with one neuron's, per matrix (|cosine| over the weights)")
    p.add_argument("atlas", help="atlas directory (its weights must be where meta.json says, or at --weights)")
    p.add_argument("neuron", help="neuron id, e.g. L29N750")
    p.add_argument("--matrices", default=None, help="comma list of gate,up,down (default: all the atlas has)")
    p.add_argument("--top", type=int_at_least(1), default=TOP, help=f"hits per matrix (default {TOP})")
    p.add_argument("--weights", default=None, metavar="PATH", help="where the mapped weights are now, if they moved")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_similar)


def cmd_similar(args) -> int:
    from neuronmap.atlas.handle import Atlas
    from neuronmap.atlas.similar import similar

    r = similar(Atlas.open(args.atlas), args.neuron, args.matrices, args.top, args.weights)
    if args.json:
        print_json(r.to_dict())
        return 0
    out.print(f"[bold]{r.id}[/bold]: most aligned vectors by |cosine| over {r.n_compared:,} per matrix; a negative cosine "
              "pairs with the other neuron's - pole")
    tab = Table(show_edge=False)
    for col in ("matrix", "rank", "feature" if "F" in r.id else "neuron", "cosine", "pole", "top token", "p"):
        tab.add_column(col, justify="right" if col in ("rank", "cosine", "p") else "left")
    for x in r.rows.to_dict("records"):
        tab.add_row(x["matrix"], str(x["rank"]), x["id"], f"{x['cosine']:+.3f}", x["pole"], show_token(x["top_token"]), f"{x['top_prob']:.3f}")
    print_table(tab)
    return 0


def add_serve(sub) -> None:
    from neuronmap.runtime.models import DEVICE, DTYPE
    from neuronmap.viewer import HOST, PORT

    p = sub.add_parser("serve", help="open atlases and removal reports in a local browser viewer: search, inspect, "
                                      "compare, steer (offline)")
    # default=[]: argparse counts a "*" positional without a default as required, which the docs would then say.
    p.add_argument("atlases", nargs="*", default=[], metavar="ATLAS",
                   help="atlas directories; only these (and the reports) are readable")
    p.add_argument("--report", action="append", default=[], metavar="EDITED_DIR",
                   help="a directory written by `neuronmap remove` (or its edits.json), shown at /report/NAME; "
                        "repeatable; with no ATLAS the viewer shows the reports alone")
    p.add_argument("--host", default=HOST, help=f"address to bind (default {HOST}: this machine only)")
    p.add_argument("--port", type=int_at_least(0), default=PORT, help=f"port (default {PORT}; 0 picks a free one)")
    p.add_argument("--open", action="store_true", help="open the viewer in the default browser")
    p.add_argument("--device", default=DEVICE, help="where steering runs the model: " + DEVICE_HELP)
    p.add_argument("--dtype", default=DTYPE, help="for steering: " + MODEL_DTYPE_HELP)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import socket

    import uvicorn

    from neuronmap.core.fsio import interrupt_note
    from neuronmap.viewer import LOCAL_HOSTS, create_app

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield  # leave Ctrl-C and SIGTERM to the command's handlers (see below)

    if args.port > 65535:
        raise NeuronmapError(f"--port {args.port} is out of range: expected 0 to 65535")
    app = create_app(args.atlases, args.device, args.dtype, args.host, args.report)
    try:  # bind first, so a busy port is one line, not a server traceback
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)  # from here on, connections wait in the backlog until the server accepts them
    except OSError as e:
        raise NeuronmapError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}): "
                             "pick another --port, or stop what is using it") from e
    port = sock.getsockname()[1]
    wildcard = args.host in ("0.0.0.0", "::", "")
    shown = "127.0.0.1" if wildcard else f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/"
    if args.host not in LOCAL_HOSTS:
        err.print(f"warning: serving on {args.host}: anyone who can reach this address can browse these atlases and run "
                  "the model (steering); use --host 127.0.0.1 to keep it to this machine", markup=False)
    for name, files in app.state.served.atlases.items():
        m = files.meta
        out.print(f"  {escape(name)}: {escape(str(files.root))} ({escape(m['source']['spec'])}, {m['family']}, "
                  f"{m['n_layers']} layers x {m['d_mlp']}, matrices {','.join(m['decode']['matrices'])})")
    for name, r in app.state.served.reports.items():
        out.print(f"  report {escape(name)}: {escape(str(r.path))} (removed {escape(', '.join(s['concept'] for s in r.report['steps']))} "
                  f"from {escape(r.report['source'])})")
    # The command's own handlers (neuronmap.core.fsio.exit_on_signals) stay in place for the whole serve: Ctrl-C and SIGTERM
    # end it at once with one line and 130 / 143. uvicorn's graceful shutdown would wait for requests still computing
    # (a search ran on for minutes), then end as a normal exit; and an interpreter that shuts down normally while the
    # steering thread is inside torch aborts ("terminate called without an active exception"). The viewer writes
    # nothing, so there is nothing to finish first.
    with interrupt_note(lambda: "viewer stopped"):
        out.print(f"neuronmap viewer at [bold]{url}[/bold]{' (and on every address of this machine)' if wildcard else ''} "
                  "(Ctrl-C to stop)", soft_wrap=True)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        _Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    out.print("viewer stopped")
    return 0
