"""The neuron level: two same-shaped atlases joined row by row; top-1 agreement, top-k overlap, JS divergence.

Each side's distribution is its own top-k tokens plus one ``rest`` bucket holding
``1 - sum(top-k probs)``; a token in the other side's top-k but not in this side's
gets 0 here, its mass (at most this side's k-th prob) being in ``rest``. The
buckets sum to 1 on both sides, identical rows give exactly 0, and disjoint
confident rows give close to 1 bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.compare.sides import Side, row_filters, side_vocab
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import MATRICES, POLES, neuron_id

CHUNK = 1 << 18  # rows per vectorised step: bounds the [rows, k, k] match tensor


@dataclass(frozen=True)
class Rows:
    """One atlas's rows for the compared matrices and layers, in file order.

    Attributes:
        key: ``[n]`` int64 ``((matrix * n_layers + layer) * 2 + pole) * d_mlp + neuron``,
            matrix and pole as indices into ``MATRICES`` and ``POLES``.
        token_ids: ``[n, k]`` int32, best first.
        probs: ``[n, k]`` float32.
    """

    key: np.ndarray
    token_ids: np.ndarray
    probs: np.ndarray


def _codes(col: pa.ChunkedArray, names: tuple[str, ...]) -> np.ndarray:
    """Index of each value in ``names``, from a dictionary-encoded column (one lookup per chunk's dictionary)."""
    parts = []
    for chunk in col.chunks:
        lut = np.array([names.index(v) for v in chunk.dictionary.to_pylist()], np.int64)
        parts.append(lut[chunk.indices.to_numpy(zero_copy_only=False)])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _fixed_lists(col: pa.ChunkedArray, k: int, np_type) -> np.ndarray:
    arr = col.combine_chunks()
    n = len(arr)
    offsets = arr.offsets.to_numpy()
    if n and not (np.all(np.diff(offsets) == k)):
        raise NeuronmapError("an atlas row has a top-k list of another length than meta.json's top_k: re-create the atlas with `neuronmap map`")
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np_type, copy=False).reshape(n, k)


def load_rows(side: Side, matrices: list[str], layers: list[int], k: int) -> Rows:
    """Read the rows of ``matrices`` x ``layers`` (both poles), keeping the first ``k`` tokens of each."""
    m = side.meta
    table = pq.read_table(side.path / "neurons.parquet", columns=["matrix", "layer", "neuron", "pole", "token_ids", "probs"],
                          filters=row_filters(side, matrices, layers), read_dictionary=["matrix", "pole"])
    key = ((_codes(table["matrix"], MATRICES) * m["n_layers"] + table["layer"].to_numpy().astype(np.int64)) * 2
           + _codes(table["pole"], POLES)) * m["d_mlp"] + table["neuron"].to_numpy().astype(np.int64)
    k_atlas = m["decode"]["top_k"]
    ids = _fixed_lists(table["token_ids"], k_atlas, np.int32)[:, :k]
    probs = _fixed_lists(table["probs"], k_atlas, np.float32)[:, :k]
    return Rows(key, ids, probs)


def row_stats(ia: np.ndarray, pa_: np.ndarray, ib: np.ndarray, pb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row agreement of two top-k decodes.

    Args:
        ia, ib: ``[n, k]`` token ids, best first, distinct within a row.
        pa_, pb: ``[n, k]`` their probabilities.

    Returns:
        ``(same_top1 [n] bool, overlap [n] float32 in 0..1, js [n] float32 bits in 0..1)``;
        JS uses each side's top-k plus one shared ``rest`` bucket (see the module docstring).

    Example:
        >>> i = np.array([[3, 5]]); p = np.array([[0.6, 0.3]], np.float32)
        >>> [float(x[0]) for x in row_stats(i, p, i, p)]
        [1.0, 1.0, 0.0]
    """
    n, k = ia.shape
    # Work in [k, n] layout: each comparison and reduction then runs over long contiguous rows.
    a, b = np.ascontiguousarray(ia.T), np.ascontiguousarray(ib.T)  # [k, n]
    p = np.ascontiguousarray(pa_.T, dtype=np.float32)
    q = np.ascontiguousarray(pb.T, dtype=np.float32)
    q_at_a = np.zeros((k, n), np.float32)  # B's prob of each of A's tokens, 0 where B's top-k lacks it
    b_in_a = np.zeros((k, n), bool)  # whether B's j-th token is among A's
    for j in range(k):
        eq = a == b[j]  # [k, n]
        b_in_a[j] = eq.any(axis=0)
        q_at_a += eq * q[j]
    overlap = b_in_a.sum(axis=0, dtype=np.float32) / k
    rest_p = np.clip(1.0 - p.sum(0), 0.0, None)
    rest_q = np.clip(1.0 - q.sum(0), 0.0, None)
    js = (_half_kl(p, q_at_a).sum(0)
          + 0.5 * np.where(b_in_a, 0.0, q).sum(0)  # a token only B has: 0.5 * q * log2(q / (q/2)) = q / 2
          + _half_kl(rest_p, rest_q))
    return ia[:, 0] == ib[:, 0], overlap, np.clip(js, 0.0, 1.0).astype(np.float32)


def _half_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Each bucket's share of JS: ``0.5 * (p log2(p/m) + q log2(q/m))`` with ``m = (p+q)/2`` and 0 log 0 = 0."""
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = p * np.log2(p / m)
        b = q * np.log2(q / m)
    return 0.5 * (np.where(p > 0, a, 0.0) + np.where(q > 0, b, 0.0))


@dataclass(frozen=True)
class NeuronComparison:
    """The neuron-level result.

    Attributes:
        k: tokens per row compared (the smaller top_k of the two atlases).
        min_prob: the confidence threshold for "changed" and for concepts.
        layers: per (matrix, layer, pole): n, same_top1, topk_overlap, js, changed.
        overall: per (matrix, pole) with ``"all"`` rows for both poles and all matrices.
        changed: confident in both and different, most confident first (``top`` of them).
        n_changed: how many such rows in all.
        gained, lost: concepts (token ids) that are some vector's confident top token in B only / A only.
        n_gained, n_lost: their totals.
    """

    k: int
    min_prob: float
    layers: list[dict]
    overall: list[dict]
    changed: list[dict]
    n_changed: int
    gained: list[dict]
    lost: list[dict]
    n_gained: int
    n_lost: int

    def to_dict(self) -> dict:
        """JSON types only: every field, as built (the rows are plain dicts of str, int and float)."""
        return asdict(self)


def _unkey(key: np.ndarray, n_layers: int, d_mlp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    neuron = key % d_mlp
    g = key // d_mlp
    pole, g = g % 2, g // 2
    return g // n_layers, g % n_layers, pole, neuron  # matrix, layer, pole, neuron


def _agg(group: np.ndarray, n_groups: int, *values: np.ndarray) -> list[np.ndarray]:
    n = np.bincount(group, minlength=n_groups).astype(np.float64)
    return [n] + [np.bincount(group, weights=v.astype(np.float64), minlength=n_groups) for v in values]


def compare_neurons(a: Side, b: Side, matrices: list[str], layers: list[int], min_prob: float, top: int) -> NeuronComparison:
    """Join two same-shaped atlases row by row and measure what stayed.

    Args:
        a, b: the two sides; shapes and token strings must match (``shape_differences`` empty).
        matrices, layers: what to compare (present in both).
        min_prob: a top-1 prob above this is confident.
        top: how many changed rows and gained/lost concepts to list (0: all).

    Returns:
        NeuronComparison.
    """
    m = a.meta
    n_layers, d_mlp = m["n_layers"], m["d_mlp"]
    k = min(a.meta["decode"]["top_k"], b.meta["decode"]["top_k"])
    ra, rb = load_rows(a, matrices, layers, k), load_rows(b, matrices, layers, k)
    if np.array_equal(ra.key, rb.key):  # written by the same mapper with the same options: rows already pair up
        key, ja, jb = ra.key, np.arange(len(ra.key)), np.arange(len(rb.key))
    else:
        key, ja, jb = np.intersect1d(ra.key, rb.key, assume_unique=True, return_indices=True)
    n = len(key)
    same = np.empty(n, bool)
    overlap = np.empty(n, np.float32)
    js = np.empty(n, np.float32)
    for s in range(0, n, CHUNK):
        ia, ib = ja[s:s + CHUNK], jb[s:s + CHUNK]
        same[s:s + CHUNK], overlap[s:s + CHUNK], js[s:s + CHUNK] = row_stats(ra.token_ids[ia], ra.probs[ia], rb.token_ids[ib], rb.probs[ib])
    pa1, pb1 = ra.probs[ja, 0], rb.probs[jb, 0]
    changed = (pa1 > min_prob) & (pb1 > min_prob) & ~same

    group = key // d_mlp  # (matrix, layer, pole)
    n_groups = len(MATRICES) * n_layers * 2
    cnt, s_same, s_ov, s_js, s_ch = _agg(group, n_groups, same, overlap, js, changed)
    rows = []
    for g in np.flatnonzero(cnt):
        mi, layer, pole = g // (n_layers * 2), (g // 2) % n_layers, g % 2
        rows.append({"matrix": MATRICES[mi], "layer": int(layer), "pole": POLES[pole], "n": int(cnt[g]),
                     "same_top1": float(s_same[g] / cnt[g]), "topk_overlap": float(s_ov[g] / cnt[g]),
                     "js": float(s_js[g] / cnt[g]), "changed": int(s_ch[g])})
    overall = _overall(rows)

    vocab = side_vocab(a)
    order = np.flatnonzero(changed)
    order = order[np.lexsort((-js[order], -np.minimum(pa1[order], pb1[order])))]
    listed = order if top == 0 else order[:top]
    mat, lay, pol, neu = _unkey(key[listed], n_layers, d_mlp)
    tok_a = vocab.take(pa.array(ra.token_ids[ja[listed], 0])).to_pylist()
    tok_b = vocab.take(pa.array(rb.token_ids[jb[listed], 0])).to_pylist()
    changed_rows = [{"id": neuron_id(int(l), int(i)), "layer": int(l), "neuron": int(i), "matrix": MATRICES[int(mm)],
                     "pole": POLES[int(pp)], "token_a": ta, "p_a": float(pa1[r]), "token_b": tb, "p_b": float(pb1[r]),
                     "js": float(js[r])}
                    for r, mm, l, pp, i, ta, tb in zip(listed, mat, lay, pol, neu, tok_a, tok_b)]

    gained, n_gained = _concepts_only(rb, ra, min_prob, vocab, n_layers, d_mlp, top)
    lost, n_lost = _concepts_only(ra, rb, min_prob, vocab, n_layers, d_mlp, top)
    return NeuronComparison(k, min_prob, rows, overall, changed_rows, int(changed.sum()), gained, lost, n_gained, n_lost)


def _overall(rows: list[dict]) -> list[dict]:
    df = pd.DataFrame(rows)
    out = []
    for mat in [*dict.fromkeys(df["matrix"]), "all"]:
        for pole in [*POLES, "both"]:
            d = df if mat == "all" else df[df["matrix"] == mat]
            d = d if pole == "both" else d[d["pole"] == pole]
            if mat == "all" and pole != "both" or d.empty:
                continue
            w = d["n"].to_numpy()
            out.append({"matrix": mat, "pole": pole, "n": int(w.sum()),
                        **{c: float(np.average(d[c], weights=w)) for c in ("same_top1", "topk_overlap", "js")},
                        "changed": int(d["changed"].sum())})
    return out


def _concepts_only(x: Rows, y: Rows, min_prob: float, vocab: pa.Array, n_layers: int, d_mlp: int, top: int) -> tuple[list[dict], int]:
    """Token ids that are a confident top-1 somewhere in ``x`` and nowhere in ``y``, most vectors first."""
    cx = x.probs[:, 0] > min_prob
    only = np.setdiff1d(x.token_ids[cx, 0], y.token_ids[y.probs[:, 0] > min_prob, 0])
    rows = np.flatnonzero(cx & np.isin(x.token_ids[:, 0], only))
    if not len(rows):
        return [], 0
    tok, p = x.token_ids[rows, 0], x.probs[rows, 0]
    rows = rows[np.lexsort((-p, tok))]  # by token, most confident first
    uniq, first, counts = np.unique(x.token_ids[rows, 0], return_index=True, return_counts=True)
    best = rows[first]
    order = np.lexsort((-x.probs[best, 0], -counts))
    order = order if top == 0 else order[:top]
    mat, lay, pol, neu = _unkey(x.key[best[order]], n_layers, d_mlp)
    toks = vocab.take(pa.array(uniq[order])).to_pylist()
    return [{"token": t, "token_id": int(uniq[o]), "n_vectors": int(counts[o]), "best": neuron_id(int(l), int(i)),
             "layer": int(l), "neuron": int(i), "matrix": MATRICES[int(mm)], "pole": POLES[int(pp)],
             "p": float(x.probs[best[o], 0])}
            for o, t, mm, l, pp, i in zip(order, toks, mat, lay, pol, neu)], len(uniq)
