"""``clamp``, ``generate``, ``verify``: parse, call the API, render."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from neuronmap.cli.common import DEVICE_HELP, MODEL_DTYPE_HELP, err, finite_float, int_at_least, out, print_json, print_table, show_token


def _model_args(p, source: bool = True) -> None:
    from neuronmap.runtime.hooks import POSITIONS, POSITIONS_DEFAULT
    from neuronmap.runtime.models import DEVICE, DTYPE

    if source:
        p.add_argument("source", nargs="?", default=None,
                       help="checkpoint dir, .gguf file, hub id or packaged model, as for map; default: the demo model")
    p.add_argument("--positions", default=POSITIONS_DEFAULT, help=f"{' | '.join(POSITIONS)} (default {POSITIONS_DEFAULT})")
    p.add_argument("--device", default=DEVICE, help=DEVICE_HELP)
    p.add_argument("--dtype", default=DTYPE, help=MODEL_DTYPE_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _ratio(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def _note_approximate(concept) -> None:
    if concept.approximate:
        err.print(f"notice: no variant of {concept.text!r} is a single token: measured by its first token(s) "
                  f"{', '.join(repr(t) for t in concept.tokens)}, which stand for more than the concept", markup=False)


def add_clamp(sub) -> None:
    from neuronmap.intervene.effects import DEFAULT_SWEEP
    from neuronmap.runtime.specs import SPEC_HELP

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
    from neuronmap.intervene.effects import clamp, read_prompts
    from neuronmap.runtime.hooks import check_positions
    from neuronmap.runtime.specs import check_values, parse_spec, parse_sweep
    from neuronmap.runtime.models import load_model

    specs = [parse_spec(s) for s in args.neuron]
    if args.sweep:
        parse_sweep(args.sweep)  # a typo fails before the model loads
    check_values(specs, args.sweep)
    check_positions(args.positions)
    prompts = read_prompts(args.prompts) if args.prompts else None
    r = clamp(load_model(args.source, args.device, args.dtype), specs, args.concept, prompts, args.sweep, args.positions)
    _note_approximate(r.concept)
    if args.json:
        print_json(r.to_dict())
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
                      show_token(r.baseline.top[i]), show_token(o.top[i]))
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
    from neuronmap.intervene.generate import MAX_NEW_TOKENS, N_SAMPLES, SEED, TEMPERATURE
    from neuronmap.runtime.specs import SPEC_HELP

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
    from neuronmap.intervene.generate import generate
    from neuronmap.runtime.hooks import check_positions
    from neuronmap.runtime.specs import check_values, parse_spec
    from neuronmap.runtime.models import load_model

    specs = [parse_spec(s) for s in args.clamp]
    check_values(specs, None)
    check_positions(args.positions)
    m = load_model(args.source, args.device, args.dtype)
    r = generate(m, args.chat if args.chat is not None else args.prompt, specs, args.n, args.temperature, args.seed,
                 args.max_new_tokens, args.concept, args.positions, chat=args.chat is not None)
    if r.notice:
        err.print(f"notice: {r.notice}", markup=False)
    if args.json:
        print_json(r.to_dict())
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
    from neuronmap.intervene.verify import MIN_RATIO, SWEEP, TOP

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
    from neuronmap.intervene.effects import read_prompts
    from neuronmap.atlas.handle import Atlas
    from neuronmap.intervene.verify import verify

    prompts = read_prompts(args.prompts) if args.prompts else None
    r = verify(Atlas.open(args.atlas), args.concept, args.source, args.top, args.sweep, args.min_ratio, prompts, args.positions,
               args.device, args.dtype)
    _note_approximate(r.concept)
    if args.json:
        print_json(r.to_dict())
        return 0
    t = Table(title=f"Does clamping raise P({escape(repr(r.concept.text))})? Baseline mean p {r.baseline.mean:.4f} "
                    f"on {len(r.prompts)} prompts; candidates by {r.method} search")
    for c in ["neuron", "found as", *[f"ratio @{v}" for v in r.sweep], "best", "KL (nats/token)", f"causal (>= {r.min_ratio:g}x)"]:
        t.add_column(c)
    for v in r.rows:
        c = v.candidate
        t.add_row(c.id, f"{c.matrix}{c.pole} {show_token(c.token)} p={c.prob:.2f}", *[_ratio(o.ratio) for o in v.outcomes],
                  f"{v.best.value}: {_ratio(v.best.ratio)}", f"{v.best.kl:.3f}", "yes" if v.causal else "no")
    print_table(t)
    return 0
