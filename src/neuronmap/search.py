"""Find the vectors that decode to a concept, and inspect one neuron.

Two ways to score a vector ``x`` for a token ``t``:

- exact: ``p(t | x) = exp(z_t - lse(x))`` with ``z_t = softcap(final_norm(x) . W_U[t] + b_t)``
  and the log-sum-exp the atlas stored for ``x``. Only the concept's rows of
  ``W_U`` are needed (``[n_tokens, d_model]``), so one streaming pass over the
  weights scores every vector of the atlas, not only those whose top-k holds ``t``.
- stored: the atlas's top-k lists, through DuckDB, with no weights. A vector is
  found only where ``t`` is among its top k, and a concept's probability is a
  lower bound (variants outside the top k count as 0).

A concept is the sum of its single-token variants (see ``expand_concept``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from neuronmap.atlas import AtlasFiles, open_files
from neuronmap.decode import apply_norm, build_head, logits
from neuronmap.errors import NeuronmapError
from neuronmap.ids import MATRICES, parse_layers, parse_matrices, parse_neuron_id, parse_poles
from neuronmap.sources import Source, Weights, file_sha256, open_weights, resolve_source

METHODS = ("exact", "stored")


# ------------------------------------------------------------------ concepts


@dataclass(frozen=True)
class Concept:
    """A concept and the single tokens that stand for it.

    Attributes:
        text: as the user typed it.
        token_ids, tokens: the variants that are single tokens, in the order tried.
        missing: the variants tried that are no single token.
        approximate: no variant is a single token, so ``tokens`` are the first
            tokens (longest vocabulary prefix) of the concept with and without a
            leading space, which stand for more than the concept.
    """

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    missing: tuple[str, ...]
    approximate: bool


def read_vocab(files: AtlasFiles) -> list[str]:
    """Every token id's string (leading space kept), from the atlas's vocab.parquet. ``[d_vocab]``."""
    if not files.vocab.is_file():
        raise NeuronmapError(f"{files.root} has no vocab.parquet: re-create the atlas with `neuronmap map`")
    t = pq.read_table(files.vocab, columns=["token_id", "token"]).sort_by("token_id")
    return t.column("token").to_pylist()


def token_index(tokens: list[str]) -> dict[str, int]:
    """String -> id; where two ids decode to the same string, the lower id wins."""
    index: dict[str, int] = {}
    for i, s in enumerate(tokens):
        index.setdefault(s, i)
    return index


def _plurals(word: str) -> list[str]:
    low = word.lower()
    s, es, ies = ("S", "ES", "IES") if word.isupper() and len(word) > 1 else ("s", "es", "ies")
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return [word + es]
    if len(low) > 1 and low.endswith("y") and low[-2] not in "aeiou":
        return [word[:-1] + ies, word + s]
    return [word + s]


def variant_strings(text: str) -> list[str]:
    """The strings tried for a concept: case forms, a simple plural, each with and without a leading space.

    Cases: as typed, lower, Title (first letter), UPPER. Plural: ``+es`` after
    s/x/z/ch/sh, ``y -> ies`` after a consonant, else ``+s``.

    Example:
        >>> variant_strings("coffee")[:4]
        [' coffee', 'coffee', ' coffees', 'coffees']
    """
    word = text.strip()
    low = word.lower()
    cases = dict.fromkeys([word, low, low[:1].upper() + low[1:], word.upper()])
    out: dict[str, None] = {}
    for case in cases:
        for form in [case, *_plurals(case)]:
            out.update(dict.fromkeys([" " + form, form]))
    return list(out)


def _first_token(s: str, index: dict[str, int]) -> int | None:
    # Greedy longest prefix: what BPE most often, not always, makes the first token.
    for n in range(len(s), 0, -1):
        if s[:n] in index:
            return index[s[:n]]
    return None


def expand_concept(text: str, index: dict[str, int], variants: bool = True) -> Concept:
    """A concept's single-token variants in a vocabulary.

    Args:
        text: what the user typed, e.g. ``"coffee"`` or ``" coffee"``.
        index: from ``token_index``.
        variants: False uses ``text`` exactly as typed, leading space included.

    Raises:
        NeuronmapError: an empty concept, or one whose first character is no token either.

    Example:
        >>> c = expand_concept("coffee", token_index(read_vocab(files)))  # doctest: +SKIP
        >>> c.tokens
        (' coffee', 'coffee', ' Coffee', 'Coffee')
    """
    if not text.strip():
        raise NeuronmapError(f"empty concept {text!r}: give a word or token, e.g. coffee")
    tried = variant_strings(text) if variants else [text]
    found = {index[s]: s for s in tried if s in index}
    approximate = not found
    if approximate:
        for s in ([" " + text.strip(), text.strip()] if variants else [text]):
            tid = _first_token(s, index)
            if tid is not None:
                found.setdefault(tid, [k for k, v in index.items() if v == tid][0])
    if not found:
        raise NeuronmapError(f"concept {text!r} matches no token of this vocabulary, not even by its first character: try another spelling")
    return Concept(text, tuple(found), tuple(found.values()), tuple(s for s in tried if s not in index), approximate)


# ------------------------------------------------------------------ weights


def check_weights(files: AtlasFiles, weights: str | None = None) -> Source:
    """The weights an atlas was mapped from, each file's sha256 checked against meta.json.

    Args:
        files: the atlas.
        weights: where the weights are now, if they moved (anything ``resolve_source``
            takes); default: the path recorded in meta.json.

    Raises:
        NeuronmapError: a file is missing, or its sha256 differs from the recorded one.
    """
    src = files.meta.get("source") or {}
    expected = {f["name"]: f["sha256"] for f in src.get("files", [])}
    fix = (f"re-map with `neuronmap map {src.get('spec', 'SOURCE')} -o {files.root} --overwrite`, "
           "pass --weights PATH if they only moved, or search the stored top-k with --stored")
    if not expected:
        raise NeuronmapError(f"{files.root}/meta.json records no source weights with sha256: {fix}")
    if weights is not None:
        found = resolve_source(weights)
        have = {file_sha256(f) for f in found.files}
        for name, sha in expected.items():
            if sha not in have:
                raise NeuronmapError(f"{weights} is not what this atlas was mapped from: none of its files has the sha256 "
                                     f"of {name} ({sha[:12]}...); {fix}")
        return found
    path = Path(src["path"])
    base = path.parent if src["kind"] == "gguf" else path
    for name, sha in expected.items():
        f = base / name
        if not f.is_file():
            raise NeuronmapError(f"the weights moved or were deleted since mapping: {f} is missing; {fix}")
        got = file_sha256(f)
        if got != sha:
            raise NeuronmapError(f"the weights changed since mapping: {f} has sha256 {got[:12]}..., the atlas recorded "
                                 f"{sha[:12]}...; {fix}")
    return Source(src["kind"], src["spec"], path, tuple(base / n for n in expected))


# ------------------------------------------------------------------ token probabilities


@dataclass(frozen=True)
class TokenProbs:
    """Probabilities of a few tokens under many atlas rows.

    Attributes:
        keys: one row per atlas row scored: ``matrix``, ``layer``, ``neuron``, ``pole``.
        token_ids: the tokens, in column order.
        probs: ``[n_rows, n_tokens]`` float32.
        method: ``exact`` (every row, from the weights) or ``stored`` (only rows
            with some token among their top-k; 0 where a token is not).
        n_scored: atlas rows considered (all chosen rows, also in ``stored``).
    """

    keys: pd.DataFrame
    token_ids: tuple[int, ...]
    probs: np.ndarray
    method: str
    n_scored: int


def where_clause(matrices: list[str], layers: list[int], poles: list[str]) -> str:
    """SQL filter on an atlas's rows; the names come from ids.MATRICES and ids.POLES, checked by ``choose_rows``."""
    m = ",".join(f"'{x}'" for x in matrices)
    p = ",".join(f"'{x}'" for x in poles)
    return f"matrix IN ({m}) AND layer IN ({','.join(map(str, layers))}) AND pole IN ({p})"


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _prefetched(fn: Callable, items: list, depth: int = 2) -> Iterator:
    """``fn(item)`` for each item in order, computed up to ``depth`` items ahead in one background thread.

    Reading (dequantizing) the next vectors overlaps the math on the current ones;
    the bounded depth keeps at most ``depth + 1`` layers' matrices in memory.
    """
    with ThreadPoolExecutor(1) as pool:
        ahead = deque(pool.submit(fn, it) for it in items[:depth])
        for it in items[depth:]:
            ahead.append(pool.submit(fn, it))
            yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def exact_token_probs(files: AtlasFiles, weights: Weights, token_ids: list[int], matrices: list[str],
                      layers: list[int], poles: list[str]) -> TokenProbs:
    """p(t | row) for every atlas row of the chosen matrices, layers and poles, from the weights.

    One pass over the vectors; per (layer, matrix) one ``[d_mlp, d_model] x [d_model, n_tokens]``
    product, with the atlas's own decode options (norm, fold_input_norm) and log-sum-exp.
    """
    dec = files.meta["decode"]
    con = duckdb.connect()
    keys = con.execute(f"SELECT matrix, layer, neuron, pole, logsumexp FROM read_parquet(?) "
                       f"WHERE {where_clause(matrices, layers, poles)}", [str(files.neurons)]).df()
    head = build_head(weights, dec.get("norm", "final"), "cpu", "float32")
    ids = torch.tensor(token_ids, dtype=torch.long)
    # The norm is applied once per vector, then a head that skips it maps normed states to the tokens' logits.
    rows = dataclasses.replace(head, norm="none", W_U=head.W_U[ids].contiguous(), W_U_screen=None,
                               b_U=head.b_U[ids] if head.b_U is not None else None)  # W_U: [n_tokens, d_model]
    neuron, lse = keys["neuron"].to_numpy(), keys["logsumexp"].to_numpy(np.float64)
    plus = keys["pole"].to_numpy() == "+"
    probs = np.zeros((len(keys), len(token_ids)), np.float32)  # [n_rows, n_tokens]
    groups = keys.groupby(["layer", "matrix"], sort=False).indices

    def read(group: tuple) -> torch.Tensor:
        layer, matrix = int(group[0]), group[1]
        vecs = weights.vectors(matrix, layer)  # [d_mlp, d_model]
        if dec.get("fold_input_norm") and matrix != "down":
            vecs = vecs * weights.mlp_norm_gain(layer)
        return vecs

    # Small products: torch's intra-op threads cost more than they gain, badly so on a busy machine.
    threads = 1 if weights.d_mlp * weights.d_model < (1 << 24) else torch.get_num_threads()
    with torch.inference_mode(), _torch_threads(threads):
        for (group, idx), vecs in zip(groups.items(), _prefetched(read, list(groups))):
            h = apply_norm(head, vecs)
            # Without a norm bias the norm is odd, so the - pole's normed state is -h, bit for bit.
            h_minus = -h if head.bias is None else apply_norm(head, -vecs)
            z = {True: logits(rows, h).double().numpy(), False: logits(rows, h_minus).double().numpy()}  # [d_mlp, n_tokens]
            n, p = neuron[idx], plus[idx]
            probs[idx] = np.exp(np.where(p[:, None], z[True][n], z[False][n]) - lse[idx, None])
    return TokenProbs(keys[["matrix", "layer", "neuron", "pole"]], tuple(token_ids), probs, "exact", len(keys))


def stored_token_probs(files: AtlasFiles, token_ids: list[int], matrices: list[str], layers: list[int],
                       poles: list[str]) -> TokenProbs:
    """p(t | row) from the stored top-k lists, for the rows whose top-k holds some t; no weights read."""
    con = duckdb.connect()
    src, where, ids = str(files.neurons), where_clause(matrices, layers, poles), [int(t) for t in token_ids]
    long = con.execute(f"""
        SELECT matrix, layer, neuron, pole, token_id, prob FROM (
            SELECT matrix, layer, neuron, pole, unnest(token_ids) AS token_id, unnest(probs) AS prob
            FROM read_parquet(?) WHERE list_has_any(token_ids, ?::INTEGER[]) AND {where})
        WHERE list_contains(?::INTEGER[], token_id)""", [src, ids, ids]).df()
    n_scored = con.execute(f"SELECT count(*) FROM read_parquet(?) WHERE {where}", [src]).fetchone()[0]
    wide = long.pivot_table(index=["matrix", "layer", "neuron", "pole"], columns="token_id", values="prob",
                            aggfunc="sum", fill_value=0.0).reindex(columns=ids, fill_value=0.0)
    return TokenProbs(wide.index.to_frame(index=False), tuple(ids), wide.to_numpy(np.float32), "stored", int(n_scored))


def token_probs(files: AtlasFiles, token_ids: list[int], matrices: list[str], layers: list[int], poles: list[str],
                stored: bool = False, weights: str | None = None) -> TokenProbs:
    """``exact_token_probs`` from the checked weights, or ``stored_token_probs`` when ``stored``."""
    if stored:
        return stored_token_probs(files, token_ids, matrices, layers, poles)
    return exact_token_probs(files, open_weights(check_weights(files, weights)), token_ids, matrices, layers, poles)


# ------------------------------------------------------------------ search


@dataclass(frozen=True)
class SearchResult:
    """What ``search`` found.

    Attributes:
        table: one row per hit, best first per concept: ``concept rank id layer neuron matrix pole
            prob token token_prob top_tokens top_probs entropy weight_norm``. ``prob`` is the
            concept's probability (sum over its variants), ``token`` its most probable variant.
        concepts: the expanded concepts, in the order given.
        method: ``exact`` or ``stored``.
        n_scored: atlas rows scored per concept.
        top_k: the atlas's stored top-k.
        seconds: wall time.
    """

    table: pd.DataFrame
    concepts: tuple[Concept, ...]
    method: str
    n_scored: int
    top_k: int
    seconds: float


def choose_rows(meta: dict, matrices: str | None, layers: str | None, pole: str | None) -> tuple[list[str], list[int], list[str]]:
    """Parse --matrices, --layers, --pole against what the atlas holds.

    Raises:
        NeuronmapError: malformed, or asking for rows the atlas was not mapped with.
    """
    dec = meta["decode"]
    mats = parse_matrices(matrices, MATRICES) if matrices else list(dec["matrices"])
    lays = parse_layers(layers, int(meta["n_layers"]))
    lays = lays if layers else [x for x in lays if x in dec["layers"]]
    for m in mats:
        if m not in dec["matrices"]:
            raise NeuronmapError(f"the atlas has no {m!r} vectors (it was mapped with {','.join(dec['matrices'])}): "
                                 "choose among those, or re-map with more --matrices")
    missing = [x for x in lays if x not in dec["layers"]]
    if missing:
        raise NeuronmapError(f"the atlas has no layer {missing[0]} (it was mapped with layers {_ranges(dec['layers'])}): "
                             "choose among those, or re-map with more --layers")
    return mats, lays, parse_poles(pole)


def _ranges(xs: list[int]) -> str:
    out, xs = [], sorted(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def _describe(files: AtlasFiles, hits: pd.DataFrame) -> pd.DataFrame:
    """Add each hit's stored id, top tokens, entropy and weight norm."""
    con = duckdb.connect()
    con.register("hits", hits)
    layers = ",".join(str(int(x)) for x in hits["layer"].unique()) or "-1"
    return con.execute(f"""
        SELECT h.*, n.id, n.tokens[1:5] AS top_tokens, n.probs[1:5] AS top_probs, n.entropy, n.weight_norm
        FROM hits h JOIN (SELECT * FROM read_parquet(?) WHERE layer IN ({layers})) n
        USING (matrix, layer, neuron, pole)""", [str(files.neurons)]).df()


def search(files: AtlasFiles, concepts: list[str], matrices: str | None = None, layers: str | None = None,
           pole: str | None = None, top: int = 20, min_prob: float = 0.0, stored: bool = False,
           weights: str | None = None, variants: bool = True) -> SearchResult:
    """Rank an atlas's rows by the probability their decoded distribution puts on each concept.

    Args:
        files: the atlas (``open_files``).
        concepts: words or tokens; each expands to its single-token variants.
        matrices, layers, pole: which rows (CLI syntax: ``"up,down"``, ``"0-5,9"``, ``"+"``); default all.
        top: hits kept per concept.
        min_prob: drop hits below this probability.
        stored: use the stored top-k instead of the weights (no weights needed; a lower bound).
        weights: where the weights are now if they moved; their sha256 must match meta.json.
        variants: False matches each concept exactly as typed.

    Returns:
        SearchResult.

    Raises:
        NeuronmapError: an empty concept, bad options, or weights changed or moved since mapping.

    Example:
        >>> r = search(open_files("demo-atlas"), ["coffee"], top=3)  # doctest: +SKIP
        >>> r.table.loc[0, ["id", "matrix", "pole", "prob"]].tolist()
        ['L29N750', 'up', '+', 0.93]
    """
    t0 = time.perf_counter()
    if not concepts:
        raise NeuronmapError("no concept given: pass at least one word, e.g. coffee")
    if top < 1:
        raise NeuronmapError(f"--top {top} is out of range: expected 1 or more")
    if not 0.0 <= min_prob <= 1.0:
        raise NeuronmapError(f"--min-prob {min_prob} is out of range: expected a probability from 0 to 1")
    index = token_index(read_vocab(files))
    expanded = tuple(expand_concept(c, index, variants) for c in concepts)
    mats, lays, poles = choose_rows(files.meta, matrices, layers, pole)
    ids = list(dict.fromkeys(t for c in expanded for t in c.token_ids))
    tp = token_probs(files, ids, mats, lays, poles, stored, weights)
    parts = []
    for c in expanded:
        cols = [ids.index(t) for t in c.token_ids]
        p = tp.probs[:, cols]  # [n_rows, n_variants]
        score = np.minimum(p.sum(1, dtype=np.float64), 1.0)  # sums of exact probabilities; fp32 rounding may pass 1
        keep = np.flatnonzero((score > 0) & (score >= min_prob))
        best = keep[np.lexsort((keep, -score[keep]))][:top]  # ties: atlas order
        hits = tp.keys.iloc[best].reset_index(drop=True)
        arg = p[best].argmax(1)
        hits.insert(0, "concept", c.text)
        hits.insert(1, "rank", np.arange(1, len(best) + 1))
        hits["prob"] = score[best]
        hits["token"] = [c.tokens[j] for j in arg]
        hits["token_prob"] = p[best, arg].astype(np.float64)
        parts.append(hits)
    table = pd.concat(parts, ignore_index=True)
    table["order"] = np.arange(len(table))
    table = _describe(files, table).sort_values("order").reset_index(drop=True)  # the join does not keep order
    cols = ["concept", "rank", "id", "layer", "neuron", "matrix", "pole", "prob", "token", "token_prob",
            "top_tokens", "top_probs", "entropy", "weight_norm"]
    return SearchResult(table[cols], expanded, tp.method, tp.n_scored, int(files.meta["decode"]["top_k"]),
                        time.perf_counter() - t0)


# ------------------------------------------------------------------ show


def show(files: AtlasFiles, neuron: str, stored: bool = False, weights: str | None = None) -> pd.DataFrame:
    """Every matrix and pole of one neuron, with its rank for its own top token.

    The rank of a row for its top token ``t``: 1 + the number of atlas rows (every
    matrix, layer and pole) with a higher ``p(t)``. ``exact`` ranks among all rows
    from the weights; ``stored`` only among rows whose top-k holds ``t``.

    Args:
        files: the atlas.
        neuron: an id such as ``L29N808``.
        stored, weights: as in ``search``.

    Returns:
        One row per (matrix, pole): ``id layer neuron matrix pole top_token top_prob rank n_ranked
        rank_method entropy weight_norm tokens probs`` (``tokens``/``probs``: the stored top-k).

    Raises:
        NeuronmapError: a malformed or out-of-range id, a layer the atlas lacks, or weights changed.

    Example:
        >>> show(open_files("demo-atlas"), "L29N750")[["matrix", "pole", "top_token", "rank"]]  # doctest: +SKIP
    """
    meta = files.meta
    layer, idx = parse_neuron_id(neuron, int(meta["n_layers"]), int(meta["d_mlp"]))
    mats, lays, poles = choose_rows(meta, None, str(layer), None)
    con = duckdb.connect()
    rows = con.execute("SELECT id, layer, neuron, matrix, pole, token_ids, tokens, probs, entropy, weight_norm "
                       "FROM read_parquet(?) WHERE layer = ? AND neuron = ?", [str(files.neurons), layer, idx]).df()
    rows = rows.sort_values(["matrix", "pole"], key=lambda s: s.map({m: i for i, m in enumerate([*MATRICES, "+", "-"])}))
    rows = rows.reset_index(drop=True)
    top = [int(t[0]) for t in rows["token_ids"]]
    ids = list(dict.fromkeys(top))
    tp = token_probs(files, ids, list(meta["decode"]["matrices"]), list(meta["decode"]["layers"]), ["+", "-"],
                     stored, weights)
    k = tp.keys
    rank, n_ranked, top_prob = [], [], []
    for r, t in zip(rows.itertuples(), top):
        col = tp.probs[:, ids.index(t)]
        me = np.flatnonzero((k["matrix"] == r.matrix).to_numpy() & (k["layer"] == layer).to_numpy()
                            & (k["neuron"] == idx).to_numpy() & (k["pole"] == r.pole).to_numpy())
        p = float(col[me[0]]) if len(me) else float(r.probs[0])
        rank.append(int((col > p).sum()) + 1)
        n_ranked.append(tp.n_scored if tp.method == "exact" else int((col > 0).sum()))
        top_prob.append(p)
    rows.insert(5, "top_token", [t[0] for t in rows["tokens"]])
    rows.insert(6, "top_prob", top_prob)
    rows.insert(7, "rank", rank)
    rows.insert(8, "n_ranked", n_ranked)
    rows.insert(9, "rank_method", tp.method)
    return rows.drop(columns=["token_ids"])


# ------------------------------------------------------------------ Atlas


@dataclass(frozen=True)
class Atlas:
    """An opened atlas: the Python API mirrors the CLI.

    Example:
        >>> a = Atlas.open("demo-atlas")  # doctest: +SKIP
        >>> a.search("coffee", top=5)[["id", "matrix", "pole", "prob"]]
        >>> a.show("L29N750")
        >>> a.stats().layers
    """

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: Path | str) -> "Atlas":
        """Open an atlas directory. Raises NeuronmapError if it is none or has an unknown version."""
        f = open_files(path)
        return cls(f.root, f.meta)

    @property
    def files(self) -> AtlasFiles:
        return AtlasFiles(self.path, self.meta)

    def variants(self, concept: str, variants: bool = True) -> Concept:
        """The single-token variants of a concept in this atlas's vocabulary."""
        return expand_concept(concept, token_index(read_vocab(self.files)), variants)

    def search(self, *concepts: str, matrices: str | None = None, layers: str | None = None, pole: str | None = None,
               top: int = 20, min_prob: float = 0.0, stored: bool = False, weights: str | None = None,
               variants: bool = True) -> pd.DataFrame:
        """``search`` as a DataFrame; ``.attrs`` holds ``method``, ``n_scored`` and the ``concepts``."""
        r = search(self.files, list(concepts), matrices, layers, pole, top, min_prob, stored, weights, variants)
        table = r.table.copy()
        table.attrs.update(method=r.method, n_scored=r.n_scored, concepts=[dataclasses.asdict(c) for c in r.concepts])
        return table

    def show(self, neuron: str, stored: bool = False, weights: str | None = None) -> pd.DataFrame:
        """``show``: every matrix and pole of one neuron."""
        return show(self.files, neuron, stored, weights)

    def stats(self, matrices: str | None = None, layers: str | None = None, pole: str | None = None):
        """``neuronmap.stats.stats``: per layer and matrix summaries (a ``Stats``)."""
        from neuronmap.stats import stats

        return stats(self.files, matrices, layers, pole)
