"""``remove``: parse, call ``neuronmap.removal.remove.remove`` (or ``undo``), render."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from neuronmap.cli.common import DEVICE_HELP, err, finite_float, int_at_least, out, print_json, print_table, show_token


def add_remove(sub) -> None:
    from neuronmap.runtime.models import DEVICE
    from neuronmap.removal.options import CANDIDATES, EDIT_DEFAULTS, EDIT_MODES, EDITS, MATRICES, NOISE, ROUNDS, SEED, SELECT, SELECTS, STRENGTH_DEFAULTS, STRENGTH_MAX

    p = sub.add_parser("remove", help="remove a concept from a model's weights (TARS) and measure removal and collateral")
    p.add_argument("source", nargs="?", default=None,
                   help="checkpoint dir, .gguf file, hub id or packaged model, as for map; default: the demo model. "
                        "With --undo: a directory written by remove")
    p.add_argument("--concept", action="append", default=[], metavar="WORD",
                   help="the concept to remove, repeatable (removed one after another), e.g. Paris")
    p.add_argument("-o", "--out", required=True, help="the new checkpoint directory (must not exist, or be empty)")
    p.add_argument("--undo", action="store_true", help="write to -o the checkpoint SOURCE was edited from, byte for byte")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="detailed prompt for a concept, ending where its name comes next; one per --concept, in order "
                        "(default: the bundled one)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSON of concepts: detailed prompt, control and eliciting prompts, as bundled (see docs/remove.md)")
    p.add_argument("--control", default=None, metavar="WORD",
                   help="a concept that should stay, measured after every step (default: the first concept's bundled "
                        "control; '' for none)")
    p.add_argument("--edits", type=int_at_least(1), default=EDITS, help=f"vectors replaced per concept (default {EDITS})")
    p.add_argument("--matrices", default=MATRICES, help=f"vectors that may be edited: some of gate,up,down (default {MATRICES})")
    p.add_argument("--select", choices=SELECTS, default=SELECT,
                   help=f"rank by cosine with the targeting vector (TARS as published), by the neuron's write along it on "
                        f"the prompt (contribution), by its write along the concept's unembedding minus its contrast "
                        f"words' (unembed; down only), or by its write along the part of the concept's unembedding that "
                        f"no neighbour word shares, on the concept's prompt and not on its neighbours' (specific; down "
                        f"only); auto: specific for a concept with bundled neighbour words and prompts (Paris) when "
                        f"only down is edited, else cosine (default {SELECT})")
    p.add_argument("--edit", choices=EDIT_MODES, default=None,
                   help="replace the vector by the reversed direction (TARS), or reflect only its component along it "
                        f"(default: {EDIT_DEFAULTS['specific']} where the selection is specific, {EDIT_DEFAULTS['cosine']} otherwise)")
    # The range is checked by RemoveOptions.check, so the library and the CLI refuse it with the same line.
    p.add_argument("--strength", type=finite_float(), default=None,
                   help="with --edit reflect: times the component subtracted (2 reverses it), above 0 and at most "
                        f"{STRENGTH_MAX:g} (default: {STRENGTH_DEFAULTS['specific']:g} where the selection is specific, "
                        f"{STRENGTH_DEFAULTS['cosine']:g} otherwise)")
    p.add_argument("--noise", type=finite_float(1e-9), default=NOISE,
                   help=f"noise per dimension, times the concept vector's RMS (default {NOISE:g})")
    p.add_argument("--candidates", type=int_at_least(1), default=CANDIDATES, help=f"noisy candidates per round (default {CANDIDATES})")
    p.add_argument("--rounds", type=int_at_least(1), default=ROUNDS, help=f"rounds of noise, each from the best so far (default {ROUNDS})")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed of the noise (default {SEED})")
    p.add_argument("--device", default=DEVICE, help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_remove)


def cmd_remove(args) -> int:
    from neuronmap.removal.undo import undo
    from neuronmap.removal.remove import remove
    from neuronmap.core.errors import NeuronmapError
    from neuronmap.removal.options import RemoveOptions

    if args.undo:
        if args.concept or args.prompt:
            raise NeuronmapError("--undo restores a directory written by remove: give it as SOURCE with -o, and no --concept")
        if args.source is None:
            raise NeuronmapError("--undo needs SOURCE, a directory written by `neuronmap remove`")
        u = undo(args.source, args.out)
        if args.json:
            print_json(u.to_dict())
        else:
            out.print(f"Restored {u.vectors} vectors of {escape(u.edited)} into {escape(u.out)}; the sha256 of each of "
                      f"its {len(u.files)} files ({escape(', '.join(u.files))}) is the original's.")
        return 0
    opts = RemoveOptions(args.edits, args.matrices, args.select, args.noise, args.candidates, args.rounds, args.seed,
                         args.edit, args.strength)
    r = remove(args.source, args.concept, args.out, args.prompt, args.prompts, args.control, opts, args.device)
    if args.json:
        print_json(r.to_dict())
        return _warn_collateral(r.steps)
    for s in r.steps:
        t = s.targeting
        out.print(f"[bold]Removed {escape(repr(s.concept))}[/bold]: targeting vector P(concept) {t.approx_prob:.4f} -> "
                  f"{t.prob:.4f} (top {', '.join(show_token(x) for x in t.top)}); collateral KL on the reference text: "
                  f"median {s.kl_median:.4f}, 95th percentile {s.kl_p95:.4f} nats/token")
        how = s.method["select"] + (f", reflect x{s.method['strength']:g}" if s.method["edit"] == "reflect" else ", replace")
        tab = Table(title=f"Edits for {escape(repr(s.concept))} ({how})")
        for c in ("vector", "cosine", "score", "old norm", "old top tokens", "new top tokens"):
            tab.add_column(c)
        for e in s.edits:
            tab.add_row(f"{e.id} {e.matrix}{e.pole}", f"{e.cosine:.3f}", f"{e.score:.3f}", f"{e.old_norm:.3f}",
                        " ".join(show_token(x) for x in e.old_top), " ".join(show_token(x) for x in e.new_top))
        print_table(tab)
        tab = Table(title=f"P(answer) before and after removing {escape(repr(s.concept))}")
        for c in ("concept", "role", "kind", "prompt", "answer", "before", "after", "ratio"):
            tab.add_column(c)
        for x in s.measures:
            for (kind, prompt, answer), b, a in zip(x.prompts, x.before, x.after):
                tab.add_row(escape(x.concept), x.role, kind, escape(prompt), escape(answer), f"{b:.4f}", f"{a:.4f}",
                            f"{a / b:.3g}x" if b > 0 else "-")
            tab.add_row(escape(x.concept), x.role, "mean", "", "", f"{sum(x.before) / len(x.before):.4f}",
                        f"{sum(x.after) / len(x.after):.4f}", f"{x.ratio:.3g}x" if x.ratio is not None else "-")
        print_table(tab)
    out.print(f"Wrote {escape(r.out)} ({escape(r.base)}; edits.json and originals.safetensors beside; "
              f"undo with `neuronmap remove {escape(r.out)} --undo -o DIR`)")
    return _warn_collateral(r.steps)


def _warn_collateral(steps) -> int:
    # Last, so that it is not scrolled away by the tables; the checkpoint is written all the same (exit 0): how much
    # collateral is acceptable is the user's call, and the report beside it says what was measured.
    for s in steps:
        if w := s.collateral_warning():
            err.print(f"warning: {w}", markup=False, emoji=False)
    return 0
