"""Agreement between what a neuron's weights decode to and what it does in text, per neuron, matrix and pole.

docs/method.md defines the scores; in short, a (matrix, pole) is scored at the
neuron's examples where that pole is the side the residual stream lies on: for
``up`` and ``down`` pole ``+`` at the top examples whose activation is > 0 and
pole ``-`` at the bottom examples whose activation is < 0; for ``gate`` (SiLU or
GELU, bounded below: a large |activation| needs gate . x > 0) pole ``+`` at both,
pole ``-`` at none. At those examples:

- ``next_hit``: the share of those examples where the model's actual next token
  (the corpus's next token in the same sequence) is among the decoded top-k of
  (matrix, pole). For ``gate`` and ``up`` this is the reads score: the vector a
  neuron reads decodes to the tokens the residual stream predicts where it fires.
- ``current_hit``: the same for the token at the firing position, reported apart.
- ``effect_share`` (``down`` only): the share of the neuron's direct effect on the
  logits, ``a * W_U J down`` with the final norm linearised at the position
  (``J = diag(gain) / sigma``, centred for LayerNorm; softcap and biases left out),
  that falls on the decoded top-k: ``sum_{t in K} (z_t - mean z)^+ / sum_t (z_t - mean z)^+``.
  ``sigma`` and ``|a|`` only scale ``z``, so the share is the same at every
  position where the activation has the pole's sign: it is computed once per
  neuron and pole, and is null for a pole the neuron never takes.
- ``*_base``: the same score with the top-k of another neuron of the same layer
  (a fixed random shift of the neuron index), on this neuron's examples: the chance level.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from neuronmap.atlas.format import AGREEMENT_SCHEMA, SCORES
from neuronmap.atlas.handle import Atlas
from neuronmap.core.ids import neuron_id

SEED = 0


def decoded_topk(files: Atlas) -> dict[tuple[str, int, str], np.ndarray]:
    """The atlas's top-k token ids as ``{(matrix, layer, pole): [d_mlp, k] int64}`` (rows by neuron index)."""
    t = pq.read_table(files.neurons, columns=["matrix", "layer", "neuron", "pole", "token_ids"])
    k = int(files.meta["decode"]["top_k"])
    ids = t.column("token_ids").combine_chunks().flatten().to_numpy().reshape(-1, k).astype(np.int64)
    mat, lay = t.column("matrix").to_numpy(zero_copy_only=False), t.column("layer").to_numpy()
    neu, pole = t.column("neuron").to_numpy(), t.column("pole").to_numpy(zero_copy_only=False)
    d_mlp = int(files.meta["d_mlp"])
    out: dict[tuple[str, int, str], np.ndarray] = {}
    for key in set(zip(mat.tolist(), lay.tolist(), pole.tolist())):
        sel = (mat == key[0]) & (lay == key[1]) & (pole == key[2])
        block = np.full((d_mlp, k), -1, np.int64)
        block[neu[sel]] = ids[sel]
        out[key] = block
    return out


def _hits(tokens: np.ndarray, ok: np.ndarray, topk: np.ndarray) -> np.ndarray:
    """Share of each neuron's usable examples whose token is in its top-k: ``[d_mlp, N]``, ``[d_mlp, k]`` -> ``[d_mlp]``."""
    hit = (tokens[:, :, None] == topk[:, None, :]).any(-1) & ok  # [d_mlp, N]
    n = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hit.sum(1) / np.maximum(n, 1), np.nan)


def _shift(d_mlp: int, rng: np.random.Generator) -> np.ndarray:
    """Another neuron's index for each neuron: a cyclic shift by a random non-zero amount (no neuron pairs with itself)."""
    return (np.arange(d_mlp) + int(rng.integers(1, max(d_mlp, 2)))) % d_mlp


def effect_shares(head, down: torch.Tensor, sets: dict[str, np.ndarray], chunk: int = 256) -> dict[str, np.ndarray]:
    """The direct-effect share of each neuron's pole on token sets, one LM-head product per chunk for all of them.

    Args:
        head: ``neuronmap.decode.head.Head`` (final-norm gain, centring, ``W_U``).
        down: ``[d_mlp, d_model]`` down vectors.
        sets: ``{name: [d_mlp, k] token ids}``; a name starting with ``-`` is scored for the ``-`` pole (``-down``).

    Returns:
        ``{name: [d_mlp]}`` shares (nan where the effect has no positive part).
    """
    out = {name: np.empty(len(down), np.float64) for name in sets}
    for i in range(0, len(down), chunk):
        x = down[i:i + chunk].float()  # [c, d_model]
        if head.norm == "layer":
            x = x - x.mean(-1, keepdim=True)
        if head.gain is not None:
            x = x * head.gain
        z = x @ head.W_U.float().T  # [c, d_vocab]
        z = z - z.mean(-1, keepdim=True)
        for sign, part in (("+", z.clamp_min(0)), ("-", (-z).clamp_min(0))):
            total = part.sum(-1)  # [c]
            for name, ids in sets.items():
                if name.startswith(sign):
                    on = part.gather(1, torch.from_numpy(ids[i:i + chunk]).clamp_min(0)).sum(-1)
                    out[name][i:i + chunk] = torch.where(total > 0, on / total, torch.nan).numpy()
    return out


def agreement(files: Atlas, source, s) -> tuple[pa.Table, list[dict]]:
    """Score every neuron, matrix and pole of a recorded stream (``neuronmap.evidence.record.Stream``).

    Args:
        files: the atlas (its decoded top-k).
        source: the checked ``Source`` of its weights (for the down vectors and the LM head).
        s: the stream.

    Returns:
        ``(table, summary)``: one row per (layer, neuron, matrix, pole) in ``AGREEMENT_SCHEMA``, and the
        per-(layer, matrix, pole) means over neurons with examples of that pole.

    Raises:
        NeuronmapError: the weights cannot be read (``neuronmap.sources.resolve.open_weights``).

    Example:
        >>> table, summary = agreement(files, check_weights(files), s)  # doctest: +SKIP
        >>> overall(summary)[0]["matrix"]  # doctest: +SKIP
        'gate'
    """
    from neuronmap.decode.engine import build_head
    from neuronmap.sources.resolve import open_weights

    meta = files.meta
    d_mlp = int(meta["d_mlp"])
    topk = decoded_topk(files)
    store = np.memmap(s.store, np.int32, "r") if s.n_tokens else np.zeros(0, np.int32)
    rng = np.random.default_rng(SEED)
    head = weights = None
    if "down" in meta["decode"]["matrices"]:
        weights = open_weights(source)
        head = build_head(weights, meta["decode"].get("norm", "final"))
    parts, summary = [], []
    for layer in meta["decode"]["layers"]:
        st = s.layers[layer]
        other = _shift(d_mlp, rng)
        effect = {}
        if head is not None:
            sets = {f"{p}{kind}": topk[("down", layer, p)][other] if kind == "base" else topk[("down", layer, p)]
                    for p in "+-" if ("down", layer, p) in topk for kind in ("own", "base")}
            effect = effect_shares(head, weights.vectors("down", layer), sets)
        side = {}
        for pole, v, g in (("+", st.top_v, st.top_i), ("-", st.bot_v, st.bot_i)):
            ok = (v > 0) if pole == "+" else (v < 0)  # [d_mlp, N]
            gi = np.where(ok, g, 0)
            row = np.searchsorted(s.row_start, gi, side="right") - 1
            has_next = ok & (gi + 1 < s.row_start[np.minimum(row + 1, len(s.row_start) - 1)])
            cur = store[gi].astype(np.int64)
            nxt = store[np.minimum(gi + 1, max(s.n_tokens - 1, 0))].astype(np.int64)
            side[pole] = (ok, has_next, cur, nxt)
        for pole in "+-":
            for matrix in meta["decode"]["matrices"]:
                if (matrix, layer, pole) not in topk:
                    continue
                ok, has_next, cur, nxt = _examples(side, matrix, pole)
                n = ok.sum(1).astype(np.int32)
                K = topk[(matrix, layer, pole)]
                cols = {"next_hit": _hits(nxt, has_next, K), "current_hit": _hits(cur, ok, K),
                        "next_base": _hits(nxt, has_next, K[other]), "current_base": _hits(cur, ok, K[other])}
                nan = np.full(d_mlp, np.nan)
                for col, kind in (("effect_share", "own"), ("effect_base", "base")):
                    cols[col] = np.where(n == 0, np.nan, effect[f"{pole}{kind}"]) if matrix == "down" and effect else nan
                parts.append(pa.table({
                    "layer": pa.array(np.full(d_mlp, layer, np.int32)), "neuron": pa.array(np.arange(d_mlp, dtype=np.int32)),
                    "id": pa.array([neuron_id(layer, i) for i in range(d_mlp)]), "matrix": pa.array([matrix] * d_mlp),
                    "pole": pa.array([pole] * d_mlp), "n": pa.array(n),
                    **{k: pa.array(cols[k].astype(np.float32), from_pandas=True) for k in SCORES}}, schema=AGREEMENT_SCHEMA))
                summary.append({"layer": layer, "matrix": matrix, "pole": pole, "neurons": int((n > 0).sum()),
                                **{k: _mean(cols[k][n > 0]) for k in SCORES}})
    return pa.concat_tables(parts), summary


def _examples(side: dict, matrix: str, pole: str) -> tuple[np.ndarray, ...]:
    """The examples at which (matrix, pole) is the side the residual stream lies on: ``(ok, has_next, cur, nxt)``.

    up, down (and a non-gated MLP's input): the pole of the activation's sign. gate: its activation function (SiLU,
    GELU) is bounded below, so a large |activation| of either sign needs gate . x > 0: the + pole, at the top and
    the bottom examples both; the - pole at none.
    """
    if matrix != "gate":
        return side[pole]
    if pole == "-":
        return tuple(np.zeros_like(x, dtype=bool) if i < 2 else x for i, x in enumerate(side["+"]))
    return tuple(np.concatenate([a, b], 1) for a, b in zip(side["+"], side["-"]))


def _mean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return round(float(x.mean()), 6) if len(x) else None


def overall(summary: list[dict]) -> list[dict]:
    """Per (matrix, pole): the layers' means weighted by their neurons, from a meta.json ``evidence.agreement`` list."""
    out = []
    for matrix in ("gate", "up", "down"):
        for pole in ("+", "-"):
            rows = [r for r in summary if r["matrix"] == matrix and r["pole"] == pole and r["neurons"]]
            if not rows:
                continue
            entry = {"matrix": matrix, "pole": pole, "neurons": sum(r["neurons"] for r in rows)}
            for k in SCORES:
                pairs = [(r[k], r["neurons"]) for r in rows if r[k] is not None]
                w = sum(n for _, n in pairs)
                entry[k] = round(sum(v * n for v, n in pairs) / w, 6) if w else None
            out.append(entry)
    return out
