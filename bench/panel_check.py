"""The concept-removal panel (issue 24): build it once from candidate prompts, then check it on the demo model.

Usage:
    python bench/panel_check.py                  # re-measure bench/remove_panel.json; exit 1 if any prompt has P < 0.1
    python bench/panel_check.py --build          # measure bench/panel_candidates.json and (re)write the panel (done once,
                                                 # before any tuning: do not rebuild it to suit a method)

P is the probability that the next token is one of the concept's single-token variants (`neuronmap.intervene.effects.
concept_tokens`: " coffee", " Coffee" ...), the same measure `neuronmap remove` reports, on SmolLM2-135M-Instruct
(`smollm2-135m`, fp32 on CPU), the prompt encoded as `neuronmap remove` encodes it.

How the panel is built (`--build`), all mechanical once the candidate prompts were written:
- a concept is kept when its " word" is one token and at least 4 of its candidate prompts give P >= 0.1; per kind
  at most 6 concepts, those with the highest 4th-best P (the most robust);
- its passing prompts, by P descending, alternate eliciting (1st, 3rd, 5th) and held-out (2nd, 4th, 6th);
- its control is the panel concept of the same kind nearest to it in the unembedding (cosine of the gain-scaled mean
  row of the variants, as `neuronmap.removal.method.specific_direction` scales them), on that concept's best prompt: the
  similar concept most at risk;
- its neighbours (for the specificity measure) are the other panel concepts of its kind, less the control;
- halves: within each kind the concepts, sorted by name, are shuffled with `random.Random(SEED)` and alternate tune,
  heldout, tune ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PANEL = ROOT / "bench" / "remove_panel.json"
CANDIDATES = ROOT / "bench" / "panel_candidates.json"
THRESHOLD = 0.1
SEED = 24
PER_KIND = 6
MIN_PROMPTS = 4
MAX_EACH = 3  # eliciting and held-out prompts kept per concept


def load():
    from neuronmap.runtime.models import load_model
    return load_model(None)


def probs(m, prompts: list[str], word: str) -> list[float]:
    """P(concept) as the next token after each prompt."""
    from neuronmap.intervene.effects import concept_tokens, next_token_logprobs
    ids = list(concept_tokens(m, word).token_ids)
    if not prompts:
        return []
    return next_token_logprobs(m, prompts)[:, ids].exp().sum(-1).tolist()


def one_token(m, word: str) -> bool:
    return len(m.tokenizer.encode(" " + word, add_special_tokens=False)) == 1


def unembed_rows(m, words: list[str]) -> torch.Tensor:
    """Gain-scaled mean unembedding row of each word's variants, unit length, ``[n, d_model]``."""
    from neuronmap.decode.engine import build_head
    from neuronmap.intervene.effects import concept_tokens
    from neuronmap.sources.resolve import open_weights
    head = build_head(open_weights(m.source))
    gain = head.gain.float() if head.gain is not None else 1.0
    rows = torch.stack([gain * head.W_U[list(concept_tokens(m, w).token_ids)].float().mean(0) for w in words])
    return rows / rows.norm(dim=1, keepdim=True)


def build(m) -> dict:
    cands = json.loads(CANDIDATES.read_text())
    kinds = {k: v for k, v in cands.items() if not k.startswith("_")}
    chosen: dict[str, list[dict]] = {}
    for kind, concepts in kinds.items():
        rows = []
        for word, prompts in concepts.items():
            if not one_token(m, word):
                print(f"skip {word}: ' {word}' is not one token", file=sys.stderr)
                continue
            ps = probs(m, prompts, word)
            good = sorted(((p, q) for q, p in zip(prompts, ps) if p >= THRESHOLD), reverse=True)
            print(f"{kind:9s} {word:12s} {len(good)}/{len(prompts)} prompts with P >= {THRESHOLD}", file=sys.stderr)
            if len(good) >= MIN_PROMPTS:
                rows.append((good[MIN_PROMPTS - 1][0], word, good))
        rows.sort(key=lambda r: (-r[0], r[1]))
        chosen[kind] = [{"word": w, "kind": kind,
                         "eliciting": [{"prompt": q, "p": round(p, 4)} for p, q in good[0:2 * MAX_EACH:2]],
                         "heldout": [{"prompt": q, "p": round(p, 4)} for p, q in good[1:2 * MAX_EACH:2]]}
                        for _, w, good in rows[:PER_KIND]]
    rng = random.Random(SEED)
    out = []
    for kind, cs in chosen.items():
        if len(cs) < 2:
            print(f"kind {kind}: {len(cs)} concept(s), no control possible: left out", file=sys.stderr)
            continue
        words = [c["word"] for c in cs]
        sim = unembed_rows(m, words) @ unembed_rows(m, words).T
        sim.fill_diagonal_(-2)
        order = sorted(words)
        rng.shuffle(order)
        half = {w: ("tune", "heldout")[i % 2] for i, w in enumerate(order)}
        for i, c in enumerate(cs):
            j = int(sim[i].argmax())
            ctl = cs[j]
            best = max(ctl["eliciting"] + ctl["heldout"], key=lambda r: r["p"])
            c["control"] = {"word": ctl["word"], "prompt": best["prompt"], "p": best["p"],
                            "unembed_cosine": round(float(sim[i, j]), 4)}
            c["neighbours"] = [w for w in words if w not in (c["word"], ctl["word"])]
            c["half"] = half[c["word"]]
            out.append(c)
    return {"_about": "Concept-removal panel for issue 24, fixed before any tuning; built and checked by "
                      "bench/panel_check.py (its docstring says how). p: P(next token is one of the concept's "
                      "single-token variants) on the demo model, measured when built.",
            "model": "smollm2-135m", "threshold": THRESHOLD, "seed": SEED, "concepts": out}


def check(m, panel: dict) -> list[str]:
    """Every problem with the panel, re-measured on the model; empty when it is valid."""
    bad = []
    cs = panel["concepts"]
    if len(cs) < 40:
        bad.append(f"{len(cs)} concepts, fewer than 40")
    for c in cs:
        w = c["word"]
        if not one_token(m, w):
            bad.append(f"{w}: ' {w}' is not one token")
        for part in ("eliciting", "heldout"):
            rows = c[part]
            if len(rows) < 2:
                bad.append(f"{w}: {len(rows)} {part} prompt(s), fewer than 2")
            for r, p in zip(rows, probs(m, [r["prompt"] for r in rows], w)):
                if p < panel["threshold"]:
                    bad.append(f"{w} {part} {r['prompt']!r}: P = {p:.4f} < {panel['threshold']}")
                elif abs(p - r["p"]) > 2e-3:
                    print(f"note: {w} {part} {r['prompt']!r}: P = {p:.4f}, recorded {r['p']}", file=sys.stderr)
        ctl = c["control"]
        (p,) = probs(m, [ctl["prompt"]], ctl["word"])
        if p < panel["threshold"]:
            bad.append(f"{w} control {ctl['word']} {ctl['prompt']!r}: P = {p:.4f} < {panel['threshold']}")
        if ctl["word"] == w or ctl["word"] in c["neighbours"] or w in c["neighbours"]:
            bad.append(f"{w}: control or neighbours overlap the concept")
        prompts = {r["prompt"] for r in c["eliciting"]} & {r["prompt"] for r in c["heldout"]}
        if prompts:
            bad.append(f"{w}: prompts both eliciting and held out: {sorted(prompts)}")
    return bad


def summary(panel: dict) -> str:
    kinds: dict[str, dict[str, list[str]]] = {}
    for c in panel["concepts"]:
        kinds.setdefault(c["kind"], {}).setdefault(c["half"], []).append(c["word"])
    lines = [f"{len(panel['concepts'])} concepts"]
    for k, h in kinds.items():
        lines.append(f"  {k:9s} tune: {', '.join(h.get('tune', []))} | heldout: {', '.join(h.get('heldout', []))}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="store_true", help="measure the candidates and write the panel")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    m = load()
    if args.build:
        panel = build(m)
        PANEL.write_text(json.dumps(panel, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {PANEL}")
    panel = json.loads(PANEL.read_text())
    bad = check(m, panel)
    print(summary(panel))
    if bad:
        print(f"PANEL INVALID: {len(bad)} problem(s)", file=sys.stderr)
        for b in bad:
            print("  " + b, file=sys.stderr)
        return 1
    print(f"panel valid: every eliciting, held-out and control prompt has P >= {panel['threshold']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
