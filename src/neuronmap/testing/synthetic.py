"""Synthetic atlases of any size, for tests and benchmarks of what reads atlases.

Rows are random but valid: distinct top-k token ids per row, probabilities that
fall off from a top-1 prob in [0.05, 0.95) and leave some mass outside the top-k.
Top tokens are drawn from the lower half of the vocabulary only, so a change that
plants an upper-half token makes a concept that the unchanged atlas never has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.atlas import format as atlas_io

from neuronmap.atlas import writer as atlas_out
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import POLES, parse_neuron_id


def synthetic_atlas(
    path: Path | str,
    n_layers: int,
    d_mlp: int,
    d_vocab: int,
    k: int = 10,
    seed: int = 0,
    changes: Mapping[tuple[str, str, str], int] | None = None,
    change_rate: float = 0.0,
    matrices: tuple[str, ...] = ("gate", "up", "down"),
    overwrite: bool = True,
) -> Path:
    """Write a valid atlas of random rows; two calls with the same ``seed`` give the same rows.

    Args:
        path: the atlas directory.
        n_layers, d_mlp, d_vocab, k: its shape.
        seed: the base rows.
        changes: ``{(matrix, "L3N17", pole): token_id}``: replace that row's top-1 token id
            (keeping its prob); ``token_id`` should be in the upper half of the vocabulary
            so it is not already in the row.
        change_rate: share of all rows whose top-1 token is replaced by a random upper-half
            token (drawn with ``seed + 1``), on top of ``changes``.
        matrices: which matrices the atlas holds.
        overwrite: replace an existing ``path``.

    Returns:
        ``path``.

    Raises:
        NeuronmapError: ``d_vocab`` too small for ``k``, or a malformed change.

    Example:
        >>> synthetic_atlas("/tmp/syn-a", 2, 8, 100, k=3)  # doctest: +SKIP
        >>> synthetic_atlas("/tmp/syn-b", 2, 8, 100, k=3, changes={("up", "L1N5", "+"): 77})  # doctest: +SKIP
    """
    n_common = d_vocab // 2
    if n_common < 2 * k:
        raise NeuronmapError(f"d_vocab {d_vocab} is too small for k {k}: need at least {4 * k}")
    planted: dict[tuple[str, int, str], dict[int, int]] = {}
    for (mat, nid, pole), tok in (changes or {}).items():
        layer, neuron = parse_neuron_id(nid, n_layers, d_mlp)
        if mat not in matrices or pole not in POLES or not 0 <= tok < d_vocab:
            raise NeuronmapError(f"bad planted change {(mat, nid, pole)!r} -> {tok}: expected a matrix of {matrices}, pole + or -, token id < {d_vocab}")
        planted.setdefault((mat, layer, pole), {})[neuron] = tok
    vocab = pa.array([f" tok{i}" for i in range(d_vocab)], pa.string())
    rng_change = np.random.default_rng(seed + 1)
    step = max(2, n_common // k)

    with atlas_out.atlas_writer(Path(path), overwrite) as tmp:
        with pq.ParquetWriter(tmp / "neurons.parquet", atlas_io.SCHEMA, compression="zstd") as writer:
            for layer in range(n_layers):
                for mi, mat in enumerate(matrices):
                    for pi, pole in enumerate(POLES):
                        # Each block has its own generator, so rows do not depend on what else the atlas holds.
                        rng = np.random.default_rng([seed, layer, mi, pi])
                        ids = (rng.integers(0, n_common, (d_mlp, 1))
                               + np.cumsum(rng.integers(1, step, (d_mlp, k)), axis=1) - 1) % n_common  # [d_mlp, k] distinct
                        p1 = rng.uniform(0.05, 0.95, d_mlp)
                        decay = np.cumprod(rng.uniform(0.3, 0.9, (d_mlp, k - 1)), axis=1)
                        tail = (1 - p1[:, None]) * decay / (1 + decay.sum(1, keepdims=True))  # leaves mass outside top-k
                        probs = -np.sort(-np.concatenate([p1[:, None], tail], axis=1), axis=1)  # [d_mlp, k] best first
                        if change_rate > 0:
                            hit = rng_change.random(d_mlp) < change_rate
                            ids[hit, 0] = rng_change.integers(n_common, d_vocab, int(hit.sum()))
                        for neuron, tok in planted.get((mat, layer, pole), {}).items():
                            ids[neuron, 0] = tok
                        rest = np.clip(1 - probs.sum(1), 1e-9, None)
                        entropy = -(probs * np.log(probs)).sum(1) - rest * np.log(rest)
                        writer.write_table(atlas_out.rows_table(
                            mat, layer, pole, np.arange(d_mlp), ids, np.log(probs), np.zeros(d_mlp), entropy,
                            rng.uniform(0.5, 2.0, d_mlp), vocab))
        atlas_out.write_vocab(tmp / "vocab.parquet", vocab.to_pylist())
        atlas_out.write_json(tmp / "meta.json", {
            "sha256": atlas_out.seal(tmp, ("neurons.parquet", "vocab.parquet")),
            "format": atlas_io.FORMAT, "version": atlas_io.VERSION, "neuronmap_version": "synthetic",
            "source": {"spec": f"synthetic(seed={seed})", "kind": "synthetic", "path": "", "files": []},
            "family": "synthetic", "n_layers": n_layers, "d_model": 64, "d_mlp": d_mlp, "d_vocab": d_vocab,
            "tokenizer": "synthetic", "dtype": "float32", "device": "cpu",
            "decode": {"norm": "final", "final_norm": "rms", "eps": 1e-5, "softcap": None, "fold_input_norm": False,
                       "top_k": k, "matrices": list(matrices), "layers": list(range(n_layers)), "poles": list(POLES),
                       "screen_candidates": None},
            "n_vectors": n_layers * len(matrices) * d_mlp, "n_rows": 2 * n_layers * len(matrices) * d_mlp,
        })
    return Path(path)
