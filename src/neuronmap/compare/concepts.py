"""The concept level: two atlases of any shapes and tokenizers compared by their confident top-1 token strings."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from neuronmap.compare.sides import Side, row_filters, side_vocab
from neuronmap.core.ids import neuron_id


def normalise(token: str) -> str:
    """A concept's key: the token string stripped of surrounding whitespace and lowercased."""
    return token.strip().lower()


def confident_concepts(side: Side, matrices: list[str], layers: list[int], min_prob: float) -> pd.DataFrame:
    """Every confident top-1 row of an atlas with its concept.

    The vocabulary is normalised once (``d_vocab`` strings) and rows carry an integer
    concept code, so atlases with millions of rows group quickly.

    Returns:
        DataFrame with columns concept (categorical), token_id, layer, neuron, matrix, pole, p,
        depth (``layer / (n_layers - 1)``): one row per confident vector, empty concepts dropped.
    """
    table = pq.read_table(side.path / "neurons.parquet", columns=["matrix", "layer", "neuron", "pole", "token_ids", "probs"],
                          filters=row_filters(side, matrices, layers))
    p1 = pc.list_element(table["probs"], 0)
    keep = pc.greater(p1, min_prob)
    df = pa.table({"token_id": pc.list_element(table["token_ids"], 0).filter(keep), "p": p1.filter(keep),
                   **{c: table[c].filter(keep) for c in ("layer", "neuron", "matrix", "pole")}}).to_pandas()
    codes, concepts = pd.factorize(pd.Series(side_vocab(side).to_pylist()).map(normalise))  # [d_vocab] concept code per token
    empty = concepts.get_loc("") if "" in concepts else -1
    code = codes[df["token_id"].to_numpy()]
    df["concept"] = pd.Categorical.from_codes(code, categories=concepts)
    df = df[code != empty]
    df = df.assign(depth=df["layer"] / max(side.meta["n_layers"] - 1, 1))
    return df.reset_index(drop=True)


@dataclass(frozen=True)
class ConceptComparison:
    """The concept-level result.

    Attributes:
        min_prob: the confidence threshold.
        n_a, n_b, n_shared: concept counts.
        jaccard: ``n_shared / |A ∪ B|``.
        coverage_a: share of A's concepts that B has too; ``coverage_b`` the converse.
        depth_corr: Pearson correlation over shared concepts of their mean relative depth in A and in B
            (None with fewer than 3 shared concepts, or when one side's depths do not vary).
        depth_gap: mean ``|depth_A - depth_B|`` over shared concepts (None if none).
        shared: shared concepts, most vectors (A + B) first, each with n, depth and best vector on both sides.
        only_a, only_b: concepts one side has, most vectors first.
        by_layer: per side and layer: n concepts there and the share the other model has anywhere.
    """

    min_prob: float
    n_a: int
    n_b: int
    n_shared: int
    jaccard: float
    coverage_a: float
    coverage_b: float
    depth_corr: float | None
    depth_gap: float | None
    shared: list[dict]
    only_a: list[dict]
    only_b: list[dict]
    by_layer: list[dict]

    def to_dict(self) -> dict:
        """JSON types only: every field, as built (the rows are plain dicts of str, int and float)."""
        return asdict(self)


def _per_concept(df: pd.DataFrame, vocab: pa.Array) -> pd.DataFrame:
    """One row per concept (index: the concept string): n vectors, mean depth, and its most confident
    vector's id, matrix, pole, token and p."""
    g = df.groupby("concept", observed=True)
    out = pd.DataFrame({"n": g.size(), "depth": g["depth"].mean()})
    best = df.loc[g["p"].idxmax()].set_index("concept")
    out = out.join(pd.DataFrame({
        "best": [neuron_id(int(l), int(i)) for l, i in zip(best["layer"], best["neuron"])], "matrix": best["matrix"].astype(str).to_numpy(),
        "pole": best["pole"].astype(str).to_numpy(), "token": vocab.take(pa.array(best["token_id"].to_numpy())).to_pylist(),
        "p": best["p"].to_numpy()}, index=best.index))
    out.index = out.index.astype(str)
    return out


def _concept_dict(r: dict) -> dict:
    return {"n_vectors": int(r["n"]), "depth": round(float(r["depth"]), 4), "best": r["best"], "matrix": r["matrix"],
            "pole": r["pole"], "token": r["token"], "p": float(r["p"])}


def compare_concepts(a: Side, b: Side, sel_a: tuple[list[str], list[int]], sel_b: tuple[list[str], list[int]],
                     min_prob: float, top: int) -> ConceptComparison:
    """Compare two atlases of any shapes and tokenizers by their confident concepts.

    Args:
        a, b: the two sides.
        sel_a, sel_b: (matrices, layers) to read on each side.
        min_prob: a top-1 prob above this is confident.
        top: how many concepts to list in each of shared, only_a, only_b (0: all).

    Returns:
        ConceptComparison.
    """
    da, db = confident_concepts(a, *sel_a, min_prob), confident_concepts(b, *sel_b, min_prob)
    ca, cb = _per_concept(da, side_vocab(a)), _per_concept(db, side_vocab(b))
    shared = ca.index.intersection(cb.index)
    n_a, n_b, n_s = len(ca), len(cb), len(shared)
    union = n_a + n_b - n_s
    depth_corr = depth_gap = None
    if n_s:
        depth_gap = float(np.abs(ca.loc[shared, "depth"] - cb.loc[shared, "depth"]).mean())
    x, y = ca.loc[shared, "depth"].to_numpy(), cb.loc[shared, "depth"].to_numpy()
    if n_s >= 3 and x.std() > 0 and y.std() > 0:  # one layer per side has no depth to correlate
        depth_corr = float(np.corrcoef(x, y)[0, 1])
    cut = (lambda xs: xs) if top == 0 else (lambda xs: xs[:top])
    order = (ca.loc[shared, "n"] + cb.loc[shared, "n"]).sort_values(ascending=False, kind="stable").index
    ra, rb = ca.to_dict("index"), cb.to_dict("index")
    shared_rows = [{"concept": c, "a": _concept_dict(ra[c]), "b": _concept_dict(rb[c])} for c in cut(list(order))]

    def only(x: pd.DataFrame, y: pd.DataFrame, recs: dict) -> list[dict]:
        o = x[~x.index.isin(y.index)].sort_values(["n", "p"], ascending=False, kind="stable")
        return [{"concept": c, **_concept_dict(recs[c])} for c in cut(list(o.index))]

    by_layer = []
    for name, d, other, side in (("a", da, cb, a), ("b", db, ca, b)):
        per = d.drop_duplicates(["layer", "concept"])
        per = per.assign(shared=per["concept"].isin(other.index))
        for layer, g in per.groupby("layer"):
            by_layer.append({"side": name, "layer": int(layer), "depth": float(layer / max(side.meta["n_layers"] - 1, 1)),
                             "n_concepts": len(g), "shared_share": float(g["shared"].mean())})
    return ConceptComparison(min_prob, n_a, n_b, n_s, n_s / union if union else 0.0, n_s / n_a if n_a else 0.0,
                             n_s / n_b if n_b else 0.0, depth_corr, depth_gap, shared_rows, only(ca, cb, ra), only(cb, ca, rb), by_layer)
