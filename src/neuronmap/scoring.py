"""The probability a decoded vector puts on a few tokens: exactly from the weights, or from the stored top-k.

- exact: ``p(t | x) = exp(z_t - lse(x))`` with ``z_t = softcap(final_norm(x) . W_U[t] + b_t)``
  and the log-sum-exp the atlas stored for ``x``. Only the tokens' rows of ``W_U``
  are needed (``[n_tokens, d_model]``), so one streaming pass over the weights scores
  every vector of the atlas, not only those whose top-k holds ``t``.
- stored: the atlas's top-k lists, with no weights. A row is found only where ``t``
  is among its top k. Lookups go through a token index (every top-k entry sorted by
  token id, built once beside neurons.parquet), so they read a few row groups
  instead of every row's list.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from neuronmap.atlas import AtlasFiles
from neuronmap.decode import apply_norm, build_head, logits
from neuronmap.errors import NeuronmapError
from neuronmap.fsio import atomic_file
from neuronmap.ids import MATRICES, parse_layers, parse_matrices, parse_poles
from neuronmap.sources import Source, Weights, cache_dir, file_sha256, resolve_source

INDEX = "token_index.parquet"


# ------------------------------------------------------------------ which rows


def choose_rows(meta: dict, matrices: str | None, layers: str | None, pole: str | None) -> tuple[list[str], list[int], list[str]]:
    """Parse --matrices, --layers, --pole (None: all the atlas has) against what the atlas holds.

    Raises:
        NeuronmapError: malformed, or asking for rows the atlas was not mapped with.
    """
    dec = meta["decode"]
    mats = parse_matrices(matrices, MATRICES) if matrices else list(dec["matrices"])
    lays = parse_layers(layers, int(meta["n_layers"])) if layers else list(dec["layers"])
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
    out, xs, i = [], sorted(xs), 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def where_clause(matrices: list[str], layers: list[int], poles: list[str]) -> str:
    """SQL filter on atlas rows; the names are ids.MATRICES and ids.POLES, checked by ``choose_rows``."""
    m = ",".join(f"'{x}'" for x in matrices)
    p = ",".join(f"'{x}'" for x in poles)
    return f"matrix IN ({m}) AND layer IN ({','.join(str(int(x)) for x in layers)}) AND pole IN ({p})"


def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that prints nothing (its progress bar would go to stdout)."""
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    return con


def sql_path(p: Path | str) -> str:
    """A path as an SQL string literal."""
    return "'" + str(p).replace("'", "''") + "'"


# ------------------------------------------------------------------ exact, from the weights


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


@dataclass(frozen=True)
class TokenProbs:
    """Exact probabilities of a few tokens under every chosen atlas row.

    Attributes:
        keys: one row per atlas row: ``matrix``, ``layer``, ``neuron``, ``pole``.
        token_ids: the tokens, in column order.
        probs: ``[n_rows, n_tokens]`` float32.
    """

    keys: pd.DataFrame
    token_ids: tuple[int, ...]
    probs: np.ndarray


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
    the bounded depth keeps at most ``depth + 1`` matrices in memory.
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

    One pass over the vectors with the atlas's own decode options (norm,
    fold_input_norm); per (layer, matrix) one norm and one
    ``[d_mlp, d_model] x [d_model, n_tokens]`` product, then the stored log-sum-exp.

    Example:
        >>> tp = exact_token_probs(files, open_weights(check_weights(files)), [6728], ["up"], [29], ["+"])  # doctest: +SKIP
        >>> tp.probs.shape
        (1536, 1)
    """
    dec = files.meta["decode"]
    keys = connect().execute(f"SELECT matrix, layer, neuron, pole, logsumexp FROM read_parquet(?) "
                                    f"WHERE {where_clause(matrices, layers, poles)}", [str(files.neurons)]).df()
    head = build_head(weights, dec.get("norm", "final"), "cpu", "float32")
    ids = torch.tensor(token_ids, dtype=torch.long)
    # The norm is applied once per vector; then a head that skips it maps normed states to the tokens' logits.
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
    return TokenProbs(keys[["matrix", "layer", "neuron", "pole"]], tuple(token_ids), probs)


# ------------------------------------------------------------------ stored, through the token index


def _stamp(neurons: Path) -> str:
    st = neurons.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _index_is_current(path: Path, stamp: str) -> bool:
    try:
        return (pq.read_metadata(path).metadata or {}).get(b"neurons") == stamp.encode()
    except (OSError, ValueError, pa.ArrowException):
        return False


def _build_index(neurons: Path, out: Path, stamp: str) -> None:
    with atomic_file(out, "token index") as tmp:
        connect().execute(f"""
            COPY (SELECT token_id, matrix, layer, neuron, pole, prob FROM (
                    SELECT matrix, layer, neuron, pole, unnest(token_ids) AS token_id, unnest(probs) AS prob
                    FROM read_parquet({sql_path(neurons)}))
                  ORDER BY token_id, prob DESC)
            TO {sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 65536, KV_METADATA {{neurons: '{stamp}'}})""")


def _index_places(files: AtlasFiles) -> list[Path]:
    key = hashlib.sha1(str(files.neurons.resolve()).encode()).hexdigest()[:16]
    return [files.root / INDEX, cache_dir() / "token-index" / f"{key}.parquet"]


def token_index_ready(files: AtlasFiles) -> Path | None:
    """The atlas's current token index, or None if the next stored lookup must build it."""
    stamp = _stamp(files.neurons)
    return next((p for p in _index_places(files) if p.is_file() and _index_is_current(p, stamp)), None)


def token_index_file(files: AtlasFiles) -> Path:
    """The atlas's token index, built on first use: every stored top-k entry, sorted by token id.

    Columns ``token_id matrix layer neuron pole prob``, one row per (atlas row, top-k
    token), sorted by token id then prob (descending), so a lookup reads only the row
    groups whose id range holds the wanted ids. Written beside neurons.parquet as
    ``token_index.parquet`` (under the cache dir if the atlas is read-only); rebuilt when
    neurons.parquet changes (its size and mtime are kept in the index's metadata).

    Raises:
        NeuronmapError: neither place is writable.
    """
    ready = token_index_ready(files)
    if ready is not None:
        return ready
    stamp, places = _stamp(files.neurons), _index_places(files)
    for path in places:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _build_index(files.neurons, path, stamp)
            return path
        except (OSError, duckdb.Error):
            continue
    raise NeuronmapError(f"cannot write a token index in {files.root} nor in {places[1].parent}: make one of them writable")


def stored_top(files: AtlasFiles, token_ids: list[int], matrices: list[str], layers: list[int], poles: list[str],
               top: int, min_prob: float = 0.0) -> pd.DataFrame:
    """The ``top`` rows by the summed stored p of ``token_ids`` (a lower bound: tokens outside a row's top-k count 0).

    Returns:
        Best first: ``matrix layer neuron pole prob token_id token_prob`` (``token_id``: the
        row's most probable of the tokens). Only rows whose top-k holds one of them.
    """
    ids = ",".join(str(int(t)) for t in token_ids)
    return connect().execute(f"""
        SELECT matrix, layer, neuron, pole, least(sum(prob), 1.0)::DOUBLE AS prob, arg_max(token_id, prob) AS token_id,
               max(prob)::DOUBLE AS token_prob
        FROM read_parquet({sql_path(token_index_file(files))})
        WHERE token_id IN ({ids}) AND {where_clause(matrices, layers, poles)}
        GROUP BY matrix, layer, neuron, pole HAVING sum(prob) > 0 AND sum(prob) >= {float(min_prob)}
        ORDER BY prob DESC, layer, matrix, neuron, pole LIMIT {int(top)}""").df()


def stored_rank(files: AtlasFiles, token_id: int, prob: float) -> tuple[int, int]:
    """(1 + rows whose stored p of ``token_id`` exceeds ``prob``, rows whose top-k holds ``token_id``)."""
    above, n = connect().execute(f"""
        SELECT count(*) FILTER (WHERE prob > {float(prob)}), count(*)
        FROM read_parquet({sql_path(token_index_file(files))}) WHERE token_id = {int(token_id)}""").fetchone()
    return int(above) + 1, int(n)
