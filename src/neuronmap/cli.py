"""The ``neuronmap`` command: each subcommand parses, calls the Python API, prints.

Every command that outputs data takes ``--json``; the default is a Rich table.
Bad input prints ``error: <one line>`` to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console
from rich.table import Table

from neuronmap.errors import NeuronmapError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ map


def add_map(sub) -> None:
    p = sub.add_parser("map", help="decode every MLP neuron of a model into an atlas")
    p.add_argument("source", nargs="?", default=None,
                   help="checkpoint dir, .gguf file, hub id (org/name) or packaged model (smollm2-135m, gemma3-270m); default: the demo model")
    p.add_argument("-o", "--out", required=True, help="atlas directory to create")
    p.add_argument("--matrices", default=None, help="comma list of gate,up,down (default: all the model has)")
    p.add_argument("--layers", default=None, help="layers and ranges, e.g. 0-5,9 (default: all)")
    p.add_argument("--top-k", type=int, default=10, help="tokens kept per vector (default 10)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (bf16 screening, exact fp32 rescoring)")
    p.add_argument("--norm", default="final", help="final (the model's own final norm) | none")
    p.add_argument("--fold-input-norm", action="store_true", help="multiply gate/up vectors by the layer's pre-MLP norm gain")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_map)


def cmd_map(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from neuronmap.mapper import MapOptions, map_model

    opts = MapOptions(matrices=args.matrices, layers=args.layers, top_k=args.top_k, device=args.device,
                      dtype=args.dtype, norm=args.norm, fold_input_norm=args.fold_input_norm)
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
    m = result.meta
    if args.json:
        _print_json({"path": str(result.path), "n_vectors": result.n_vectors, "n_rows": m["n_rows"],
                     "seconds": round(result.seconds, 3), "vectors_per_s": m["timings"]["vectors_per_s"],
                     "family": m["family"], "dtype": m["dtype"], "device": m["device"], "highlights": result.highlights})
        return 0
    out.print(f"[bold]Mapped[/bold] {result.n_vectors:,} vectors ({m['n_rows']:,} rows with both poles) of "
              f"{m['source']['spec']} ({m['family']}: {m['n_layers']} layers x {m['d_mlp']} neurons, "
              f"matrices {','.join(m['decode']['matrices'])}) in {result.seconds:.1f} s, "
              f"{m['timings']['vectors_per_s']:,.0f} vectors/s on {m['device']} ({m['dtype']}).")
    out.print(f"Atlas: {result.path}")
    if result.highlights:
        t = Table(title="Some confident content-word neurons")
        for c in ("neuron", "matrix", "pole", "top token", "p"):
            t.add_column(c)
        for h in result.highlights:
            t.add_row(h["id"], h["matrix"], h["pole"], repr(h["token"]), f"{h['prob']:.3f}")
        out.print(t)
    return 0


# ------------------------------------------------------------------ main

COMMANDS = [add_map]


def build_parser() -> argparse.ArgumentParser:
    from neuronmap import __version__

    parser = argparse.ArgumentParser(prog="neuronmap", description="Decode MLP neurons with the model's own LM head.")
    parser.add_argument("--version", action="version", version=f"neuronmap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NeuronmapError as e:
        err.print(f"error: {e}", markup=False)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted: nothing was written", markup=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
