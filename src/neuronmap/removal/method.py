"""Remove a concept from a model's weights with TARS, and measure what it removed and what else it changed.

TARS (Davies, Iacovides, Mandic, arXiv 2412.10257) in four steps, with the choices
the paper's abstract leaves open made here (docs/remove.md gives the reasons and
the measurements behind them):

1. **Concept vector**: run a detailed prompt that ends where the concept's name
   comes next; take the residual stream that the final norm reads at its last
   token, minus that stream's mean over the bundled neutral reference text (the
   raw stream is dominated by a few huge dimensions every text shares).
2. **Targeting vector**: perturb it with Gaussian noise (``noise`` x its RMS per
   dimension), decode every candidate through the final norm and LM head
   (neuronmap.decode.engine), keep the one with the highest P(concept); ``rounds`` times.
3. **Affinity**: the cosine between the targeting vector ``t`` and every vector of
   the chosen matrices (gate/up rows read the residual stream, down columns write
   it), either pole: ``select="cosine"`` ranks by it (TARS as published);
   ``select="contribution"`` ranks by what each neuron writes along ``t`` on the
   prompt (mean activation x the down vector's projection on ``t``).
4. **Edit**: replace the ``edits`` best vectors by ``-t`` (in the matched pole's
   frame) scaled to the replaced vector's norm. Concepts are removed one after
   another, each on the model edited so far, and each step is measured.

Two variants of ours replace steps 3-4's direction and ranking with ones read off the
LM head (``down`` only): ``select="unembed"`` (the concept's unembedding minus a few
contrast words') and ``select="specific"`` (what the default, ``auto``, takes for a
concept with bundled neighbour words and prompts; else ``cosine``): the concept's unembedding
made orthogonal to many neighbouring words' (so their logits do not move, to first
order), written by neurons that fire on the concept's prompt and not on prompts about
its neighbours; the chosen down columns keep everything they write except their
component along it, which is reflected ``strength`` times (``edit="reflect"``).

Nothing here writes files: neuronmap.edits writes the edited checkpoint and undoes it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from neuronmap.decode.engine import build_head
from neuronmap.decode.head import logits
from neuronmap.intervene.elicit import ConceptSpec
from neuronmap.intervene.effects import concept_tokens, kl_rows, next_token_logprobs, reference_logprobs
from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.hooks import bundled_text, encode, recording
from neuronmap.runtime.models import Model, find_module
from neuronmap.sources.resolve import open_weights
from neuronmap.removal.options import SPECIFICITY, Edit, Measure, Removal, RemoveOptions, Step, Targeting



# ------------------------------------------------------------------ the model's vectors


def _param(m: Model, tensor: str) -> torch.nn.Parameter:
    return find_module(m.model, tensor).weight


def _vectors(m: Model, matrix: str, layer: int) -> tuple[torch.Tensor, str, int, int]:
    """Every neuron's vector of one matrix and layer, ``[d_mlp, d_model]`` fp32, and where they are stored."""
    tensor, axis, first = m.family.vector_slot(matrix, layer, 0, m.d_mlp)
    w = _param(m, tensor).detach().float()
    w = w if axis == 0 else w.T
    return w[first:first + m.d_mlp], tensor, axis, first


@contextmanager
def applied(m: Model, edits: list[Edit], vectors: list[torch.Tensor]) -> Iterator[None]:
    """The edits written into the loaded model inside the block, the old vectors put back on exit."""
    saved = []
    try:
        with torch.no_grad():
            for e, v in zip(edits, vectors):
                w = _param(m, e.tensor)
                view = w[e.index] if e.axis == 0 else w[:, e.index]
                saved.append((view, view.clone()))
                view.copy_(v.to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for view, old in reversed(saved):
                view.copy_(old)


# ------------------------------------------------------------------ steps 1-4


def _residual(m: Model, text: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The residual stream the final norm reads, ``[seq, d_model]`` fp32, and each layer's activations ``[seq, d_mlp]``."""
    seen: list[torch.Tensor] = []
    norm = find_module(m.model, m.family.final_norm)
    h = norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad(), recording(m) as acts:
            m.model(encode(m, text))
    finally:
        h.remove()
    return seen[-1][0].float().cpu(), [a[0].float().cpu() for a in acts]


def _concept_prob(head, x: torch.Tensor, ids: list[int], chunk: int = 256) -> torch.Tensor:
    """P(concept) of vectors decoded as residual states, ``[n, d_model] -> [n]``."""
    return torch.cat([logits(head, x[i:i + chunk]).log_softmax(-1)[:, ids].exp().sum(-1) for i in range(0, len(x), chunk)])


def _top(head, x: torch.Tensor, tok, k: int = 3) -> tuple[str, ...]:
    return tuple(tok.decode([int(i)]) for i in logits(head, x[None])[0].topk(k).indices)


def whole_concept(m: Model, word: str):
    """The concept's single-token variants (``effects.concept_tokens``), refusing an approximate match.

    Raises:
        NeuronmapError: no variant of ``word`` is a single token of the model's tokenizer.
    """
    c = concept_tokens(m, word)
    if c.approximate:
        raise NeuronmapError(f"concept {word!r} is no single token of this model (its first token "
                             f"{c.tokens[0]!r} stands for more than it): choose a word the tokenizer keeps whole")
    return c


def targeting_vector(m: Model, head, word: str, prompt: str, ref_mean: torch.Tensor,
                     opts: RemoveOptions) -> tuple[torch.Tensor, Targeting, list[torch.Tensor]]:
    """Steps 1-2: the targeting vector ``[d_model]``, its summary, and the prompt's activations (for ``contribution``).

    Raises:
        NeuronmapError: the concept is no single token (``concept_tokens``'s approximate match is refused here).
    """
    c = whole_concept(m, word)
    ids = list(c.token_ids)
    stream, acts = _residual(m, prompt)
    v = stream[-1] - ref_mean  # [d_model]
    gen = torch.Generator().manual_seed(opts.seed)
    scale = opts.noise * float(v.norm()) / math.sqrt(v.numel())
    best, p_best = v, float(_concept_prob(head, v[None], ids)[0])
    approx = p_best
    for _ in range(opts.rounds):
        cand = best[None] + scale * torch.randn(opts.candidates, v.numel(), generator=gen)  # [candidates, d_model]
        p = _concept_prob(head, cand, ids)
        i = int(p.argmax())
        if float(p[i]) > p_best:
            best, p_best = cand[i], float(p[i])
    info = Targeting(word, c.tokens, prompt, approx, p_best, _top(head, best, m.tokenizer),
                     float(torch.cosine_similarity(v, best, 0)))
    return best, info, acts


def unembed_direction(m: Model, head, word: str, contrast: tuple[str, ...]) -> torch.Tensor:
    """The residual direction that raises ``word``'s logit over its contrast words', ``[d_model]``.

    The mean unembedding row of the concept's variants minus that of the contrast words' variants, times the final
    norm's gain (the logit of token i is ``W_U[i] . (gain * x / rms(x))``, so this is the direction in the stream the
    norm reads). With contrast words of the same kind (other capitals for Paris), what the concept shares with them
    ("a capital city") cancels, and what is left is specific to the concept.
    """
    row = lambda w: head.W_U[list(whole_concept(m, w).token_ids)].float().mean(0)  # noqa: E731
    d = row(word)
    others = [w for w in contrast if w.strip().lower() != word.strip().lower()]
    if others:
        d = d - torch.stack([row(w) for w in others]).mean(0)
    return (d * head.gain.float()) if head.gain is not None else d


def check_specs(specs: list[ConceptSpec], opts: RemoveOptions) -> None:
    """Refuse, before the work starts, a concept the selection cannot handle.

    ``select="specific"`` needs the concept's neighbour words and prompts: without them it falls back on nothing that
    works (measured: on the demo model "dog" with the raw unembedding and the reference text in their place took the
    control, cat, to 0 at a median KL of 1.7 nats/token). ``select="auto"`` (the default) takes ``cosine`` for such a
    concept instead (``RemoveOptions.for_concept``).

    Raises:
        NeuronmapError: ``specific`` and a concept without ``neighbours`` (or ``contrast``) and ``neighbour_prompts``.
    """
    if opts.select != "specific":
        return
    for s in specs:
        if not (s.neighbours or s.contrast) or not s.neighbour_prompts:
            raise NeuronmapError(f"select=specific needs neighbour words and prompts for {s.word!r}: add "
                                 "\"neighbours\" and \"neighbour_prompts\" for it to a prompts_file=FILE (see docs/remove.md), "
                                 "or pass select=auto (specific where it can run, else cosine: TARS as published)")


def single_tokens(m: Model, words: tuple[str, ...], leave_out: tuple[str, ...] = ()) -> list[str]:
    """The words of ``words`` that are whole single tokens of the model, less those in ``leave_out`` (any case)."""
    out, skip = [], {w.strip().lower() for w in leave_out}
    for w in dict.fromkeys(words):
        if w.strip().lower() in skip:
            continue
        try:
            whole_concept(m, w)
        except NeuronmapError:  # a word the tokenizer splits (or lacks) has no row to protect: skipped
            continue
        out.append(w)
    return out


def specific_direction(m: Model, head, word: str, neighbours: list[str]) -> torch.Tensor:
    """The part of ``word``'s unembedding that no neighbour's shares, in the stream the final norm reads, ``[d_model]``.

    ``gain * mean W_U[concept variants]`` minus its projection on the span of ``gain * mean W_U[variants of w]`` for
    every neighbour ``w``: writing along it moves the concept's logit and, to first order, none of the neighbours'
    (the logit of token i is ``W_U[i] . (gain * x / rms(x))``). With many neighbours of the concept's kind (cities for
    Paris) what the concept shares with its kind is gone; what is left is what only it has.

    Args:
        word: the concept; neighbours: single-token words (``single_tokens``), not the concept nor the control.

    Returns:
        torch.Tensor: ``[d_model]`` fp32, not normalized (all zero only if the concept is in the neighbours' span).

    Raises:
        NeuronmapError: the concept is no single token.

    Example:
        >>> d = specific_direction(m, head, "Paris", ["Rome", "Berlin"])  # doctest: +SKIP
        >>> float(d @ (head.gain * head.W_U[list(whole_concept(m, "Rome").token_ids)].mean(0)))  # doctest: +SKIP
        0.0
    """
    gain = head.gain.float() if head.gain is not None else 1.0
    row = lambda w: gain * head.W_U[list(whole_concept(m, w).token_ids)].float().mean(0)  # noqa: E731
    d = row(word).double()
    if neighbours:
        q, _ = torch.linalg.qr(torch.stack([row(w) for w in neighbours]).T.double())  # [d_model, n_neighbours]
        d = d - q @ (q.T @ d)
    return d.float()


def choose_edits(m: Model, head, word: str, t: torch.Tensor, acts: list[torch.Tensor], matrices: list[str],
                 opts: RemoveOptions, taken: set[tuple[str, int, int]], stored: dict[str, torch.dtype],
                 neighbour_acts: list[list[torch.Tensor]] = ()) -> tuple[list[Edit], list[torch.Tensor]]:
    """Steps 3-4: the ``opts.edits`` best vectors by affinity (none already edited), and their replacements.

    ``t`` is the targeting vector, or for ``select="unembed"``/``"specific"`` the direction of ``unembed_direction``
    or ``specific_direction``. ``select="specific"`` ranks by the neuron's write along ``t`` on the concept's prompt
    (mean activation x projection) less its write on the neighbour prompts (``neighbour_acts``: per prompt, each
    layer's ``[seq, d_mlp]``), keeping only neurons whose write there is below ``SPECIFICITY`` of it.
    ``edit="replace"`` puts ``-t`` (scaled to the old norm) in place of the vector (TARS);
    ``edit="reflect"`` subtracts ``strength`` times the vector's component along ``t`` (2: reverses it) and keeps
    the rest of what it writes.
    """
    opts = opts.resolved()
    th = t / t.norm()
    ranked = []
    for layer in range(m.n_layers):
        a = acts[layer][1:].mean(0)  # [d_mlp] mean activation on the prompt; position 0 is the attention sink
        for matrix in matrices:
            V, tensor, axis, first = _vectors(m, matrix, layer)  # [d_mlp, d_model]
            proj = V.cpu() @ th
            cos = proj / V.norm(dim=1).cpu().clamp_min(1e-30)
            if opts.select == "cosine":
                score, sign = cos.abs(), torch.sign(cos)
            elif opts.select == "specific":
                # What the neuron writes along t on the concept's prompt, and on its neighbours' (mean over prompts).
                # A neuron that writes the concept as much for Rome as for Paris carries "a capital", not Paris:
                # reflecting it would take every capital (and the control) with it.
                w = a * proj  # [d_mlp]
                w_other = torch.stack([x[layer][1:].mean(0) for x in neighbour_acts]).mean(0) * proj if neighbour_acts \
                    else torch.zeros_like(w)
                keep = (w > 0) & (w_other < SPECIFICITY * w)
                score, sign = torch.where(keep, w - w_other.clamp_min(0), torch.zeros_like(w)), torch.sign(a)
            elif matrix == "down":
                # The neuron writes a * down: what it adds along t on the prompt; only positive writes carry the concept.
                score, sign = a * proj, torch.sign(a)
            else:
                score, sign = a.abs() * cos.abs(), torch.sign(cos)
            for n in score.topk(min(opts.edits + len(taken), m.d_mlp)).indices.tolist():
                if (matrix, layer, n) not in taken and float(score[n]) > 0:
                    ranked.append((float(score[n]), matrix, layer, n, float(sign[n]) or 1.0, float(cos[n]),
                                   tensor, axis, first + n, V[n].cpu()))
    ranked.sort(key=lambda r: -r[0])
    edits, vectors = [], []
    for score, matrix, layer, n, sign, cos, tensor, axis, index, old in ranked[:opts.edits]:
        new = -sign * th * old.norm() if opts.edit == "replace" else old - opts.strength * (old @ th) * th
        new = new.to(stored.get(tensor, torch.float32))  # rounded as the checkpoint will hold it
        edits.append(Edit(word, matrix, layer, n, "+" if sign > 0 else "-", tensor, axis, index, sign * cos, score,
                          float(old.norm()), _top(head, sign * old, m.tokenizer), _top(head, sign * new.float(), m.tokenizer)))
        vectors.append(new)
        taken.add((matrix, layer, n))
    return edits, vectors


def _probs(m: Model, rows: tuple[tuple[str, str, str], ...]) -> tuple[float, ...]:
    lp = next_token_logprobs(m, [p for _, p, _ in rows])  # [n_prompts, d_vocab]
    return tuple(float(lp[i, list(concept_tokens(m, a).token_ids)].exp().sum()) for i, (_, _, a) in enumerate(rows))


def remove_concepts(m: Model, specs: list[ConceptSpec], control: ConceptSpec | None, opts: RemoveOptions,
                    stored: dict[str, torch.dtype] | None = None) -> Removal:
    """Remove concepts one after another from the loaded model and measure each step; the model is restored after.

    Args:
        m: the loaded model (edited in memory while this runs, put back on return or error).
        specs: the concepts, in removal order.
        control: a concept that should stay, measured after every step, or None.
        opts: the TARS choices.
        stored: the checkpoint's dtype per tensor name, so the measured edits are what will be written (default fp32).

    Returns:
        Removal: the steps (targeting, edits, measures, collateral KL) and the new vectors.

    Raises:
        NeuronmapError: bad options, a concept that is no single token, a model without a tokenizer.

    Example:
        >>> spec = resolve_spec("paris", concept_specs(), None)  # neuronmap.intervene.elicit  # doctest: +SKIP
        >>> r = remove_concepts(load_model(None), [spec], None, RemoveOptions())  # doctest: +SKIP
        >>> r.steps[0].measures[0].ratio < 1  # doctest: +SKIP
        True
    """
    matrices = opts.check(m.family.matrices)  # edit/strength stay None here: for_concept fills them per concept
    stored = stored or {}
    head = build_head(open_weights(m.source))
    for s in specs:  # a bad concept fails before minutes of work
        whole_concept(m, s.word)
    check_specs(specs, opts)
    ref_stream, _ = _residual(m, bundled_text("reference.txt"))
    ref_mean = ref_stream[1:].mean(0)  # [d_model]
    ref_before = reference_logprobs(m)  # [seq, d_vocab]
    before = {s.word: _probs(m, s.eliciting) for s in [*specs, *([control] if control else [])]}
    steps, edits, vectors, taken = [], [], [], set()
    for k, s in enumerate(specs):
        o = opts.for_concept(s, m.family.matrices)
        with applied(m, edits, vectors):
            t, info, acts = targeting_vector(m, head, s.word, s.prompt, ref_mean, o)
            neighbour_acts = []
            if o.select == "unembed":
                t = unembed_direction(m, head, s.word, s.contrast or ((control.word,) if control else ()))
            elif o.select == "specific":
                # Never the control: its logit must stay an untouched measure, not one protected by construction.
                t = specific_direction(m, head, s.word, single_tokens(m, s.neighbours or s.contrast,
                                                                      (s.word, *((control.word,) if control else ()))))
                neighbour_acts = [_residual(m, p)[1] for p in s.neighbour_prompts]  # check_specs: there are some
            new_edits, new_vectors = choose_edits(m, head, s.word, t, acts, matrices, o, taken, stored, neighbour_acts)
        edits, vectors = edits + new_edits, vectors + new_vectors
        with applied(m, edits, vectors):
            measures = [Measure(x.word, "removed", x.eliciting, before[x.word], _probs(m, x.eliciting)) for x in specs[:k + 1]]
            if control:
                measures.append(Measure(control.word, "control", control.eliciting, before[control.word],
                                        _probs(m, control.eliciting)))
            per_token = kl_rows(reference_logprobs(m), ref_before)  # [seq]
        steps.append(Step(s.word, info, tuple(new_edits), tuple(measures), float(per_token.median()),
                          float(per_token.quantile(0.95)), {"select": o.select, "edit": o.edit, "strength": o.strength}))
    return Removal(tuple(steps), tuple(vectors))
