"""Short labels of many neurons at once, read from an atlas: what each neuron's vectors decode to, and how its
recorded activations are spread (for ranking how unusual one activation is).

``neuron_labels`` serves ``trace`` (neuronmap.intervene.trace), which labels its top and bottom contributors: one
DuckDB query over neurons.parquet for all of them, not one ``show`` each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from neuronmap.atlas.format import check_evidence
from neuronmap.atlas.store import connect
from neuronmap.core.ids import neuron_id

if TYPE_CHECKING:  # only the type
    from neuronmap.atlas.handle import Atlas

LABEL_TOKENS = 5  # tokens shown per matrix in a label


def neuron_labels(atlas: Atlas, wanted: list[tuple[int, int, str]], k: int = LABEL_TOKENS) -> dict[str, dict]:
    """Labels of neurons: the top tokens of the ``down`` pole each writes, of ``up`` (same pole) and ``gate`` ``+``.

    Args:
        atlas: the atlas.
        wanted: ``(layer, neuron, pole)``: the pole (``+`` or ``-``) of the down vector the neuron writes, the sign
            of its activation.
        k: tokens per matrix.

    Returns:
        ``{id: {"down": [...], "down_prob": p, "up": [...], "gate": [...], "agreement": {...} | None}}``, one entry per
        neuron the atlas holds; the matrices the atlas lacks are absent. ``agreement`` is the down row's
        ``next_hit`` and ``effect_share`` where the atlas holds evidence.

    Example:
        >>> neuron_labels(Atlas.open("demo-atlas"), [(29, 808, "+")])["L29N808"]["down"][:2]  # doctest: +SKIP
        [' dog', ' dogs']
    """
    if not wanted:
        return {}
    pole_of = {neuron_id(layer, n): pole for layer, n, pole in wanted}
    rows = connect().execute(
        "SELECT id, matrix, pole, tokens, probs FROM read_parquet(?) WHERE list_contains(?, id)",
        [str(atlas.neurons), list(pole_of)]).df()
    out: dict[str, dict] = {}
    for r in rows.itertuples():
        want = "+" if r.matrix == "gate" else pole_of[r.id]
        if r.pole != want:
            continue
        entry = out.setdefault(r.id, {"agreement": None})
        entry[r.matrix] = [str(t) for t in list(r.tokens)[:k]]
        if r.matrix == "down":
            entry["down_prob"] = float(r.probs[0])
    if "evidence" in atlas.meta:
        check_evidence(atlas)
        ag = connect().execute(
            "SELECT id, pole, next_hit, effect_share FROM read_parquet(?) WHERE matrix = 'down' AND list_contains(?, id)",
            [str(atlas.root / "agreement.parquet"), list(pole_of)]).df()
        for r in ag.itertuples():
            if r.id in out and r.pole == pole_of[r.id]:
                out[r.id]["agreement"] = {k: (None if v is None or not np.isfinite(v) else float(v))
                                          for k, v in (("next_hit", r.next_hit), ("effect_share", r.effect_share))}
    return out


def activation_quantiles(atlas: Atlas) -> tuple[list[float], np.ndarray] | None:
    """Every neuron's recorded activation quantiles, or None where the atlas holds no evidence.

    Returns:
        ``(levels, q)``: the quantile levels (meta.json ``evidence.quantiles``) and ``q`` ``[n_layers, d_mlp, n_q]``
        float32 (a neuron the evidence lacks is nan).
    """
    entry = atlas.meta.get("evidence")
    if entry is None:
        return None
    check_evidence(atlas)
    t = pq.read_table(atlas.root / "evidence.parquet", columns=["layer", "neuron", "quantiles"])
    levels = [float(x) for x in entry["quantiles"]]
    q = np.full((int(atlas.meta["n_layers"]), int(atlas.meta["d_mlp"]), len(levels)), np.nan, np.float32)
    vals = np.asarray(t.column("quantiles").combine_chunks().flatten(), np.float32).reshape(-1, len(levels))
    q[t.column("layer").to_numpy(), t.column("neuron").to_numpy()] = vals
    return levels, q
