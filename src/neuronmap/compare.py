"""``compare``: what a fine-tune (or any change) kept and what it changed, neuron by neuron.

Two levels:

* **neuron** (same ``n_layers d_model d_mlp d_vocab`` and the same token strings): the
  atlases are joined on (matrix, layer, pole, neuron). Per layer, matrix and pole:
  the share of vectors whose top-1 token is the same, the mean top-k overlap
  ``|A ∩ B| / k``, and the mean Jensen-Shannon divergence (bits, 0 to 1) of the two
  decoded distributions. Each side's distribution is its own top-k tokens plus one
  ``rest`` bucket holding ``1 - sum(top-k probs)``; a token in the other side's
  top-k but not in this side's gets 0 here, its mass (at most this side's k-th
  prob) being in ``rest``. The buckets sum to 1 on both sides, identical rows give
  exactly 0, and disjoint confident rows give close to 1.
* **concept** (any two models): a concept is a decoded top-1 token string,
  normalised by ``strip().lower()`` (empty strings dropped), that is some vector's
  *confident* top token (``p > min_prob``). Reported: the overlap of the two
  concept sets (Jaccard and per-side coverage) and, per concept, how many vectors
  carry it in each model and at what relative depth ``layer / (n_layers - 1)``.

A and B are atlases or model sources; a source is mapped once into
``cache_dir()/atlases/<key>``, the key hashing the weight files' sha256 and the
map options, so the second compare of the same pair starts at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from neuronmap import atlas as atlas_io
from neuronmap.errors import NeuronmapError
from neuronmap.fsio import atomic_file
from neuronmap.atlasdb import choose_rows
from neuronmap.ids import MATRICES, POLES, format_ranges, neuron_id
from neuronmap.mapper import MapOptions, map_model
from neuronmap.sources import PACKAGED, cache_dir, file_sha256, looks_like_hub_id, resolve_source

LEVELS = ("auto", "neuron", "concept")
SHAPE_KEYS = ("n_layers", "d_model", "d_mlp", "d_vocab")
DECODE_KEYS = ("norm", "fold_input_norm", "top_k")  # what the user chose; final norm and softcap belong to the model
CHUNK = 1 << 18  # rows per vectorised step: bounds the [rows, k, k] match tensor


# ------------------------------------------------------------------ sides


@dataclass(frozen=True)
class Side:
    """One side of a comparison.

    Attributes:
        spec: what the user gave (atlas path or model source).
        path: the atlas directory.
        meta: its meta.json.
        mapped: True when ``spec`` was a model source (mapped now or found in the cache).
    """

    spec: str
    path: Path
    meta: dict
    mapped: bool


def atlas_key(files_sha256: list[str], options: MapOptions) -> str:
    """The cache key of a source's atlas: its weight files and every map option that changes the result.

    Example:
        >>> len(atlas_key(["ab" * 32], MapOptions()))
        20
    """
    opts = {"matrices": options.matrices, "layers": options.layers, "top_k": options.top_k, "norm": options.norm,
            "fold_input_norm": options.fold_input_norm, "dtype": options.dtype, "n_candidates": options.n_candidates,
            "atlas_version": atlas_io.VERSION}
    blob = json.dumps({"files": files_sha256, "options": opts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _looks_like_source(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.exists() or spec in PACKAGED or spec in ("demo",) or looks_like_hub_id(spec)


def resolve_atlas(
    spec: str, options: MapOptions = MapOptions(), progress: Callable[[str], None] | None = None,
) -> Side:
    """An atlas for ``spec``: the directory itself, or the cached atlas of a model source (mapped if missing).

    Args:
        spec: an atlas directory, or anything ``resolve_source`` takes.
        options: how to map a source (ignored for an atlas).
        progress: called with a one-line note before a source is mapped.

    Returns:
        Side.

    Raises:
        NeuronmapError: the path does not exist, or is neither an atlas nor a model source.

    Example:
        >>> resolve_atlas("/tmp/demo-atlas").meta["family"]  # doctest: +SKIP
        'llama'
    """
    p = Path(spec).expanduser()
    if p.is_dir() and ((p / "meta.json").exists() or (p / "neurons.parquet").exists()):
        return Side(spec, p, atlas_io.read_meta(p), False)
    if not _looks_like_source(spec):
        raise NeuronmapError(
            f"{spec} does not exist: pass an atlas directory (made by `neuronmap map`) or a model source "
            f"(checkpoint directory, .gguf file, hub id org/name, or a packaged model: {', '.join(PACKAGED)})"
        )
    if p.is_dir() and not (p / "config.json").exists():
        raise NeuronmapError(
            f"{spec} is neither an atlas (no meta.json) nor a checkpoint directory (no config.json): "
            "pass an atlas made by `neuronmap map` or a model source"
        )
    try:
        src = resolve_source(spec)
    except NeuronmapError as e:
        if p.exists():
            raise
        raise NeuronmapError(f"{spec} is not an atlas directory (no such path), nor a usable model source: {e}") from e
    from neuronmap.decode import resolve_device, resolve_dtype

    opts = replace(options, dtype=resolve_dtype(options.dtype, resolve_device(options.device)))
    shas = [file_sha256(f) for f in src.files]
    out = cache_dir() / "atlases" / atlas_key(shas, opts)
    # A cached atlas of every matrix and layer serves any subset too.
    for cand in (cache_dir() / "atlases" / atlas_key(shas, replace(opts, matrices=None, layers=None)), out):
        try:
            return Side(spec, cand, atlas_io.read_meta(cand), True)
        except NeuronmapError:
            pass
    if progress:
        progress(f"mapping {spec} into {out} (once; later compares reuse it)")
    result = map_model(src, out, opts, overwrite=True)
    return Side(spec, out, result.meta, True)


# ------------------------------------------------------------------ checks


def _vocab(side: Side) -> pa.Array:
    return pq.read_table(side.path / "vocab.parquet", columns=["token"]).column("token").combine_chunks()


def vocab_hash(tokens: pa.Array) -> str:
    """sha256 of the token strings in id order: equal hashes mean the same tokenizer for decoding purposes."""
    h = hashlib.sha256()
    for t in tokens.to_pylist():
        h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()


def shape_differences(a: dict, b: dict, same_vocab: bool) -> list[str]:
    """What keeps two atlases from a neuron-level join, e.g. ``["n_layers 30 vs 18"]``; empty when none."""
    out = [f"{k} {a.get(k)} vs {b.get(k)}" for k in SHAPE_KEYS if a.get(k) != b.get(k)]
    if not same_vocab and a.get("d_vocab") == b.get("d_vocab"):
        out.append("token strings differ (same vocabulary size, different tokenizer)")
    return out


def decode_differences(a: dict, b: dict) -> list[str]:
    """Decode options that differ between two atlases, e.g. ``["top_k 10 vs 20"]``."""
    da, db = a.get("decode", {}), b.get("decode", {})
    out = [f"{k} {da.get(k)} vs {db.get(k)}" for k in DECODE_KEYS if da.get(k) != db.get(k)]
    if a.get("dtype") != b.get("dtype"):
        out.append(f"dtype {a.get('dtype')} vs {b.get('dtype')}")
    return out


def select_rows(side: Side, name: str, matrices: str | None, layers: str | None) -> tuple[list[str], list[int]]:
    """The matrices and layers of one side to compare (``choose_rows``), its errors naming the side.

    Raises:
        NeuronmapError: malformed, or rows the side's atlas was not mapped with.
    """
    try:
        mats, lays, _ = choose_rows(side.meta, matrices, layers, None)
    except NeuronmapError as e:
        raise NeuronmapError(f"{name} ({side.spec}): {e}") from e
    return mats, lays


# ------------------------------------------------------------------ loading


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


def _filters(side: Side, matrices: list[str], layers: list[int]) -> list | None:
    d = side.meta["decode"]
    if set(d["matrices"]) <= set(matrices) and set(d["layers"]) <= set(layers):
        return None  # everything: skip the row filter
    return [("matrix", "in", matrices), ("layer", "in", layers)]


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
                          filters=_filters(side, matrices, layers), read_dictionary=["matrix", "pole"])
    key = ((_codes(table["matrix"], MATRICES) * m["n_layers"] + table["layer"].to_numpy().astype(np.int64)) * 2
           + _codes(table["pole"], POLES)) * m["d_mlp"] + table["neuron"].to_numpy().astype(np.int64)
    k_atlas = m["decode"]["top_k"]
    ids = _fixed_lists(table["token_ids"], k_atlas, np.int32)[:, :k]
    probs = _fixed_lists(table["probs"], k_atlas, np.float32)[:, :k]
    return Rows(key, ids, probs)


# ------------------------------------------------------------------ neuron level


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


def _unkey(key: np.ndarray, n_layers: int, d_mlp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    neuron = key % d_mlp
    g = key // d_mlp
    pole, g = g % 2, g // 2
    return g // n_layers, g % n_layers, pole, neuron  # matrix, layer, pole, neuron


def _agg(group: np.ndarray, n_groups: int, *values: np.ndarray) -> list[np.ndarray]:
    n = np.bincount(group, minlength=n_groups).astype(np.float64)
    return [n] + [np.bincount(group, weights=v.astype(np.float64), minlength=n_groups) for v in values]


def compare_neurons(a: Side, b: Side, matrices: list[str], layers: list[int], min_prob: float = 0.5, top: int = 20) -> NeuronComparison:
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

    vocab = _vocab(a)
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


# ------------------------------------------------------------------ concept level


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
                          filters=_filters(side, matrices, layers))
    p1 = pc.list_element(table["probs"], 0)
    keep = pc.greater(p1, min_prob)
    df = pa.table({"token_id": pc.list_element(table["token_ids"], 0).filter(keep), "p": p1.filter(keep),
                   **{c: table[c].filter(keep) for c in ("layer", "neuron", "matrix", "pole")}}).to_pandas()
    codes, concepts = pd.factorize(pd.Series(_vocab(side).to_pylist()).map(normalise))  # [d_vocab] concept code per token
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
                     min_prob: float = 0.5, top: int = 20) -> ConceptComparison:
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
    ca, cb = _per_concept(da, _vocab(a)), _per_concept(db, _vocab(b))
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


# ------------------------------------------------------------------ entry point


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` found.

    Attributes:
        a, b: the two sides.
        level: ``neuron`` or ``concept``.
        reason: why this level (e.g. the shape differences that forced the concept level).
        warnings: one line each, e.g. decode options that differ.
        matrices: the matrices compared.
        seconds: wall time of the comparison itself, after any mapping.
        neuron: the neuron-level result, or None at the concept level.
        concept: the concept-level result, or None at the neuron level.
    """

    a: Side
    b: Side
    level: str
    reason: str
    warnings: list[str]
    matrices: list[str]
    seconds: float
    neuron: NeuronComparison | None = None
    concept: ConceptComparison | None = None

    def to_json(self) -> dict:
        side = lambda s: {"spec": s.spec, "atlas": str(s.path), "mapped": s.mapped, "family": s.meta.get("family"),  # noqa: E731
                          **{k: s.meta.get(k) for k in SHAPE_KEYS}, "top_k": s.meta["decode"]["top_k"]}
        out = {"a": side(self.a), "b": side(self.b), "level": self.level, "reason": self.reason,
               "warnings": self.warnings, "matrices": self.matrices, "seconds": round(self.seconds, 3)}
        if self.neuron is not None:
            out["neuron"] = asdict(self.neuron)
        if self.concept is not None:
            out["concept"] = asdict(self.concept)
        return out


def compare(
    a: str, b: str, level: str = "auto", matrices: str | None = None, layers: str | None = None,
    min_prob: float = 0.5, top: int = 20, options: MapOptions = MapOptions(),
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Compare two models' neuron maps.

    Args:
        a, b: atlas directories or model sources (mapped once into the cache).
        level: ``auto`` (neuron when shapes and tokenizers match, else concept), ``neuron`` or ``concept``.
        matrices: comma list of gate,up,down (default: those both atlases hold).
        layers: layers and ranges, parsed against each model's own layer count (default: all mapped).
        min_prob: a top-1 prob above this is confident.
        top: how many rows to list in each ranking (0: all).
        options: how to map a model source (its matrices and layers default to ``matrices`` and ``layers``).
        progress: called with one-line notes (mapping a source).

    Returns:
        Comparison.

    Raises:
        NeuronmapError: unknown paths; ``level="neuron"`` on atlases of different shapes or
            tokenizers; matrices or layers absent from an atlas; a bad ``min_prob`` or ``level``.

    Example:
        >>> c = compare("base-atlas", "tuned-atlas")  # doctest: +SKIP
        >>> c.neuron.overall[-1]["same_top1"]
        0.87
    """
    if level not in LEVELS:
        raise NeuronmapError(f"unknown --level {level!r}: expected auto, neuron or concept")
    if not 0.0 <= min_prob < 1.0:
        raise NeuronmapError(f"--min-prob {min_prob} is out of range: expected 0 <= p < 1")
    options = replace(options, matrices=options.matrices or matrices, layers=options.layers or layers)
    sa, sb = resolve_atlas(a, options, progress), resolve_atlas(b, options, progress)
    t0 = time.perf_counter()
    warnings = []
    dec = decode_differences(sa.meta, sb.meta)
    if dec:
        warnings.append(f"decode options differ between A and B: {'; '.join(dec)} (A vs B); comparing anyway"
                        + (f", top-k overlap over the first {min(sa.meta['decode']['top_k'], sb.meta['decode']['top_k'])} tokens"
                           if any(d.startswith("top_k") for d in dec) else ""))
    diffs = shape_differences(sa.meta, sb.meta, vocab_hash(_vocab(sa)) == vocab_hash(_vocab(sb))
                              if sa.meta.get("d_vocab") == sb.meta.get("d_vocab") else False)
    if level == "neuron" and diffs:
        raise NeuronmapError(
            f"cannot compare neuron by neuron: A ({sa.spec}) and B ({sb.spec}) differ in {', '.join(diffs)}; "
            "use --level concept to compare them by decoded token strings"
        )
    use = "concept" if level == "concept" or diffs else "neuron"
    reason = ("asked for with --level concept" if level == "concept" else
              f"A and B differ in {', '.join(diffs)}, so neurons cannot be paired" if diffs else
              "same shapes and token strings")
    sel_a, sel_b = select_rows(sa, "A", matrices, layers), select_rows(sb, "B", matrices, layers)
    common = [m for m in sel_a[0] if m in sel_b[0]]
    if not common:
        raise NeuronmapError(f"A and B share no matrix: A holds {','.join(sel_a[0])}, B holds {','.join(sel_b[0])}; re-map one of them with --matrices")
    if use == "neuron":
        lay = sorted(set(sel_a[1]) & set(sel_b[1]))
        if not lay:
            raise NeuronmapError(f"A and B share no layer: A holds {format_ranges(sel_a[1])}, B holds {format_ranges(sel_b[1])}; re-map one of them with --layers")
        res = compare_neurons(sa, sb, common, lay, min_prob, top)
        return Comparison(sa, sb, use, reason, warnings, common, time.perf_counter() - t0, neuron=res)
    res = compare_concepts(sa, sb, (common, sel_a[1]), (common, sel_b[1]), min_prob, top)
    return Comparison(sa, sb, use, reason, warnings, common, time.perf_counter() - t0, concept=res)


# ------------------------------------------------------------------ plot


def plot(c: Comparison, out: Path | str) -> Path:
    """Draw agreement against depth into a PNG (written to a temp file, then renamed).

    Neuron level: same top-1 share and mean JS per layer, one line per matrix (both poles).
    Concept level: per layer, the share of its confident concepts the other model also has.

    Raises:
        NeuronmapError: ``out`` does not end in .png, or its directory does not exist.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise NeuronmapError(f"--plot {out}: the plot is a PNG; give a file name ending in .png")
    if not out.parent.is_dir():
        raise NeuronmapError(f"--plot {out}: directory {out.parent} does not exist; create it or choose another path")
    title = f"A: {c.a.spec}   B: {c.b.spec}"
    if c.neuron is not None:
        fig = Figure(figsize=(9, 3.4), dpi=100)
        ax1, ax2 = fig.subplots(1, 2)
        df = pd.DataFrame(c.neuron.layers)
        for mat, g in df.groupby("matrix", sort=False):
            g = g.assign(w_same=g["same_top1"] * g["n"], w_js=g["js"] * g["n"]).groupby("layer")[["n", "w_same", "w_js"]].sum()
            ax1.plot(g.index, 100 * g["w_same"] / g["n"], marker=".", label=mat)
            ax2.plot(g.index, g["w_js"] / g["n"], marker=".", label=mat)
        ax1.set(xlabel="layer", ylabel="same top-1 token (%)", ylim=(0, 101), title="agreement")
        ax2.set(xlabel="layer", ylabel="mean JS divergence (bits)", ylim=(0, None), title="divergence")
        ax1.legend(fontsize=8)
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        fig = Figure(figsize=(6, 3.6), dpi=100)
        ax1 = fig.subplots()
        df = pd.DataFrame(c.concept.by_layer)
        for s, label in (("a", f"A's concepts found in B"), ("b", f"B's concepts found in A")):
            g = df[df["side"] == s]
            ax1.plot(g["depth"], 100 * g["shared_share"], marker=".", label=label)
        ax1.set(xlabel="relative depth (layer / (n_layers - 1))", ylabel="shared concepts (%)", ylim=(0, 101), title="concept overlap")
        ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    with atomic_file(out, "plot") as tmp:
        fig.savefig(tmp, format="png")
    return out
