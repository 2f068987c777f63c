"""An atlas's activation evidence on disk (docs/atlas-format.md), and one neuron's evidence read back.

``record`` (neuronmap.evidence.record) writes four files beside neurons.parquet and an
``evidence`` entry in meta.json:

- ``evidence.parquet``: one row per neuron: mean, min, max, density, quantiles, histogram;
- ``examples.parquet``: one row per kept example (neuron, pole, rank): activation, sequence, position, token;
- ``contexts.parquet``: one row per sequence that holds an example: its document, start and token ids;
- ``agreement.parquet``: one row per (neuron, matrix, pole): the scores of neuronmap.evidence.agreement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.core import fsio
from neuronmap.atlas.format import CONTEXTS_SCHEMA, EVIDENCE_SCHEMA, EXAMPLES_SCHEMA, QUANTILES, SCORES, AtlasFiles, check_evidence, record_hint
from neuronmap.atlas.writer import seal, write_json
from neuronmap.atlas.store import connect
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import neuron_id, parse_neuron_id

if TYPE_CHECKING:  # the handle calls these functions; they only name its type
    from neuronmap.atlas.handle import Atlas

AFTER = 4  # tokens shown after the firing one
ROW_GROUP = 65536


def tables(files: AtlasFiles, s) -> dict[str, pa.Table]:
    """The evidence, examples and contexts tables of a recorded stream.

    Args:
        files: the atlas (its shape).
        s: a ``neuronmap.evidence.record.Stream``.

    Returns:
        ``{"evidence": ..., "examples": ..., "contexts": ...}`` in ``SCHEMAS``.

    Example:
        >>> tables(open_files("demo-atlas"), s)["evidence"].num_rows  # doctest: +SKIP
        46080
    """
    from neuronmap.atlas.bins import coarse_counts, quantiles
    d_mlp = int(files.meta["d_mlp"])
    store = np.memmap(s.store, np.int32, "r")
    ev, ex, used = [], [], []
    for layer, st in enumerate(s.layers):
        ids = [neuron_id(layer, i) for i in range(d_mlp)]
        lo, hi = st.bot_v[:, 0].astype(np.float64), st.top_v[:, 0].astype(np.float64)
        q = quantiles(st.counts, lo, hi, QUANTILES)
        coarse = coarse_counts(st.counts)
        n = st.counts.sum(1)
        ev.append(pa.table({
            "layer": pa.array(np.full(d_mlp, layer, np.int32)), "neuron": pa.array(np.arange(d_mlp, dtype=np.int32)),
            "id": pa.array(ids), "mean": pa.array((st.total / n).astype(np.float32)), "min": pa.array(lo.astype(np.float32)),
            "max": pa.array(hi.astype(np.float32)), "density": pa.array((st.positive / n).astype(np.float32)),
            "quantiles": pa.array(list(q)), "hist": pa.array(list(coarse.astype(np.int64)))}, schema=EVIDENCE_SCHEMA))
        for pole, v, g in (("+", st.top_v, st.top_i), ("-", st.bot_v, st.bot_i)):
            keep = g >= 0  # [d_mlp, N]; unfilled slots when the corpus has fewer than N tokens
            nn, rank = np.nonzero(keep)
            gi = g[keep]
            row = np.searchsorted(s.row_start, gi, side="right") - 1
            used.append(row)
            ex.append(pa.table({
                "layer": pa.array(np.full(len(gi), layer, np.int32)), "neuron": pa.array(nn.astype(np.int32)),
                "id": pa.array([ids[i] for i in nn]), "pole": pa.array([pole] * len(gi)),
                "rank": pa.array((rank + 1).astype(np.int32)), "activation": pa.array(v[keep].astype(np.float32)),
                "seq": pa.array(row.astype(np.int64)), "position": pa.array((gi - s.row_start[row]).astype(np.int32)),
                "token_id": pa.array(store[gi].astype(np.int32))}, schema=EXAMPLES_SCHEMA))
    rows = np.unique(np.concatenate(used)) if used else np.zeros(0, np.int64)
    toks = [store[s.row_start[r]:s.row_start[r + 1]].astype(np.int32) for r in rows]
    contexts = pa.table({
        "seq": pa.array(rows.astype(np.int64)), "doc": pa.array([s.docs[s.row_doc[r]] for r in rows], pa.string()),
        "start": pa.array(s.row_pos[rows].astype(np.int64)),
        "token_ids": pa.array(toks, pa.list_(pa.int32()))}, schema=CONTEXTS_SCHEMA)
    return {"evidence": pa.concat_tables(ev), "examples": pa.concat_tables(ex), "contexts": contexts}


def publish(files: AtlasFiles, tmp: Path, built: dict[str, pa.Table], entry: dict) -> None:
    """Write the evidence files and the new meta.json into ``tmp`` (inside the atlas), then rename them into place.

    meta.json goes last, with Ctrl-C and SIGTERM held: until it does, readers see the atlas as it was.

    Raises:
        NeuronmapError: the atlas cannot be written.

    Example:
        >>> publish(files, tmp, {**tables(files, s), "agreement": agree}, entry)  # doctest: +SKIP
    """
    try:
        for name, t in built.items():
            pq.write_table(t, tmp / f"{name}.parquet", compression="zstd", row_group_size=ROW_GROUP)
        sums = {**files.meta.get("sha256", {}), **seal(tmp, [f"{name}.parquet" for name in built])}
        write_json(tmp / "meta.json", {**files.meta, "evidence": entry, "sha256": sums})
        with fsio.signals_held():
            for name in built:
                os.replace(tmp / f"{name}.parquet", files.root / f"{name}.parquet")
            os.replace(tmp / "meta.json", files.root / "meta.json")
    except OSError as e:
        raise fsio.write_error(files.root, e, "atlas") from e


# ------------------------------------------------------------------ one neuron, read back


@dataclass(frozen=True)
class NeuronEvidence:
    """What one neuron fires on, from an atlas's evidence.

    Attributes:
        id, layer, neuron: which neuron.
        corpus: the evidence entry's corpus (name, sha256, ...) and ``tokens`` seen.
        stats: ``{mean, min, max, density}``.
        quantiles: ``[(q, value)]``.
        hist_edges, hist: the histogram's edges and counts.
        examples: ``{"+": [...], "-": [...]}``, each ``{rank, activation, doc, position, before, token, after}``.
        agreement: one dict per (matrix, pole) with the scores of neuronmap.evidence.agreement.
    """

    id: str
    layer: int
    neuron: int
    corpus: dict
    tokens: int
    stats: dict
    quantiles: list[tuple[float, float]]
    hist_edges: list[float]
    hist: list[int]
    examples: dict
    agreement: list[dict]

    def to_dict(self) -> dict:
        """JSON types only, the payload of ``neuronmap examples --json`` and ``/api/evidence/L{l}N{i}``."""
        return {"id": self.id, "layer": self.layer, "neuron": self.neuron, "corpus": self.corpus, "tokens": self.tokens,
                **self.stats, "quantiles": [{"q": q, "value": v} for q, v in self.quantiles],
                "histogram": {"edges": self.hist_edges, "counts": self.hist}, "examples": self.examples,
                "agreement": self.agreement}


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def has_evidence(atlas: Atlas) -> bool:
    return "evidence" in atlas.meta


def neuron_evidence(atlas: Atlas, neuron: str, examples: int | None = None) -> NeuronEvidence:
    """One neuron's evidence: statistics, examples with their windows as token strings, agreement.

    Args:
        files: an atlas with evidence (``neuronmap record``).
        neuron: an id such as ``L29N808``.
        examples: at most this many examples per pole (None: all kept).

    Returns:
        NeuronEvidence.

    Raises:
        NeuronmapError: no evidence in the atlas; a malformed or out-of-range id; evidence files that disagree
            (no evidence row for the neuron, an example whose sequence or position is not in contexts.parquet).

    Example:
        >>> neuron_evidence(open_files("demo-atlas"), "L29N808").examples["+"][0]["token"]  # doctest: +SKIP
        ' dog'
    """
    meta = atlas.meta
    layer, idx = parse_neuron_id(neuron, int(meta["n_layers"]), int(meta["d_mlp"]))
    entry = meta.get("evidence")
    if entry is None:
        raise NeuronmapError(f"{atlas.root} holds no activation evidence: add it with "
                             f"`neuronmap record {atlas.root} --corpus CORPUS`")
    check_evidence(atlas)
    con = connect()
    q = lambda name, extra="": con.execute(  # noqa: E731
        f"SELECT * FROM read_parquet(?) WHERE layer = ? AND neuron = ? {extra}",
        [str(atlas.root / f"{name}.parquet"), layer, idx]).df()
    ev = q("evidence")
    if len(ev) != 1:
        raise NeuronmapError(f"{atlas.root / 'evidence.parquet'} has {len(ev)} rows for {neuron_id(layer, idx)}, "
                             f"expected 1: the evidence is damaged; {record_hint(atlas)}")
    ev = ev.iloc[0]
    ex = q("examples", "ORDER BY pole, rank")
    if examples is not None:
        ex = ex[ex["rank"] <= examples]
    ctx = con.execute("SELECT seq, doc, start, token_ids FROM read_parquet(?) WHERE list_contains(?, seq)",
                      [str(atlas.root / "contexts.parquet"), [int(x) for x in ex["seq"].unique()]]).df()
    ctx = {int(r.seq): r for r in ctx.itertuples()}
    vocab = pq.read_table(atlas.vocab, columns=["token"]).column("token").to_pylist()
    name = lambda t: vocab[t] if 0 <= t < len(vocab) else f"<{t}>"  # noqa: E731
    shown: dict[str, list[dict]] = {"+": [], "-": []}
    for r in ex.itertuples():
        c, p = ctx.get(int(r.seq)), int(r.position)
        ids = [] if c is None or c.token_ids is None else [int(t) for t in c.token_ids]
        if not 0 <= p < len(ids):
            at = "no row in contexts.parquet" if c is None else f"{len(ids)} tokens in contexts.parquet"
            raise NeuronmapError(
                f"{atlas.root / 'examples.parquet'}: example {r.pole}{int(r.rank)} of {neuron_id(layer, idx)} points to "
                f"position {p} of sequence {int(r.seq)}, which has {at}: the evidence files disagree; "
                f"{record_hint(atlas)}")
        shown[r.pole].append({"rank": int(r.rank), "activation": float(r.activation), "doc": c.doc,
                              "position": int(c.start) + p, "before": [name(t) for t in ids[:p]], "token": name(ids[p]),
                              "after": [name(t) for t in ids[p + 1:p + 1 + AFTER]]})
    ag = q("agreement", "ORDER BY matrix, pole")
    order = {"gate": 0, "up": 1, "down": 2}
    agree = sorted(({"matrix": r["matrix"], "pole": r["pole"], "n": int(r["n"]), **{k: _num(r[k]) for k in SCORES}}
                    for r in ag.to_dict("records")), key=lambda d: (order.get(d["matrix"], 9), d["pole"]))
    qs = [(float(a), float(b)) for a, b in zip(entry["quantiles"], ev["quantiles"])]
    stats = {"mean": float(ev["mean"]), "min": float(ev["min"]), "max": float(ev["max"]), "density": float(ev["density"])}
    corpus = {k: entry["corpus"].get(k) for k in ("name", "sha256", "format")}
    return NeuronEvidence(neuron_id(layer, idx), layer, idx, corpus, int(entry["tokens"]), stats, qs,
                          [float(x) for x in entry["hist_edges"]], [int(x) for x in ev["hist"]], shown, agree)
