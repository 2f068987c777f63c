"""Find the vectors that decode to a concept, and inspect one neuron (``Atlas`` in neuronmap.atlas.store wraps both).

``search`` ranks atlas rows (vector x pole) by the probability their decoded
distribution puts on a concept: the sum over its single-token variants
(neuronmap.atlas.concepts). By default the probabilities are exact, for every row,
from a pass over the weights; with ``stored`` they come from the stored top-k
lists (neuronmap.atlas.scoring explains both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neuronmap.atlas.format import AtlasFiles
from neuronmap.atlas.store import choose_rows, connect, sql_path, stored_ranks, stored_top
from neuronmap.atlas.concepts import Concept, expand_concept, read_vocab, vocab_index
from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.evidence import NeuronEvidence, has_evidence, neuron_evidence
from neuronmap.core.ids import ALL_MATRICES, id_letter, neuron_id, parse_neuron_id
from neuronmap.atlas.scoring import TokenProbs, atlas_weights, exact_token_probs

if TYPE_CHECKING:  # the handle calls these functions; they only name its type
    from neuronmap.atlas.handle import Atlas

COLUMNS = ["concept", "rank", "id", "layer", "neuron", "matrix", "pole", "prob", "token", "token_prob",
           "top_tokens", "top_probs", "entropy", "weight_norm", "approximate", "agreement", "agreement_base"]
SORTS = ("prob", "agreement")
POOL = 20  # with --sort agreement: the best POOL x top rows by probability are re-ranked by agreement

TOP = 10  # hits per concept; the CLI's default too
MIN_PROB = 0.0
# Bounds on one search's work (the viewer's requests included): an exact search holds p(variant | row) for every row
# and every variant of every concept, and matching an untokenizable concept tries each of its prefixes.
MAX_CONCEPTS = 64
MAX_CONCEPT_CHARS = 256  # longer than any vocabulary's tokens


@dataclass(frozen=True)
class SearchResult:
    """What ``search`` found.

    Attributes:
        table: one row per hit, best first per concept, columns ``COLUMNS``: ``prob`` is the
            concept's probability (sum over its variants), ``token``/``token_prob`` its most
            probable variant in that row, ``top_tokens``/``top_probs`` the row's stored top 5.
        concepts: the expanded concepts, in the order given.
        method: ``exact`` or ``stored``.
        n_scored: atlas rows considered per concept (in ``stored``, only those whose top-k
            holds a variant can be found).
        top_k: the atlas's stored top-k.
        seconds: wall time.
        atlas: the atlas directory searched.
    """

    table: pd.DataFrame
    concepts: tuple[Concept, ...]
    method: str
    n_scored: int
    top_k: int
    seconds: float
    atlas: Path

    def to_dict(self) -> dict:
        """The serialized form (``--json``, the viewer's API), JSON types only.

        Returns:
            ``{"atlas", "method", "n_scored", "top_k", "seconds", "concepts", "results"}``: ``concepts`` as
            ``Concept.to_dict``, ``results`` one dict per row of ``table`` (nan and inf as None).

        Example:
            >>> search(open_files("demo-atlas"), ["coffee"], top=1).to_dict()["results"][0]["id"]  # doctest: +SKIP
            'L29N750'
        """
        return {"atlas": str(self.atlas), "method": self.method, "n_scored": self.n_scored, "top_k": self.top_k,
                "seconds": round(self.seconds, 3), "concepts": [c.to_dict() for c in self.concepts],
                "results": records(self.table)}


def records(table: pd.DataFrame) -> list[dict]:
    """A table as JSON-typed row dicts: numpy values become Python ones, nan and inf become None.

    Example:
        >>> records(pd.DataFrame({"p": np.array([0.1, np.nan], np.float32), "tokens": [np.array(["a"]), np.array([])]}))
        [{'p': 0.1, 'tokens': ['a']}, {'p': None, 'tokens': []}]
    """
    columns = {str(c): [_jsonable(v) for v in table[c].to_numpy()] for c in table.columns}
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def _jsonable(x):
    """One cell: arrays and tuples (a stats layer's ``(token, rows)`` pairs) become lists; JSON has no nan or inf."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.floating):
        # The shortest decimal that reads back as the same float32 (0.1, not its double's 0.10000000149011612).
        x = float(str(x))
    elif isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _describe(files: AtlasFiles, hits: pd.DataFrame) -> pd.DataFrame:
    """Add each hit's id, stored top 5 tokens, entropy and weight norm, keeping the hits' order."""
    if hits.empty:
        return hits.assign(id=pd.Series(dtype=object), top_tokens=pd.Series(dtype=object), top_probs=pd.Series(dtype=object),
                           entropy=pd.Series(dtype=np.float32), weight_norm=pd.Series(dtype=np.float32))
    # One query per (layer, matrix, pole) block, its neurons as an IN list: each reads only its own block's row groups
    # (one query with IN lists over every key decodes the list columns of every block of every hit's layer, 3x slower
    # on an 8B atlas), and the query grows with the blocks, not the hits (one per hit took minutes for 6,400 hits).
    keys = ["layer", "matrix", "pole", "neuron"]
    blocks = hits.groupby(keys[:3], sort=False)["neuron"].unique()
    one = ("SELECT layer::BIGINT AS layer, matrix::VARCHAR AS matrix, pole::VARCHAR AS pole, neuron::BIGINT AS neuron, id, "
           "tokens[1:5] AS top_tokens, probs[1:5] AS top_probs, entropy, weight_norm FROM read_parquet(?) "
           "WHERE layer = {layer} AND matrix = {matrix} AND pole = {pole} AND neuron IN ({neurons})")
    sql = " UNION ALL ".join(one.format(layer=int(layer), matrix=sql_path(matrix), pole=sql_path(pole),
                                        neurons=",".join(str(int(n)) for n in neurons))
                             for (layer, matrix, pole), neurons in blocks.items())
    found = connect().execute(sql, [str(files.neurons)] * len(blocks)).df()
    ordered = hits.assign(_ord=np.arange(len(hits)), layer=hits["layer"].astype(np.int64), neuron=hits["neuron"].astype(np.int64),
                          matrix=hits["matrix"].astype(str), pole=hits["pole"].astype(str))
    out = ordered.merge(found, on=keys).sort_values("_ord", kind="stable").drop(columns="_ord").reset_index(drop=True)
    return out.astype({k: hits[k].dtype for k in keys})


def search(atlas: Atlas, concepts: list[str], matrices: str | None = None, layers: str | None = None,
           pole: str | None = None, top: int = TOP, min_prob: float = MIN_PROB, stored: bool = False,
           weights: str | None = None, variants: bool = True, sort: str = "prob") -> SearchResult:
    """Rank an atlas's rows by the probability their decoded distribution puts on each concept.

    Where the atlas holds activation evidence (``neuronmap record``), each hit carries its ``agreement``: the
    share of its top activations where the model's actual next token is among the row's decoded top-k
    (``next_hit`` of neuronmap.evidence.agreement), beside ``agreement_base``, another neuron's top-k on the same
    examples; both are None without evidence or where the pole has no examples. ``sort="agreement"`` takes the
    best ``POOL x top`` rows by probability and ranks them by agreement (then probability): the rows whose
    decoded tokens the text corroborates first.

    Args:
        files: the atlas (``open_files``).
        concepts: words or tokens; each expands to its single-token variants.
        matrices, layers, pole: which rows (CLI syntax: ``"up,down"``, ``"0-5,9"``, ``"+"``); default all.
        top: hits kept per concept.
        min_prob: drop hits below this probability.
        stored: use the stored top-k instead of the weights (no weights needed; a lower bound).
        weights: where the weights are now if they moved; their sha256 must match meta.json.
        variants: False matches each concept exactly as typed.
        sort: ``prob`` or ``agreement`` (needs evidence).

    Returns:
        SearchResult.

    Raises:
        NeuronmapError: no concept, more than ``MAX_CONCEPTS`` of them, one longer than ``MAX_CONCEPT_CHARS``, bad
            options, weights changed or moved since mapping, or ``sort="agreement"`` on an atlas without evidence.

    Example:
        >>> r = search(open_files("demo-atlas"), ["coffee"], top=3)  # doctest: +SKIP
        >>> r.table.loc[0, ["id", "matrix", "pole"]].tolist(), round(r.table.loc[0, "prob"], 2)
        (['L29N750', 'up', '+'], 0.99)
    """
    t0 = time.perf_counter()
    if not concepts:
        raise NeuronmapError("no concept given: pass at least one word, e.g. coffee")
    check_concepts(concepts)
    if top < 1:
        raise NeuronmapError(f"top={top} is out of range: expected 1 or more")
    if not 0.0 <= min_prob <= 1.0:
        raise NeuronmapError(f"min_prob={min_prob} is out of range: expected a probability from 0 to 1")
    if sort not in SORTS:
        raise NeuronmapError(f"sort={sort!r} is not known: expected one of {', '.join(SORTS)}")
    if sort == "agreement" and "evidence" not in atlas.meta:
        raise NeuronmapError(f"{atlas.root} holds no activation evidence to sort by: run "
                             f"`neuronmap record {atlas.root} --corpus PATH` first, or leave out sort=agreement")
    pool = top if sort == "prob" else top * POOL
    tokens = read_vocab(atlas)
    index = vocab_index(tokens)
    expanded = tuple(expand_concept(c, index, variants) for c in concepts)
    mats, lays, poles = choose_rows(atlas.meta, matrices, layers, pole)
    n_scored = len(mats) * len(lays) * len(poles) * int(atlas.meta["d_mlp"])
    if stored:
        parts = [stored_top(atlas, list(c.token_ids), mats, lays, poles, pool, min_prob) for c in expanded]
        for hits in parts:
            hits["token"] = [tokens[i] for i in hits.pop("token_id")]
    else:
        ids = list(dict.fromkeys(t for c in expanded for t in c.token_ids))
        tp = exact_token_probs(atlas, atlas_weights(atlas, weights), ids, mats, lays, poles)
        parts = [_exact_top(tp, c, ids, pool, min_prob) for c in expanded]
    for i, (c, hits) in enumerate(zip(expanded, parts)):
        hits = _with_agreement(atlas, hits)
        if sort == "agreement":  # None last; ties by probability, then atlas order (the pool's order)
            hits = hits.assign(_a=hits["agreement"].fillna(-1.0)).sort_values(["_a", "prob"], ascending=False,
                                                                              kind="stable").drop(columns="_a").head(top)
        hits = hits.reset_index(drop=True)
        hits.insert(0, "concept", c.text)
        hits.insert(1, "rank", np.arange(1, len(hits) + 1))
        parts[i] = hits.assign(approximate=c.approximate)
    table = _describe(atlas, pd.concat(parts, ignore_index=True))
    return SearchResult(table[COLUMNS], expanded, "stored" if stored else "exact", n_scored,
                        int(atlas.meta["decode"]["top_k"]), time.perf_counter() - t0, atlas.root)


def check_concepts(concepts: list[str]) -> None:
    """Refuse a search over more than ``MAX_CONCEPTS`` concepts or a concept longer than ``MAX_CONCEPT_CHARS``.

    Raises:
        NeuronmapError: one line with the count or length found, the limit, and what to do.

    Example:
        >>> check_concepts(["coffee"] * 65)
        Traceback (most recent call last):
        neuronmap.core.errors.NeuronmapError: at most 64 concepts per search, got 65: split the query into several searches
    """
    if len(concepts) > MAX_CONCEPTS:
        raise NeuronmapError(f"at most {MAX_CONCEPTS} concepts per search, got {len(concepts):,}: "
                             "split the query into several searches")
    for c in concepts:
        if len(c) > MAX_CONCEPT_CHARS:
            raise NeuronmapError(f"concept {c[:40]!r}... has {len(c):,} characters: at most {MAX_CONCEPT_CHARS} per "
                                 "concept; give a word or token, e.g. coffee")


def _with_agreement(files: AtlasFiles, hits: pd.DataFrame) -> pd.DataFrame:
    """``hits`` with ``agreement`` and ``agreement_base`` (next_hit, next_base) from agreement.parquet, or None."""
    if "evidence" not in files.meta or hits.empty:
        return hits.assign(agreement=pd.Series([None] * len(hits), dtype=object, index=hits.index),
                           agreement_base=pd.Series([None] * len(hits), dtype=object, index=hits.index))
    keys = hits[["layer", "neuron", "matrix", "pole"]].assign(ord=np.arange(len(hits)))
    found = connect().execute(
        "SELECT k.ord, a.next_hit AS agreement, a.next_base AS agreement_base FROM keys k LEFT JOIN read_parquet(?) a "
        "ON a.layer = k.layer AND a.neuron = k.neuron AND a.matrix = k.matrix AND a.pole = k.pole ORDER BY k.ord",
        [str(files.root / "agreement.parquet")]).df()
    return hits.assign(agreement=found["agreement"].to_numpy(), agreement_base=found["agreement_base"].to_numpy())


def _exact_top(tp: TokenProbs, c: Concept, ids: list[int], top: int, min_prob: float) -> pd.DataFrame:
    """The best ``top`` rows of ``tp`` by the concept's summed probability, with its most probable variant."""
    p = tp.probs[:, [ids.index(t) for t in c.token_ids]]  # [n_rows, n_variants]
    score = np.minimum(p.sum(1, dtype=np.float64), 1.0)  # a sum of exact probabilities; fp32 rounding may pass 1
    keep = np.flatnonzero((score > 0) & (score >= min_prob))
    best = keep[np.lexsort((keep, -score[keep]))][:top]  # ties: atlas order
    arg = p[best].argmax(1)
    hits = tp.keys.iloc[best].reset_index(drop=True)
    return hits.assign(prob=score[best], token=[c.tokens[j] for j in arg], token_prob=p[best, arg].astype(np.float64))


# ------------------------------------------------------------------ show


@dataclass(frozen=True)
class NeuronReport:
    """What ``show`` found: every matrix and pole of one neuron.

    Attributes:
        atlas: the atlas directory.
        id, layer, neuron: the neuron (``L29N750``, 29, 750).
        rank_method: ``exact`` (ranked among every row, from the weights) or ``stored``
            (among the rows whose stored top-k holds the token).
        rows: one row per (matrix, pole): ``id layer neuron matrix pole top_token top_prob rank
            n_ranked rank_method entropy weight_norm tokens probs logits`` (``tokens``/``probs``/``logits``: the stored top-k).
        evidence: what the neuron fires on in text (``neuronmap.atlas.evidence.NeuronEvidence``: quantiles, density,
            histogram, examples, agreement), or None where the atlas holds no evidence.
    """

    atlas: Path
    id: str
    layer: int
    neuron: int
    rank_method: str
    rows: pd.DataFrame
    evidence: NeuronEvidence | None = None

    def to_dict(self) -> dict:
        """The serialized form (``--json``, the viewer's API), JSON types only.

        Returns:
            ``{"atlas", "id", "layer", "neuron", "rank_method", "rows", "evidence"}``, ``rows`` one dict per row of
            ``rows``, ``evidence`` as ``NeuronEvidence.to_dict`` (``examples --json``) or None.

        Example:
            >>> show(open_files("demo-atlas"), "L29N750").to_dict()["rows"][2]["top_token"]  # doctest: +SKIP
            ' coffee'
        """
        return {"atlas": str(self.atlas), "id": self.id, "layer": self.layer, "neuron": self.neuron,
                "rank_method": self.rank_method, "rows": records(self.rows),
                "evidence": None if self.evidence is None else self.evidence.to_dict()}


def show(atlas: Atlas, neuron: str, stored: bool = False, weights: str | None = None,
         examples: int = 5) -> NeuronReport:
    """Every matrix and pole of one neuron, with its rank for its own top token.

    The rank of a row for its top token ``t``: 1 + the number of atlas rows (every
    matrix, layer and pole) with a higher ``p(t)``. ``exact`` ranks among all rows
    from the weights; ``stored`` only among rows whose top-k holds ``t``.

    Args:
        files: the atlas.
        neuron: an id such as ``L29N808``.
        stored, weights: as in ``search``.
        examples: activation examples per pole, where the atlas holds evidence.

    Returns:
        NeuronReport, its ``rows`` one per (matrix, pole) the atlas holds.

    Raises:
        NeuronmapError: a malformed or out-of-range id, a layer the atlas lacks, or weights changed.

    Example:
        >>> show(open_files("demo-atlas"), "L29N750").rows[["matrix", "pole", "top_token", "rank"]]  # doctest: +SKIP
    """
    meta = atlas.meta
    letter = id_letter(meta)
    layer, idx = parse_neuron_id(neuron, int(meta["n_layers"]), int(meta["d_mlp"]), letter)
    choose_rows(meta, None, str(layer), None)  # the atlas has this layer
    rows = connect().execute(
        "SELECT id, layer, neuron, matrix, pole, token_ids, tokens, probs, logits, entropy, weight_norm "
        "FROM read_parquet(?) WHERE layer = ? AND neuron = ?", [str(atlas.neurons), layer, idx]).df()
    order = {k: i for i, k in enumerate([*ALL_MATRICES, "+", "-"])}
    rows = rows.sort_values(["matrix", "pole"], key=lambda s: s.map(order)).reset_index(drop=True)
    top = [int(t[0]) for t in rows["token_ids"]]
    if stored:
        first = [float(p[0]) for p in rows["probs"]]
        ranked = [(*r, p) for r, p in zip(stored_ranks(atlas, list(zip(top, first))), first)]
    else:
        ranked = _exact_ranks(atlas, rows, top, layer, idx, weights)
    rows.insert(5, "top_token", [t[0] for t in rows["tokens"]])
    rows.insert(6, "top_prob", [p for _, _, p in ranked])
    rows.insert(7, "rank", [r for r, _, _ in ranked])
    rows.insert(8, "n_ranked", [n for _, n, _ in ranked])
    method = "stored" if stored else "exact"
    rows.insert(9, "rank_method", method)
    ev = neuron_evidence(atlas, neuron_id(layer, idx, letter), examples) if has_evidence(atlas) else None
    return NeuronReport(atlas.root, neuron_id(layer, idx, letter), layer, idx, method, rows.drop(columns=["token_ids"]), ev)


def _exact_ranks(files, rows, top, layer, idx, weights) -> list[tuple[int, int, float]]:
    """(rank, rows ranked, exact p) of each of the neuron's rows for its top token, over every atlas row."""
    dec = files.meta["decode"]
    ids = list(dict.fromkeys(top))
    tp = exact_token_probs(files, atlas_weights(files, weights), ids, list(dec["matrices"]),
                           list(dec["layers"]), ["+", "-"])
    k = tp.keys
    mine = (k["layer"] == layer).to_numpy() & (k["neuron"] == idx).to_numpy()
    out = []
    for r, t in zip(rows.itertuples(), top):
        col = tp.probs[:, ids.index(t)]
        me = np.flatnonzero(mine & (k["matrix"] == r.matrix).to_numpy() & (k["pole"] == r.pole).to_numpy())[0]
        out.append((int((col > col[me]).sum()) + 1, len(k), float(col[me])))
    return out
