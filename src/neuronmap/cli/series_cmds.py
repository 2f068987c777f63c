"""``map-many`` and ``trajectory``: a training run's checkpoints mapped, then compared along the run."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from neuronmap.cli.atlas_cmds import map_arguments, map_options
from neuronmap.cli.common import print_json, print_table, show_token, err, finite_float, int_at_least, out
from neuronmap.cli.compare_cmd import percent
from neuronmap.core.fsio import check_png


def add_map_many(sub) -> None:
    p = sub.add_parser("map-many", help="map many sources (e.g. the checkpoints of a training run) into one directory")
    p.add_argument("sources", nargs="*", default=[], metavar="SOURCE", help="model sources, first to last (or --from FILE)")
    p.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                   help="a text file with one source a line (blank lines and # comments skipped)")
    p.add_argument("-o", "--out", required=True, help="directory for the atlases (NNN-NAME each) and series.json: new, empty, or one map-many "
                   "wrote (with --overwrite, also one holding other files; none of them is replaced)")
    map_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_map_many)


def cmd_map_many(args) -> int:
    from neuronmap.core.errors import NeuronmapError
    from neuronmap.compare.series import map_many, read_source_list

    if args.sources and args.from_file:
        raise NeuronmapError("give the sources as arguments or with --from FILE, not both")
    sources = read_source_list(args.from_file) if args.from_file else args.sources
    r = map_many(sources, args.out, map_options(args), overwrite=args.overwrite, resume=args.resume, ray=args.ray,
                 progress=lambda s: err.print(s, markup=False))
    for line in r.notes:
        err.print(f"note: {line}", markup=False)
    if args.json:
        print_json(r.to_dict())
        return 0
    t = Table(title=f"{len(r.atlases)} atlases in {escape(str(r.out))} ({r.seconds:.1f} s)")
    for col in ("atlas", "source", "rows", "seconds"):
        t.add_column(col, justify="right" if col in ("rows", "seconds") else "left")
    for a in r.atlases:
        t.add_row(a["name"], escape(a["spec"]), f"{a['n_rows']:,}", "kept" if a["reused"] else f"{a['seconds']:.1f}")
    print_table(t)
    out.print(f"Next: neuronmap trajectory {r.out}", markup=False)
    return 0


def add_trajectory(sub) -> None:
    from neuronmap.compare import MIN_PROB
    from neuronmap.compare.trajectory import TOP

    p = sub.add_parser("trajectory", help="each checkpoint of a run against the last, and the concepts that appear or vanish")
    p.add_argument("dir", help="the -o of `neuronmap map-many`")
    p.add_argument("--matrices", default=None, help="comma list of gate,up,down (default: all the atlases hold)")
    p.add_argument("--layers", default=None, help="layers and ranges, e.g. 20-29 (default: all the atlases hold)")
    p.add_argument("--min-prob", type=finite_float(0.0, 1.0), default=MIN_PROB,
                   help=f"a top-1 prob above this is confident, for concepts (default {MIN_PROB:g})")
    p.add_argument("--top", type=int_at_least(0), default=TOP, help=f"concepts listed per step and direction; 0 lists all (default {TOP})")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw agreement with the last checkpoint into a PNG")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_trajectory)


def cmd_trajectory(args) -> int:
    from neuronmap.compare.trajectory import plot, trajectory

    if args.plot:
        check_png(args.plot)
    t = trajectory(args.dir, args.matrices, args.layers, args.min_prob, args.top)
    if args.plot:
        plot(t, args.plot)
    if args.json:
        print_json(t.to_dict())
        return 0
    last = t.checkpoints[-1]["name"]
    tab = Table(title=f"Each checkpoint against the last ({escape(last)}): top-k overlap over k={t.k}, JS in bits")
    for col in ("checkpoint", "source", "vectors", "same top-1", "top-k overlap", "mean JS"):
        tab.add_column(col, justify="left" if col in ("checkpoint", "source") else "right")
    for c, r in zip(t.checkpoints, t.overall):
        tab.add_row(escape(c["name"]), escape(c["spec"]), f"{r['n']:,}", percent(r["same_top1"]), percent(r["topk_overlap"]), f"{r['js']:.3f}")
    print_table(tab)
    tab = Table(title="Same top-1 as the last, per layer and matrix (both poles)")
    tab.add_column("layer", justify="right")
    tab.add_column("matrix")
    for c in t.checkpoints:
        tab.add_column(escape(c["name"]), justify="right")
    cells: dict = {}
    for r in t.layers:
        cells.setdefault((r["layer"], r["matrix"]), {})[r["checkpoint"]] = r["same_top1"]
    for (layer, matrix), by in sorted(cells.items()):
        tab.add_row(str(layer), matrix, *[percent(by[i]) for i in range(len(t.checkpoints))])
    print_table(tab)
    out.print(f"Concepts (confident top-1, p > {t.min_prob:g}) that appear or vanish between consecutive checkpoints:")
    for s in t.steps:
        show = lambda rows: "  ".join(f"{show_token(x['token'])} ({x['n_vectors']})" for x in rows) or "-"  # noqa: E731
        out.print(f"  {escape(s['from'])} -> {escape(s['to'])}: +{s['n_gained']:,} {show(s['gained'])}")
        out.print(f"  {' ' * len(s['from'])}    {' ' * len(s['to'])}  -{s['n_lost']:,} {show(s['lost'])}")
    if args.plot:
        out.print(f"Plot: {args.plot}", markup=False)
    return 0
