"""One part of a map: decode one (matrix, layer) into atlas rows and its confident content words.

The one unit of work that a local map (neuronmap.mapping.mapper) and a Ray task (neuronmap.mapping.distributed) both
run, so the two give the same rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch


from neuronmap.atlas import writer as atlas_out
from neuronmap.core.ids import neuron_id
from neuronmap.decode.engine import block_rows, decode_block
from neuronmap.sources.vocab import STOPWORDS, WORD
from neuronmap.sources.weights import Weights


@dataclass(frozen=True)
class MapOptions:
    """What ``map`` decodes and how; recorded in meta.json as ``decode`` (``sae``: a SAELens directory, or a
    directory of them, whose features are decoded instead of the MLP neurons)."""

    matrices: str | None = None
    layers: str | None = None
    top_k: int = 10
    device: str = "auto"
    dtype: str = "auto"
    norm: str = "final"
    fold_input_norm: bool = False
    n_candidates: int = 16
    kernel: str = "auto"
    sae: str | None = None


def highlights(best: dict[str, dict], n: int = 12) -> list[dict]:
    return sorted(best.values(), key=lambda r: -r["prob"])[:n]


def map_part(weights: Weights, head, matrix: str, layer: int, options: MapOptions, reduce, vocab: pa.Array,
              timings: dict) -> tuple[list[pa.Table], dict]:
    """Decode one (matrix, layer): its atlas rows, in the order a single pass writes them, and its highlights."""
    t = time.perf_counter()
    vecs = weights.vectors(matrix, layer)  # [d_mlp, d_model]; features: [d_sae, d_model]
    if options.fold_input_norm and matrix != "down":
        vecs = vecs * weights.mlp_norm_gain(layer)
    norms = vecs.norm(dim=-1).numpy()
    vecs = vecs.to(head.W_U.device)
    timings["read_s"] += time.perf_counter() - t
    # The fused kernel writes no [rows, d_vocab] logits: bigger blocks read the head from memory fewer times.
    rows = block_rows(weights.d_vocab) * (4 if head.packed is not None else 1)
    tables, best = [], {}
    for start in range(0, weights.d_mlp, rows):
        t = time.perf_counter()
        with torch.inference_mode():
            dec = decode_block(head, vecs[start:start + rows], options.top_k, options.n_candidates, reduce=reduce)
        dec = {p: (d.token_ids.cpu().numpy(), d.logits.cpu().numpy(), d.logsumexp.cpu().numpy(),
                   d.entropy.cpu().numpy()) for p, d in dec.items()}
        t2 = time.perf_counter()
        timings["decode_s"] += t2 - t
        neurons = np.arange(start, start + len(norms[start:start + rows]))
        for pole, (ids, lg, lse, ent) in dec.items():
            tables.append(atlas_out.rows_table(matrix, layer, pole, neurons, ids, lg, lse, ent, norms[start:start + rows], vocab,
                                               weights.letter))
            track_best(best, weights.tokens, matrix, layer, pole, neurons, ids, lg, lse, weights.letter)
        timings["write_s"] += time.perf_counter() - t2
    return tables, best


def track_best(best, tokens, matrix, layer, pole, neurons, ids, lg, lse, letter: str = "N") -> None:
    """Keep in ``best`` (content word -> highlight) the most confident row per word of this block."""
    p1 = np.exp(lg[:, 0] - lse)  # [rows]; nan where a vector holds nan
    for j in np.argsort(-p1)[:8]:
        tok = tokens[int(ids[j, 0])]
        # `not >=` also drops nan, so a highlight's prob is always a finite JSON number.
        if not WORD.match(tok) or tok.strip().lower() in STOPWORDS or not p1[j] >= 0.3:
            continue
        key = tok.strip().lower()
        if key not in best or best[key]["prob"] < p1[j]:
            best[key] = {"id": neuron_id(layer, int(neurons[j]), letter), "matrix": matrix, "pole": pole, "token": tok,
                         "prob": float(p1[j])}

