"""Prototype for issue 24: `--select specific` with everything per concept found by the model and a corpus.

Nothing here is written for one concept. For a concept word and the user's eliciting prompts:

1. **Neighbour words** (`neighbour_words`): the vocabulary tokens nearest the concept in the model's unembedding as
   the final norm sees it (cosine of ``gain * W_U[token]`` with ``gain * mean W_U[concept variants]``), of the
   same token class (a leading space, letters only, at least 3 of them, the same capitalisation as the concept), less
   the concept's own variants and forms (one a prefix of the other: " coffees", " Parisian"), less the words in
   ``leave_out`` (the control, which must stay an untouched measure), one per lower-cased form.
2. **Neighbour prompts** (`mine_contexts`): contexts in a corpus that end just before a neighbour word and on which
   the model gives that word P >= ``min_p``; the corpus is GCIDE (Debian's dict-gcide, read with
   `neuronmap.evidence.corpus_sources.dictd_entries`) where installed, else the package's bundled texts.
3. **Direction** (`neuronmap.removal.method.specific_direction`): the concept's gain-scaled unembedding made orthogonal to
   the neighbours', so writing along it moves the concept's logit and, to first order, no neighbour's.
4. **Ranking** (`neuronmap.removal.method.choose_edits` with ``select="specific"``): the down columns that write along the
   direction at the last token of the concept's prompts (mean activation x projection) and write less than
   ``specificity`` of that at the last token of the neighbour prompts; the ``edits`` best are reflected
   ``strength`` times along the direction (``edit="reflect"``).

`remove(m, word, prompts, options)` returns the edits (not applied) and the collateral KL on the bundled reference
text, measured as `neuronmap.removal.method.remove_concepts` measures it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

GCIDE = (Path("/usr/share/dictd/gcide.dict.dz"), Path("/usr/share/dictd/gcide.index"))
_CORPUS: list[str] | None = None


@dataclass(frozen=True)
class Options:
    neighbours: int = 64  # neighbour words protected by the direction
    prompt_neighbours: int = 8  # of those, the nearest whose corpus contexts serve as neighbour prompts
    per_neighbour: int = 2  # contexts kept per neighbour word
    min_p: float = 0.05  # a context is kept when the model gives the word at least this
    context_words: int = 24  # words of context before the word
    specificity: float = 0.25  # neuron's write on neighbour prompts below this share of its write on the concept
    edits: int = 5
    strength: float = 40.0
    position: str = "last"  # where activations are read on a prompt: last token, or mean over positions 1..
    mine_concept: int = 0  # corpus contexts added to the user's prompts for the concept (0: the user's only)


@dataclass
class Result:
    edits: list
    vectors: list
    kl_median: float
    kl_p95: float
    info: dict = field(default_factory=dict)
    direction: torch.Tensor | None = None


# ------------------------------------------------------------------ 1. neighbour words


def _letters(s: str) -> bool:
    return s.startswith(" ") and len(s) >= 4 and s[1:].isalpha() and s[1:].isascii()


def _same_class(word: str, tok: str) -> bool:
    w, t = word.strip(), tok[1:]
    return (w[:1].isupper() == t[:1].isupper()) and (t[1:].islower() or len(t) <= 1)


def _forms(word: str) -> set[str]:
    from neuronmap.atlas.concepts import variant_strings
    return {v.strip().lower() for v in variant_strings(word)}


def _related(a: str, b: str) -> bool:
    """One word a form of the other: the same lower-cased form, or one a prefix of the other (>= 4 letters shared)."""
    a, b = a.lower(), b.lower()
    return a == b or (min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)))


def gain_rows(head) -> torch.Tensor:
    """``gain * W_U``, unit rows, ``[d_vocab, d_model]``."""
    gain = head.gain.float() if head.gain is not None else 1.0
    u = head.W_U.float() * gain
    return u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)


def neighbour_words(m, head, word: str, k: int, leave_out: tuple[str, ...] = (), rows=None) -> list[tuple[str, float]]:
    """The ``k`` nearest same-class words to ``word`` in the gain-scaled unembedding, with their cosines."""
    from neuronmap.atlas.concepts import tokenizer_strings
    from neuronmap.removal.method import whole_concept
    rows = gain_rows(head) if rows is None else rows
    c = whole_concept(m, word)
    v = rows[list(c.token_ids)].mean(0)
    v = v / v.norm()
    cos = rows @ v  # [d_vocab]
    strings = tokenizer_strings(m.tokenizer)
    own = _forms(word)
    skip = set().union(*[_forms(w) for w in leave_out]) if leave_out else set()
    out, seen = [], set()
    for i in cos.argsort(descending=True).tolist():
        s = strings[i]
        if not _letters(s) or not _same_class(word, s):
            continue
        low = s[1:].lower()
        if low in seen or any(_related(low, f) for f in own) or any(_related(low, f) for f in skip):
            continue
        seen.update(_forms(s[1:]))
        out.append((s[1:], float(cos[i])))
        if len(out) >= k:
            break
    return out


# ------------------------------------------------------------------ 2. contexts from a corpus


def corpus_texts() -> list[str]:
    """GCIDE's entries where dict-gcide is installed, else the package's bundled texts."""
    global _CORPUS
    if _CORPUS is None:
        if GCIDE[0].is_file() and GCIDE[1].is_file():
            from neuronmap.evidence.corpus_sources import dictd_entries
            _CORPUS = [t for _, t in dictd_entries(*GCIDE)]
        else:
            from neuronmap.runtime.hooks import bundled_text
            _CORPUS = [bundled_text(n) for n in ("reference.txt", "beekeeping.txt")]
    return _CORPUS


def candidate_contexts(word: str, n: int, context_words: int) -> list[str]:
    """Up to ``n`` distinct contexts that end just before `` word`` (as written, whole word) in the corpus."""
    from neuronmap.intervene.effects import mentions
    pat = re.compile(r"(?<=\s)" + re.escape(word) + r"\b")
    out: list[str] = []
    seen = set()
    for text in corpus_texts():
        if word not in text:
            continue
        for mt in pat.finditer(text):
            before = text[:mt.start()].replace("\n", " ")
            ctx = " ".join(before.split()[-context_words:])
            if len(ctx.split()) < 4 or ctx in seen or mentions(ctx, word):  # not a copy of an earlier mention
                continue
            seen.add(ctx)
            out.append(ctx)
            if len(out) >= n:
                return out
    return out


_MINED: dict = {}


def mine_contexts(m, word: str, keep: int, min_p: float, context_words: int, tries: int = 8) -> list[tuple[str, float]]:
    """Corpus contexts on which the model completes with ``word`` (P >= ``min_p``), best first, at most ``keep``."""
    from neuronmap.intervene.effects import concept_tokens, next_token_logprobs
    key = (word, context_words, tries)
    if key not in _MINED:
        ctx = candidate_contexts(word, tries, context_words)
        ids = list(concept_tokens(m, word).token_ids)
        _MINED[key] = list(zip(ctx, next_token_logprobs(m, ctx)[:, ids].exp().sum(-1).tolist())) if ctx else []
    ctx = [c for c, _ in _MINED[key]]
    p = [x for _, x in _MINED[key]]
    if not ctx:
        return []
    good = sorted(((x, c) for c, x in zip(ctx, p) if x >= min_p), reverse=True)[:keep]
    return [(c, x) for x, c in good]


# ------------------------------------------------------------------ 3-4. direction, ranking, edit


def _acts(m, prompts: list[str], position: str) -> list[torch.Tensor]:
    """Per layer, ``[2, d_mlp]``: row 1 the activation averaged over prompts (row 0 unused, as choose_edits skips it)."""
    from neuronmap.removal.method import _residual
    per = []
    for p in prompts:
        _, acts = _residual(m, p)
        per.append([a[-1] if position == "last" else a[1:].mean(0) for a in acts])
    mean = [torch.stack([x[i] for x in per]).mean(0) for i in range(m.n_layers)]
    return [torch.stack([torch.zeros_like(a), a]) for a in mean]


def remove(m, word: str, prompts: list[str], o: Options = Options(), leave_out: tuple[str, ...] = ()) -> Result:
    """Choose the edits that remove ``word`` (not applied to ``m``) and measure their collateral KL.

    Args:
        prompts: the user's eliciting prompts (each ending where the word comes next).
        leave_out: words never used as neighbours (the control).
    """
    from neuronmap.decode.engine import build_head
    from neuronmap.intervene.effects import kl_rows, reference_logprobs
    from neuronmap.removal.method import applied, choose_edits, specific_direction
    from neuronmap.removal.options import RemoveOptions
    from neuronmap.sources.resolve import open_weights
    head = build_head(open_weights(m.source))
    nbs = neighbour_words(m, head, word, o.neighbours, leave_out)
    words = [w for w, _ in nbs]
    mined = mine_contexts(m, word, o.mine_concept, o.min_p, o.context_words) if o.mine_concept else []
    concept_prompts = list(prompts) + [c for c, _ in mined]
    nprompts = []
    for w in words[:o.prompt_neighbours]:
        nprompts += [(w, c, p) for c, p in mine_contexts(m, w, o.per_neighbour, o.min_p, o.context_words)]
    d = specific_direction(m, head, word, words)
    acts = _acts(m, concept_prompts, o.position)
    nacts = [_acts(m, [c for _, c, _ in nprompts], o.position)] if nprompts else []
    import neuronmap.removal.method as R
    old = R.SPECIFICITY
    R.SPECIFICITY = o.specificity
    try:
        ro = RemoveOptions(select="specific", edits=o.edits, edit="reflect", strength=o.strength)
        edits, vectors = choose_edits(m, head, word, d, acts, ["down"], ro, set(), {}, nacts)
    finally:
        R.SPECIFICITY = old
    ref_before = reference_logprobs(m)
    with applied(m, edits, vectors):
        per_token = kl_rows(reference_logprobs(m), ref_before)
    info = {"neighbours": [[w, round(c, 3)] for w, c in nbs],
            "neighbour_prompts": [[w, c, round(p, 3)] for w, c, p in nprompts],
            "concept_prompts_mined": [[c, round(p, 3)] for c, p in mined],
            "edits": [f"{e.id}{e.pole} score={e.score:.3g}" for e in edits]}
    return Result(edits, vectors, float(per_token.median()), float(per_token.quantile(0.95)), info, d)


def revector(m, edits, d: torch.Tensor, strength: float) -> list[torch.Tensor]:
    """The chosen down columns reflected ``strength`` times along ``d`` (the edits' own vectors for another strength)."""
    from neuronmap.removal.method import _param
    u = d / d.norm()
    out = []
    for e in edits:
        w = _param(m, e.tensor).detach().float()
        old = (w[e.index] if e.axis == 0 else w[:, e.index]).cpu()
        out.append(old - strength * (old @ u) * u)
    return out


def kl(m, edits, vectors, ref_before) -> tuple[float, float]:
    from neuronmap.intervene.effects import kl_rows, reference_logprobs
    from neuronmap.removal.method import applied
    with applied(m, edits, vectors):
        per_token = kl_rows(reference_logprobs(m), ref_before)
    return float(per_token.median()), float(per_token.quantile(0.95))
