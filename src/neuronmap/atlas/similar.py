"""The neurons whose weight vectors point the same way (or the opposite way) as one neuron's, per matrix.

Cosine over the raw weight vectors (rows of gate/up, columns of down, as
``Weights.vectors`` gives them), against every neuron of the same matrix in every
layer the atlas holds. A negative cosine means the other neuron's ``-`` pole points
along this neuron's ``+`` pole, so each hit is shown with the top token of the pole
that matches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neuronmap.atlas.store import choose_rows, connect
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import id_letter, neuron_id, parse_neuron_id
from neuronmap.atlas.scoring import atlas_weights
from neuronmap.atlas.search import records

if TYPE_CHECKING:  # the handle calls these functions; they only name its type
    from neuronmap.atlas.handle import Atlas

TOP = 10


@dataclass(frozen=True)
class SimilarResult:
    """What ``similar`` found.

    Attributes:
        atlas: the atlas directory.
        id, layer, neuron: the neuron asked about.
        rows: per matrix, best first by |cosine|: ``matrix rank id layer neuron cosine pole top_token top_prob``
            (``pole``: the other neuron's pole that points along this one's ``+``; ``top_token``/``top_prob``: its top-1).
        n_compared: vectors compared per matrix.
        seconds: wall time.
    """

    atlas: Path
    id: str
    layer: int
    neuron: int
    rows: pd.DataFrame
    n_compared: int
    seconds: float

    def to_dict(self) -> dict:
        """The serialized form (``similar --json``, the viewer's API), JSON types only.

        Example:
            >>> similar(open_files("demo-atlas"), "L29N750", top=1).to_dict()["rows"][0]["matrix"]  # doctest: +SKIP
            'gate'
        """
        return {"atlas": str(self.atlas), "id": self.id, "layer": self.layer, "neuron": self.neuron,
                "n_compared": self.n_compared, "seconds": round(self.seconds, 3), "rows": records(self.rows)}


def similar(atlas: Atlas, neuron: str, matrices: str | None = None, top: int = TOP,
            weights: str | None = None) -> SimilarResult:
    """The ``top`` vectors most aligned with a neuron's, per matrix, by |cosine| over the weights.

    Args:
        files: the atlas (its weights must be where meta.json says, sha256 checked, or at ``weights``).
        neuron: an id such as ``L29N750``.
        matrices: comma list (default: all the atlas holds).
        top: hits per matrix.
        weights: where the weights are now, if they moved.

    Returns:
        SimilarResult.

    Raises:
        NeuronmapError: a bad id, a layer or matrix the atlas lacks, ``top`` below 1, or weights changed or missing.

    Example:
        >>> similar(open_files("demo-atlas"), "L29N750", "up", top=3).rows[["id", "cosine", "top_token"]]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if top < 1:
        raise NeuronmapError(f"top={top} is out of range: expected 1 or more")
    meta = atlas.meta
    letter = id_letter(meta)
    layer, idx = parse_neuron_id(neuron, int(meta["n_layers"]), int(meta["d_mlp"]), letter)
    mats, lays, _ = choose_rows(meta, matrices, None, None)
    choose_rows(meta, None, str(layer), None)  # the atlas has this layer
    w = atlas_weights(atlas, weights)
    d_mlp = w.d_mlp
    parts = []
    with torch.inference_mode():
        for m in mats:
            own = _unit(w.vectors(m, layer))  # [d_mlp, d_model]
            me = own[idx]  # [d_model]
            cos = torch.cat([(own if x == layer else _unit(w.vectors(m, x))) @ me for x in lays])  # [n_layers * d_mlp]
            cos[lays.index(layer) * d_mlp + idx] = 0.0  # not itself
            best = torch.topk(cos.abs(), min(top, len(cos))).indices.numpy()
            c = cos.numpy()[best].astype(np.float64)
            lay = np.array(lays)[best // d_mlp]
            parts.append(pd.DataFrame({"matrix": m, "rank": np.arange(1, len(best) + 1),
                                       "id": [neuron_id(int(a), int(b), letter) for a, b in zip(lay, best % d_mlp)],
                                       "layer": lay, "neuron": best % d_mlp, "cosine": c,
                                       "pole": np.where(c < 0, "-", "+")}))
    hits = pd.concat(parts, ignore_index=True)
    con = connect()
    con.register("hits", hits.assign(order=np.arange(len(hits))))
    rows = con.execute(
        "SELECT h.*, n.tokens[1] AS top_token, n.probs[1] AS top_prob FROM hits h JOIN read_parquet(?) n "
        "USING (matrix, layer, neuron, pole) ORDER BY h.order", [str(atlas.neurons)]).df().drop(columns="order")
    return SimilarResult(atlas.root, neuron_id(layer, idx, letter), layer, idx, rows, len(lays) * d_mlp,
                         time.perf_counter() - t0)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; a zero row stays zero (its cosine with anything is 0, not nan)."""
    n = v.norm(dim=-1, keepdim=True)  # [rows, 1]
    return v / torch.where(n > 0, n, torch.ones_like(n))
