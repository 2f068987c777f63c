"""What an intervention does: a concept's next-token probability, collateral KL, generations, and verify.

``clamp`` measures, on neutral prompts, the probability that the next token is
one of a concept's single-token variants (`` dog``, ``dog``, `` Dog``, `` dogs``
...), without and with the intervention, and the KL divergence
``KL(P_clamped || P_baseline)`` of the next-token distributions over the
bundled reference text (nats per token): how much else the intervention
changes. ``generate`` samples answers side by side. ``verify`` takes an atlas's
candidate neurons for a concept and runs the clamp sweep on each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuronmap.errors import NeuronmapError
from neuronmap.intervene import (
    Intervention, Spec, Value, bundled_prompts, bundled_text, check_positions, encode, intervene, parse_sweep, resolve,
)
from neuronmap.models import Model, find_module, require_tokenizer

DEFAULT_SWEEP = "0,5x,10x,20x,50x"


# ------------------------------------------------------------------ concepts


def surface_forms(word: str) -> list[str]:
    """The strings a concept may appear as: lower/Title case, plural, each with and without a leading space.

    Raises:
        NeuronmapError: an empty word.

    Example:
        >>> surface_forms("dog")[:4]
        [' dog', 'dog', ' Dog', 'Dog']
    """
    w = word.strip()
    if not w:
        raise NeuronmapError("empty --concept: give a word, e.g. --concept dog")
    low = w.lower()
    if re.search(r"(s|x|z|ch|sh)$", low):
        plural = low + "es"
    elif re.search(r"[^aeiou]y$", low):
        plural = low[:-1] + "ies"
    else:
        plural = low + "s"
    bases = [w, low, low.capitalize(), plural, plural.capitalize()]
    out: list[str] = []
    for b in bases:
        for s in (" " + b, b):
            if s not in out:
                out.append(s)
    return out


@dataclass(frozen=True)
class Concept:
    """A concept's single-token variants in one model's vocabulary."""

    word: str
    variants: tuple[str, ...]
    token_ids: tuple[int, ...]


def concept_tokens(m: Model, word: str) -> Concept:
    """The variants of ``word`` that are one token each in ``m``'s tokenizer.

    Raises:
        NeuronmapError: none of them is a single token.

    Example:
        >>> concept_tokens(m, "dog").variants  # doctest: +SKIP
        (' dog', 'dog', ' Dog', 'Dog', ' dogs', 'dogs', ' Dogs')
    """
    tok = require_tokenizer(m)
    forms = surface_forms(word)
    variants, ids = [], []
    for v in forms:
        enc = tok.encode(v, add_special_tokens=False)
        if len(enc) == 1 and tok.decode(enc).strip() == v.strip() and enc[0] not in ids:
            variants.append(v)
            ids.append(int(enc[0]))
    if not ids:
        raise NeuronmapError(
            f"concept {word.strip()!r} is not in this model's vocabulary: none of {', '.join(repr(f) for f in forms[:6])} "
            "is a single token; choose a word the tokenizer keeps whole"
        )
    return Concept(word.strip(), tuple(variants), tuple(ids))


def mentions(text: str, word: str) -> bool:
    """Whether ``text`` contains the concept as a whole word (any case, singular or plural)."""
    forms = sorted({f.strip().lower() for f in surface_forms(word)}, key=len, reverse=True)
    return re.search(r"\b(" + "|".join(map(re.escape, forms)) + r")\b", text, re.IGNORECASE) is not None


# ------------------------------------------------------------------ distributions


def next_token_logprobs(m: Model, prompts: list[str], interventions: list[Intervention] = (),
                        positions: str = "all", batch: int = 32) -> torch.Tensor:
    """Log-probabilities of the token after each prompt, ``[n_prompts, d_vocab]`` fp32 on CPU.

    Prompts run in right-padded batches: with causal attention the padding after
    a prompt never changes it, and its last real token is read.
    """
    out = []
    encoded = [encode(m, p)[0] for p in prompts]
    for i in range(0, len(encoded), batch):
        chunk = encoded[i:i + batch]
        seq = max(len(e) for e in chunk)
        ids = torch.zeros(len(chunk), seq, dtype=torch.long, device=m.device)  # [b, seq]
        mask = torch.zeros_like(ids)
        for j, e in enumerate(chunk):
            ids[j, :len(e)], mask[j, :len(e)] = e, 1
        last = mask.sum(-1) - 1  # [b]
        with torch.no_grad(), intervene(m, list(interventions), positions):
            logits = m.model(input_ids=ids, attention_mask=mask).logits  # [b, seq, d_vocab]
        out.append(logits[torch.arange(len(chunk)), last].float().log_softmax(-1).cpu())
    return torch.cat(out)


def reference_logprobs(m: Model, interventions: list[Intervention] = (), positions: str = "all") -> torch.Tensor:
    """Next-token log-probabilities at every position of the reference text, ``[seq, d_vocab]`` fp32 on CPU."""
    ids = encode(m, bundled_text("reference.txt"))
    with torch.no_grad(), intervene(m, list(interventions), positions):
        logits = m.model(ids).logits[0]  # [seq, d_vocab]
    return logits.float().log_softmax(-1).cpu()


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Mean over rows of ``KL(p || q)`` in nats, from log-probabilities ``[n, d_vocab]``."""
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


# ------------------------------------------------------------------ clamp


@dataclass(frozen=True)
class Outcome:
    """One setting's effect (the baseline too).

    Attributes:
        label: ``baseline`` or the specs, e.g. ``L29N808=20x``.
        interventions: the absolute rewrites.
        probs: the concept's next-token probability on each prompt.
        top: the most likely next token on each prompt.
        kl: ``KL(P_clamped || P_baseline)`` over the reference text, nats per token.
        ratio: mean probability over the baseline's mean.
        raised: prompts on which the probability rose.
    """

    label: str
    interventions: tuple[Intervention, ...]
    probs: tuple[float, ...]
    top: tuple[str, ...]
    kl: float
    ratio: float
    raised: int

    @property
    def mean(self) -> float:
        return sum(self.probs) / len(self.probs)


@dataclass(frozen=True)
class ClampReport:
    """Baseline and clamped next-token probabilities of a concept on a set of prompts."""

    concept: Concept
    prompts: tuple[str, ...]
    positions: str
    baseline: Outcome
    outcomes: tuple[Outcome, ...]


class _Baseline:
    """The unclamped distributions, computed once and shared by every setting."""

    def __init__(self, m: Model, concept: Concept, prompts: list[str]):
        self.m, self.concept, self.prompts = m, concept, prompts
        self.next = next_token_logprobs(m, prompts)  # [n_prompts, d_vocab]
        self.ref = reference_logprobs(m)  # [seq, d_vocab]
        self.outcome = self._outcome("baseline", [], self.next, 0.0, None)

    def _outcome(self, label, ivs, logp, kl_value, base: Outcome | None) -> Outcome:
        tok = self.m.tokenizer
        probs = tuple(float(x) for x in logp[:, list(self.concept.token_ids)].exp().sum(-1))
        top = tuple(tok.decode([int(i)]) for i in logp.argmax(-1))
        if base is None:
            return Outcome(label, tuple(ivs), probs, top, kl_value, 1.0, 0)
        mean = sum(probs) / len(probs)
        ratio = mean / base.mean if base.mean > 0 else float("inf")
        raised = sum(p > b for p, b in zip(probs, base.probs))
        return Outcome(label, tuple(ivs), probs, top, kl_value, ratio, raised)

    def measure(self, label: str, ivs: list[Intervention], positions: str) -> Outcome:
        logp = next_token_logprobs(self.m, self.prompts, ivs, positions)
        ref = reference_logprobs(self.m, ivs, positions)
        return self._outcome(label, ivs, logp, kl(ref, self.ref), self.outcome)


def _label(specs: list[Spec], value: Value | None) -> str:
    return " ".join(str(s) if value is None else str(Spec(s.layer, s.neuron, s.mode, value)) for s in specs)


def clamp(m: Model, specs: list[Spec], word: str, prompts: list[str] | None = None, sweep: str | None = None,
          positions: str = "all") -> ClampReport:
    """Measure how intervening on neurons changes a concept's next-token probability.

    Args:
        m: the loaded model.
        specs: the neurons and (without ``sweep``) their values; all act together.
        word: the concept, e.g. ``dog``.
        prompts: prompts to measure on (default: the bundled neutral ones).
        sweep: comma list of values, e.g. ``0,5x,10x,20x,50x``: one setting per value,
            applied to every spec with its own mode.
        positions: one of ``intervene.POSITIONS``.

    Returns:
        ClampReport: the baseline and one outcome per setting.

    Raises:
        NeuronmapError: a bad spec or sweep, a neuron out of range, a concept not in the vocabulary.

    Example:
        >>> r = clamp(m, [parse_spec("L29N808=20x")], "dog")  # doctest: +SKIP
        >>> r.outcomes[0].ratio > 1  # doctest: +SKIP
        True
    """
    check_positions(positions)
    values: list[Value | None] = parse_sweep(sweep) if sweep else [None]
    settings = [(_label(specs, v), resolve(specs, m, v)) for v in values]
    concept = concept_tokens(m, word)
    prompts = list(prompts) if prompts is not None else bundled_prompts()
    if not prompts:
        raise NeuronmapError("no prompts: the prompts file has no non-empty lines")
    base = _Baseline(m, concept, prompts)
    outcomes = tuple(base.measure(label, ivs, positions) for label, ivs in settings)
    return ClampReport(concept, tuple(prompts), positions, base.outcome, outcomes)


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompts file.

    Raises:
        NeuronmapError: missing or unreadable, or no non-empty line.
    """
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise NeuronmapError(f"cannot read --prompts {path} ({type(e).__name__}): pass a UTF-8 text file, one prompt per line") from None
    if not lines:
        raise NeuronmapError(f"--prompts {path} has no non-empty lines: put one prompt per line")
    return lines


# ------------------------------------------------------------------ generate


def chat_input(m: Model, text: str, chat: bool = True) -> tuple[torch.Tensor, str | None]:
    """Token ids ``[1, seq]`` for a user message: the chat template if the tokenizer has one, else the plain text.

    Returns:
        (ids, notice): ``notice`` is a one-line message when a chat was asked for and
        the model has no template, else None.
    """
    tok = require_tokenizer(m)
    if chat and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        return enc["input_ids"].to(m.device), None
    notice = None
    if chat:
        notice = f"{m.source.spec} has no chat template: the message is used as plain text"
    return encode(m, text), notice


def sample(m: Model, ids: torch.Tensor, interventions: list[Intervention] = (), positions: str = "all", n: int = 10,
           temperature: float = 0.7, seed: int = 0, max_new_tokens: int = 24) -> list[str]:
    """``n`` continuations of ``ids`` ``[1, seq]`` with the interventions in place, decoded without special tokens.

    The same seed gives baseline and clamped runs the same random numbers.
    """
    tok = require_tokenizer(m)
    torch.manual_seed(seed)
    if m.device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    batch = ids.repeat(n, 1)  # [n, seq]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad(), intervene(m, list(interventions), positions):
        out = m.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
                               pad_token_id=pad, **sampling)
    return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


@dataclass(frozen=True)
class Share:
    """Fraction of samples that mention a concept (whole word, any case, singular or plural)."""

    concept: str
    baseline: float
    clamped: float


@dataclass(frozen=True)
class GenerateReport:
    """Baseline and clamped samples for one message.

    Attributes:
        label: the specs applied.
        notice: set when a chat was asked for and the model has no chat template.
        shares: one per ``concepts`` given.
    """

    text: str
    label: str
    notice: str | None
    seed: int
    temperature: float
    baseline: tuple[str, ...]
    clamped: tuple[str, ...]
    interventions: tuple[Intervention, ...]
    shares: tuple[Share, ...] = ()


def generate(m: Model, text: str, specs: list[Spec], n: int = 10, temperature: float = 0.7, seed: int = 0,
             max_new_tokens: int = 24, concepts: list[str] = (), positions: str = "all",
             chat: bool = True) -> GenerateReport:
    """Sample answers to ``text`` without and with the interventions, with the same seed.

    Args:
        concepts: words whose share of mentions is reported, e.g. ``["dog", "cat"]``.
        chat: wrap ``text`` in the chat template (plain text with a notice where there is none).

    Raises:
        NeuronmapError: bad specs, no tokenizer, ``n`` or ``max_new_tokens`` below 1, negative temperature.

    Example:
        >>> r = generate(m, "What is your favourite animal?", [parse_spec("L29N808=10x")], concepts=["dog"])  # doctest: +SKIP
        >>> r.shares[0].clamped > r.shares[0].baseline  # doctest: +SKIP
        True
    """
    check_positions(positions)
    if n < 1 or max_new_tokens < 1:
        raise NeuronmapError(f"-n {n} and --max-new-tokens {max_new_tokens} must be at least 1")
    if temperature < 0:
        raise NeuronmapError(f"--temperature {temperature} is negative: use 0 (greedy) or more")
    for c in concepts:
        surface_forms(c)
    ivs = resolve(specs, m)
    ids, notice = chat_input(m, text, chat)
    base = sample(m, ids, [], positions, n, temperature, seed, max_new_tokens)
    clamped = sample(m, ids, ivs, positions, n, temperature, seed, max_new_tokens)

    def share(xs: list[str], c: str) -> float:
        return sum(mentions(x, c) for x in xs) / len(xs)

    shares = tuple(Share(c.strip(), share(base, c), share(clamped, c)) for c in concepts)
    return GenerateReport(text, _label(specs, None), notice, seed, temperature, tuple(base), tuple(clamped),
                          tuple(ivs), shares)


# ------------------------------------------------------------------ verify


@dataclass(frozen=True)
class Candidate:
    """An atlas row whose top tokens include the concept: the neuron, how it was found, and the concept's probability."""

    id: str
    layer: int
    neuron: int
    matrix: str
    pole: str
    token: str
    prob: float


def candidates(atlas_path: str | Path, word: str, top: int = 5) -> list[Candidate]:
    """The atlas's neurons whose decoded top-k holds the concept, best first, one row per neuron.

    A row's score is the summed probability of the concept's surface forms in its
    top-k; a neuron keeps its best row (matrix and pole).

    Raises:
        NeuronmapError: not an atlas, or no neuron decodes to the concept.
    """
    import duckdb

    from neuronmap.atlas import open_files

    files = open_files(atlas_path)
    forms = surface_forms(word)
    rows = duckdb.connect().execute(
        """
        with hits as (
            select id, layer, neuron, matrix, pole,
                   list_filter(list_zip(tokens, probs), lambda t: list_contains(?, t[1])) as hit
            from read_parquet(?) where list_has_any(tokens, ?)
        ), scored as (
            select id, layer, neuron, matrix, pole, hit[1][1] as token,
                   list_sum(list_transform(hit, lambda t: t[2])) as score
            from hits
        )
        select id, layer, neuron, matrix, pole, token, score from scored
        qualify row_number() over (partition by id order by score desc) = 1
        order by score desc, layer, neuron limit ?
        """,
        [forms, str(files.neurons), forms, int(top)],
    ).fetchall()
    if not rows:
        raise NeuronmapError(
            f"no neuron in {atlas_path} has {word.strip()!r} among its decoded top tokens: try another form of the word"
        )
    return [Candidate(r[0], int(r[1]), int(r[2]), r[3], r[4], r[5], float(r[6])) for r in rows]


def concept_sign(m: Model, layer: int, neuron: int, concept: Concept) -> float:
    """+1 or -1: the activation sign whose direct effect (down column through final norm and head) favours the concept."""
    col = m.down_column(layer, neuron)  # [d_model]
    x = torch.stack([col, -col]).to(m.device, m.dtype)  # [2, d_model]
    with torch.no_grad():
        h = find_module(m.model, m.family.final_norm)(x)
        logp = m.model.get_output_embeddings()(h).float().log_softmax(-1)  # [2, d_vocab]
    score = logp[:, list(concept.token_ids)].logsumexp(-1)
    return 1.0 if score[0] >= score[1] else -1.0


@dataclass(frozen=True)
class Verified:
    """One candidate's sweep: the sign used, an outcome per value, and the best one."""

    candidate: Candidate
    sign: float
    outcomes: tuple[Outcome, ...]

    @property
    def best(self) -> Outcome:
        return max(self.outcomes, key=lambda o: o.ratio)


@dataclass(frozen=True)
class VerifyReport:
    concept: Concept
    prompts: tuple[str, ...]
    baseline: Outcome
    rows: tuple[Verified, ...] = field(default_factory=tuple)


def verify(m: Model, atlas_path: str | Path, word: str, top: int = 5, sweep: str = "5x,10x,20x",
           prompts: list[str] | None = None, positions: str = "all") -> VerifyReport:
    """Clamp each of the atlas's top candidates for a concept over a sweep and measure the concept's probability.

    Each candidate is set to ``sign * value``, where the sign is the one whose
    direct effect on the logits favours the concept (``concept_sign``).

    Raises:
        NeuronmapError: as ``candidates`` and ``clamp``.
    """
    check_positions(positions)
    values = parse_sweep(sweep)
    cands = candidates(atlas_path, word, top)
    concept = concept_tokens(m, word)
    prompts = list(prompts) if prompts is not None else bundled_prompts()
    base = _Baseline(m, concept, prompts)
    rows = []
    for c in cands:
        sign = concept_sign(m, c.layer, c.neuron, concept)
        spec = [Spec(c.layer, c.neuron, "set", None)]
        outs = []
        for v in values:
            sv = Value(sign * v.amount + 0.0, v.relative)  # + 0.0: no "-0" label
            outs.append(base.measure(_label(spec, sv), resolve(spec, m, sv), positions))
        rows.append(Verified(c, sign, tuple(outs)))
    return VerifyReport(concept, tuple(prompts), base.outcome, tuple(rows))
