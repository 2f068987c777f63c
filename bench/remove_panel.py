"""Removal methods measured on the issue 24 panel (bench/remove_panel.json) with the field's editing metrics.

Usage:
    python bench/remove_panel.py --select cosine --half tune            # TARS as published
    python bench/remove_panel.py --select contribution --half tune
    python bench/remove_panel.py --select unembed --edit reflect --strength 2 --half tune
    python bench/remove_panel.py --select general --half tune           # bench/general_removal.py's prototype
    python bench/remove_panel.py --select cosine --concept coffee       # one concept

Each concept is removed alone from the demo model (SmolLM2-135M-Instruct, fp32, CPU), nothing is written but the
result JSON (bench/results/remove-panel/<select>[-tag]-<half>.json). The existing methods run through
`neuronmap.removal.method.remove_concepts` with the concept's first eliciting prompt as TARS's detailed prompt and its
eliciting prompts as what is measured; `general` runs bench/general_removal.py.

Metrics per concept:
- efficacy: P(concept) on the eliciting prompts (used to choose the edits), before and after;
- generalization: each held-out prompt (never seen by the method) passes if P falls >= 10x or below 0.01;
- specificity: the control (the nearest same-kind panel concept, on its own prompt) keeps >= 80% of its P; the
  neighbours (the other same-kind panel concepts, each as mean after / mean before over its panel prompts): the
  median keeps >= 80%;
- collateral: KL(P_edited || P_original) per token of the bundled reference text, median and 95th percentile
  (`neuronmap.removal.method.remove_concepts`'s own measurement; recomputed the same way for `general`).
Pass = held-out all pass, control and median neighbour >= 0.8, median KL < 0.01.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
PANEL = ROOT / "bench" / "remove_panel.json"
OUT = ROOT / "bench" / "results" / "remove-panel"


def probs(m, prompts: list[str], word: str) -> list[float]:
    from neuronmap.intervene.effects import concept_tokens, next_token_logprobs
    ids = list(concept_tokens(m, word).token_ids)
    return next_token_logprobs(m, prompts)[:, ids].exp().sum(-1).tolist()


def measure(m, c: dict, panel: dict) -> dict:
    """Every P the metrics need, on the model as it is now."""
    by = {x["word"]: x for x in panel["concepts"]}
    out = {"eliciting": probs(m, [r["prompt"] for r in c["eliciting"]], c["word"]),
           "heldout": probs(m, [r["prompt"] for r in c["heldout"]], c["word"]),
           "control": probs(m, [c["control"]["prompt"]], c["control"]["word"])[0],
           "neighbours": {}}
    for w in c["neighbours"]:
        n = by[w]
        out["neighbours"][w] = probs(m, [r["prompt"] for r in n["eliciting"] + n["heldout"]], w)
    return out


def verdict(before: dict, after: dict, kl_median: float, kl_p95: float) -> dict:
    gen = [a <= b / 10 or a < 0.01 for b, a in zip(before["heldout"], after["heldout"])]
    control = after["control"] / before["control"]
    nb = {w: (sum(after["neighbours"][w]) / sum(before["neighbours"][w])) for w in before["neighbours"]}
    nb_median = statistics.median(nb.values()) if nb else 1.0
    eff = [a / b for b, a in zip(before["eliciting"], after["eliciting"])]
    ok = {"heldout": all(gen), "control": control >= 0.8, "neighbours": nb_median >= 0.8, "kl": kl_median < 0.01}
    return {"eliciting_ratio": eff, "heldout_ratio": [a / b for b, a in zip(before["heldout"], after["heldout"])],
            "heldout_pass": gen, "control_kept": control, "neighbour_kept": nb, "neighbour_median": nb_median,
            "kl_median": kl_median, "kl_p95": kl_p95, "ok": ok, "pass": all(ok.values())}


def run_existing(m, c: dict, opts):
    """One concept removed by neuronmap.removal.method.remove_concepts: (edits, vectors, kl_median, kl_p95, info)."""
    from neuronmap.intervene.elicit import ConceptSpec
    from neuronmap.removal.method import remove_concepts
    spec = ConceptSpec(c["word"], c["eliciting"][0]["prompt"], None,
                       tuple(("direct", r["prompt"], c["word"]) for r in c["eliciting"]))
    r = remove_concepts(m, [spec], None, opts)
    s = r.steps[0]
    info = {"method": s.method, "targeting_p": s.targeting.prob,
            "edits": [f"{e.matrix}:{e.id}{e.pole}" for e in s.edits]}
    return list(s.edits), list(r.vectors), s.kl_median, s.kl_p95, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--select", default="cosine", help="cosine | contribution | unembed | general")
    ap.add_argument("--half", default="tune", choices=("tune", "heldout", "all"))
    ap.add_argument("--concept", action="append", help="only these concepts (repeatable)")
    ap.add_argument("--edits", type=int, default=None)
    ap.add_argument("--edit", default=None)
    ap.add_argument("--strength", type=float, default=None)
    ap.add_argument("--matrices", default="down")
    ap.add_argument("--set", action="append", default=[], help="general only: NAME=VALUE for general_removal.Options")
    ap.add_argument("--sweep", default="", help="general only: strengths to measure on the same chosen edits, e.g. 2,5,10")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args()

    from neuronmap.runtime.models import load_model
    from neuronmap.removal.method import applied
    from neuronmap.removal.options import RemoveOptions
    panel = json.loads(PANEL.read_text())
    cs = [c for c in panel["concepts"] if args.half == "all" or c["half"] == args.half]
    if args.concept:
        cs = [c for c in panel["concepts"] if c["word"].lower() in {w.lower() for w in args.concept}]
    m = load_model(None)
    OUT.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    for c in cs:
        before = measure(m, c, panel)
        if args.select == "general":
            import general_removal as g
            o = g.Options()
            for kv in args.set:
                k, v = kv.split("=", 1)
                o = replace(o, **{k: type(getattr(o, k))(v)})
            if args.edits is not None:
                o = replace(o, edits=args.edits)
            if args.strength is not None:
                o = replace(o, strength=args.strength)
            res = g.remove(m, c["word"], [r["prompt"] for r in c["eliciting"]], o,
                           leave_out=(c["control"]["word"],))
            edits, vectors, klm, klp, info = res.edits, res.vectors, res.kl_median, res.kl_p95, res.info
            method = {"select": "general", **o.__dict__}
            if args.sweep:
                from neuronmap.intervene.effects import reference_logprobs
                ref = reference_logprobs(m)
                info["sweep"] = {}
                for s in [float(x) for x in args.sweep.split(",")]:
                    vs = g.revector(m, edits, res.direction, s)
                    km, kp = g.kl(m, edits, vs, ref)
                    with applied(m, edits, vs):
                        a = measure(m, c, panel)
                    sv = verdict(before, a, km, kp)
                    info["sweep"][s] = sv
                    print(f"   strength {s:g}: {'PASS' if sv['pass'] else 'fail'} held {' '.join(f'{x:.3g}' for x in sv['heldout_ratio'])}"
                          f" ctl {sv['control_kept']:.2f} nb {sv['neighbour_median']:.2f} KL {km:.4f}", flush=True)
        else:
            kw = {k: v for k, v in (("edits", args.edits), ("edit", args.edit), ("strength", args.strength)) if v is not None}
            opts = RemoveOptions(select=args.select, matrices=args.matrices, **kw)
            edits, vectors, klm, klp, info = run_existing(m, c, opts)
            method = info["method"]
        with applied(m, edits, vectors):
            after = measure(m, c, panel)
        v = verdict(before, after, klm, klp)
        rows.append({"word": c["word"], "kind": c["kind"], "half": c["half"], "control": c["control"]["word"],
                     "before": before, "after": after, **v, "info": info})
        print(f"{c['word']:12s} {'PASS' if v['pass'] else 'fail'} elic {' '.join(f'{x:.3g}' for x in v['eliciting_ratio'])} | "
              f"held {' '.join(f'{x:.3g}' for x in v['heldout_ratio'])} | ctl {c['control']['word']} {v['control_kept']:.2f} | "
              f"nb {v['neighbour_median']:.2f} | KL {v['kl_median']:.4f} {v['kl_p95']:.3f} | "
              f"{' '.join(k for k, ok in v['ok'].items() if not ok)}  ({time.time() - t0:.0f}s)", flush=True)
    n = len(rows)
    summ = {"n": n, "pass": sum(r["pass"] for r in rows),
            **{f"ok_{k}": sum(r["ok"][k] for r in rows) for k in ("heldout", "control", "neighbours", "kl")},
            "kl_median_of_medians": statistics.median(r["kl_median"] for r in rows) if rows else None}
    if args.sweep:
        for s in [float(x) for x in args.sweep.split(",")]:
            vs = [r["info"]["sweep"][s] for r in rows]
            summ[f"sweep_{s:g}"] = {"pass": sum(v["pass"] for v in vs),
                                    **{f"ok_{k}": sum(v["ok"][k] for v in vs) for k in ("heldout", "control", "neighbours", "kl")}}
            print(f"  strength {s:g}: pass {summ[f'sweep_{s:g}']['pass']}/{n} {summ[f'sweep_{s:g}']}")
    print(f"{args.select}{args.tag} {args.half}: pass {summ['pass']}/{n}; held-out {summ['ok_heldout']}, control "
          f"{summ['ok_control']}, neighbours {summ['ok_neighbours']}, KL {summ['ok_kl']}")
    name = f"{args.select}{('-' + args.tag) if args.tag else ''}-{args.half if not args.concept else '+'.join(args.concept)}"
    (OUT / f"{name}.json").write_text(json.dumps({"args": vars(args), "method": method, "summary": summ, "concepts": rows},
                                                 indent=1) + "\n")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
