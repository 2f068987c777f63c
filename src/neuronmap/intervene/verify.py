"""``verify``: clamp an atlas's top neurons for a concept over a sweep and say which are causal.

The candidates come from ``search``: exact, from the weights, when the model
that runs is the one the atlas was mapped from (sha256 checked); from the stored
top-k when another model runs (``source`` names one with other weights). Each
candidate neuron is set to ``sign * value`` for every sweep value, the sign being
the one whose direct effect (its down column through the final norm and the LM
head) favours the concept, and counts as causal when its best ratio reaches
``min_ratio``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from neuronmap.atlas.handle import Atlas
from neuronmap.atlas.concepts import Concept
from neuronmap.intervene.effects import Baseline, Outcome, concept_tokens, neutral_prompts
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import MATRICES, POLES
from neuronmap.runtime.hooks import POSITIONS_DEFAULT, check_positions, resolve
from neuronmap.runtime.specs import Spec, Value, parse_sweep
from neuronmap.runtime.models import DEVICE, DTYPE, Model, find_module, load_model
from neuronmap.atlas.scoring import check_weights
from neuronmap.atlas.search import search
from neuronmap.sources.resolve import resolve_source
from neuronmap.sources.weights import Source

TOP = 5
SWEEP = "5x,10x,20x"
MIN_RATIO = 2.0
_FIX = "or pass source=PATH if the weights only moved"


@dataclass(frozen=True)
class Candidate:
    """A neuron ``search`` found for the concept, by its best row (matrix and pole).

    Attributes:
        prob: that row's probability of the concept (exact, or the stored lower bound).
        token: the concept's most probable variant in that row.
    """

    id: str
    layer: int
    neuron: int
    matrix: str
    pole: str
    token: str
    prob: float

    def to_dict(self) -> dict:
        """JSON types only."""
        return asdict(self)


def candidates(atlas: Atlas, word: str, top: int = TOP, stored: bool = False,
               weights: str | None = None) -> list[Candidate]:
    """The atlas's best neurons for a concept by ``search``, best first, one per neuron (its best row).

    Args:
        files: the atlas.
        word: the concept.
        top: neurons wanted.
        stored, weights: as in ``search``.

    Raises:
        NeuronmapError: as ``search``, or no row of the atlas decodes to the concept.

    Example:
        >>> candidates(Atlas.open("demo-atlas"), "dog", 1)[0].id  # doctest: +SKIP
        'L29N808'
    """
    # A neuron has at most len(MATRICES) * len(POLES) rows: that many per neuron give ``top`` distinct neurons.
    r = search(atlas, [word], top=top * len(MATRICES) * len(POLES), stored=stored, weights=weights)
    t = r.table.drop_duplicates("id").head(top)
    if t.empty:
        raise NeuronmapError(f"no row of {atlas.root} puts any probability on {word.strip()!r}"
                             f"{' in its stored top-k' if stored else ''}: try another form of the word")
    return [Candidate(x.id, int(x.layer), int(x.neuron), x.matrix, x.pole, x.token, float(x.prob)) for x in t.itertuples()]


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
    """One candidate's sweep: the sign used, an outcome per sweep value, and the verdict."""

    candidate: Candidate
    sign: float
    outcomes: tuple[Outcome, ...]
    causal: bool

    @property
    def best(self) -> Outcome:
        return max(self.outcomes, key=lambda o: o.ratio)

    def to_dict(self) -> dict:
        """JSON types only: the candidate's fields, ``sign``, ``causal``, ``best`` and ``sweep`` (outcomes)."""
        return {**self.candidate.to_dict(), "sign": int(self.sign), "causal": self.causal, "best": self.best.to_dict(),
                "sweep": [o.to_dict() for o in self.outcomes]}


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found.

    Attributes:
        atlas: the atlas directory.
        source: the model that ran.
        method: how the candidates were found: ``exact`` or ``stored``.
        sweep: the values tried, unsigned (each candidate's outcomes carry the signed ones).
        min_ratio: the best ratio at which a candidate counts as causal.
        rows: one per candidate, best found first.
    """

    atlas: str
    source: str
    method: str
    concept: Concept
    prompts: tuple[str, ...]
    positions: str
    sweep: tuple[Value, ...]
    min_ratio: float
    baseline: Outcome
    rows: tuple[Verified, ...]

    def to_dict(self) -> dict:
        """JSON types only: the form ``verify --json`` prints."""
        return {"atlas": self.atlas, "source": self.source, "method": self.method, "concept": self.concept.to_dict(),
                "prompts": list(self.prompts), "positions": self.positions, "sweep": [v.to_dict() for v in self.sweep],
                "min_ratio": self.min_ratio, "baseline": self.baseline.to_dict(), "neurons": [v.to_dict() for v in self.rows]}


def atlas_model(atlas: Atlas, source: str | None = None) -> tuple[Source, bool]:
    """The model to run for an atlas, and whether it is the one the atlas was mapped from.

    Args:
        files: the atlas.
        source: another place or model (anything ``resolve_source`` takes); None: the
            checkpoint recorded in meta.json, which must be unchanged.

    Returns:
        (source, same): ``same`` when its files have the sha256 the atlas recorded.

    Raises:
        NeuronmapError: with no ``source``, the recorded checkpoint is missing or changed
            since mapping (one line, as ``search`` says it).
    """
    if source is None:
        return check_weights(atlas, fix=_FIX), True
    try:
        return check_weights(atlas, source, fix=_FIX), True
    except NeuronmapError:
        return resolve_source(source), False  # another model: its candidates come from the stored top-k


def verify(atlas: Atlas, word: str, source: str | None = None, top: int = TOP, sweep: str = SWEEP,
           min_ratio: float = MIN_RATIO, prompts: list[str] | None = None, positions: str = POSITIONS_DEFAULT,
           device: str = DEVICE, dtype: str = DTYPE) -> VerifyReport:
    """Clamp each of the atlas's top candidates for a concept over a sweep; a candidate whose best ratio reaches ``min_ratio`` is causal.

    Args:
        atlas: the opened atlas (``Atlas.open(path)``).
        word: the concept, e.g. ``dog``.
        source: the model to run (default: the checkpoint recorded in the atlas, sha256 checked).
        top: candidate neurons.
        sweep: values each candidate is set to, signed toward the concept.
        min_ratio: the best ratio at which a candidate counts as causal.
        prompts: prompts to measure on (default: the bundled neutral ones).
        positions, device, dtype: as for ``clamp`` and ``load_model``.

    Returns:
        VerifyReport.

    Raises:
        NeuronmapError: its checkpoint changed or missing, bad options, or no candidate.

    Example:
        >>> r = verify(Atlas.open("demo-atlas"), "dog", top=1, sweep="20x")  # doctest: +SKIP
        >>> r.rows[0].candidate.id, r.rows[0].causal
        ('L29N808', True)
    """
    check_positions(positions)
    values = parse_sweep(sweep)
    if top < 1:
        raise NeuronmapError(f"top={top} is out of range: expected 1 or more")
    if not min_ratio > 0:
        raise NeuronmapError(f"min_ratio={min_ratio} is out of range: expected a ratio above 0, e.g. 2")
    src, same = atlas_model(atlas, source)
    cands = candidates(atlas, word, top, stored=not same, weights=source if same else None)
    m = load_model(src, device, dtype)
    concept = concept_tokens(m, word)
    base = Baseline(m, concept, neutral_prompts(prompts))
    rows = []
    for c in cands:
        sign = concept_sign(m, c.layer, c.neuron, concept)
        spec = [Spec(c.layer, c.neuron, "set", None)]
        signed = [Value(sign * v.amount + 0.0, v.relative) for v in values]  # + 0.0: no "-0" label
        outs = tuple(base.measure(spec, v, resolve(spec, m, v), positions) for v in signed)
        rows.append(Verified(c, sign, outs, max(o.ratio for o in outs) >= min_ratio))
    return VerifyReport(str(atlas.root), src.spec, "exact" if same else "stored", concept, tuple(base.prompts), positions,
                        tuple(values), min_ratio, base.outcome, tuple(rows))
