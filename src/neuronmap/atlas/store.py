"""Querying an atlas's Parquet files: which rows, DuckDB helpers, the token index, and the ``Atlas`` API.

neuronmap.atlas.format is the on-disk format (schema, writing, ``read_meta``); this
module reads it. The token index holds every stored top-k entry sorted by token
id, built once beside neurons.parquet, so a stored lookup of a few tokens reads
a few row groups instead of every row's list.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.atlas.format import AtlasFiles, rebuild_hint
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.fsio import atomic_file
from neuronmap.core.ids import FEATURE_MATRICES, MATRICES, format_ranges, id_letter, parse_layers, parse_matrices, parse_poles
from neuronmap.core.cache import cache_dir, file_sha256, hash_file

INDEX = "token_index.parquet"


# ------------------------------------------------------------------ which rows


def choose_rows(meta: dict, matrices: str | None, layers: str | None, pole: str | None) -> tuple[list[str], list[int], list[str]]:
    """Parse --matrices, --layers, --pole (None: all the atlas has) against what the atlas holds.

    Raises:
        NeuronmapError: malformed, or asking for rows the atlas was not mapped with.
    """
    dec = meta["decode"]
    kinds = FEATURE_MATRICES if id_letter(meta) == "F" else MATRICES
    mats = parse_matrices(matrices, kinds) if matrices and matrices.strip() != "all" else list(dec["matrices"])
    lays = parse_layers(layers, int(meta["n_layers"])) if layers else list(dec["layers"])
    for m in mats:
        if m not in dec["matrices"]:
            raise NeuronmapError(f"the atlas has no {m!r} vectors (it was mapped with {','.join(dec['matrices'])}): "
                                 "choose among those, or re-map with more matrices=...")
    missing = [x for x in lays if x not in dec["layers"]]
    if missing:
        raise NeuronmapError(f"the atlas has no layer {missing[0]} (it was mapped with layers {format_ranges(dec['layers'])}): "
                             "choose among those, or re-map with more layers=...")
    return mats, lays, parse_poles(pole)


def where_clause(matrices: list[str], layers: list[int], poles: list[str]) -> str:
    """SQL filter on atlas rows; the names are ids.MATRICES and ids.POLES, checked by ``choose_rows``."""
    m = ",".join(f"'{x}'" for x in matrices)
    p = ",".join(f"'{x}'" for x in poles)
    return f"matrix IN ({m}) AND layer IN ({','.join(str(int(x)) for x in layers)}) AND pole IN ({p})"


_DB: duckdb.DuckDBPyConnection | None = None
_DB_LOCK = threading.Lock()


def connect() -> duckdb.DuckDBPyConnection:
    """A fresh connection (a cursor) to the process's in-memory DuckDB, printing nothing (its progress bar would go to stdout).

    One database per process: opening one costs ~15 ms, a cursor ~0.2 ms, and a viewer page makes several
    queries. Each cursor has its own temporary tables and registered frames, so callers and threads stay apart.
    """
    global _DB
    with _DB_LOCK:
        if _DB is None:
            _DB = duckdb.connect()
        con = _DB.cursor()
    con.execute("SET enable_progress_bar = false")
    return con


def sql_path(p: Path | str) -> str:
    """A path as an SQL string literal."""
    return "'" + str(p).replace("'", "''") + "'"


# ------------------------------------------------------------------ stored, through the token index


def _stamp(neurons: Path) -> str:
    st = neurons.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _index_is_current(path: Path, stamp: str) -> bool:
    """Built from this neurons.parquet (its stamp) and unchanged since (the sha256 written beside it at build time)."""
    try:
        current = (pq.read_metadata(path).metadata or {}).get(b"neurons") == stamp.encode()
        return current and _index_sha(path).read_text().strip() == file_sha256(path)
    except (OSError, ValueError, pa.ArrowException):
        return False


def _index_sha(path: Path) -> Path:
    # The index is derived data that search trusts: a changed or damaged one is rebuilt, never read.
    return path.with_name(path.name + ".sha256")


def _build_index(neurons: Path, out: Path, stamp: str) -> None:
    with atomic_file(out, "token index") as tmp:
        connect().execute(f"""
            COPY (SELECT token_id, matrix, layer, neuron, pole, prob FROM (
                    SELECT matrix, layer, neuron, pole, unnest(token_ids) AS token_id, unnest(probs) AS prob
                    FROM read_parquet({sql_path(neurons)}))
                  ORDER BY token_id, prob DESC)
            TO {sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 65536, KV_METADATA {{neurons: '{stamp}'}})""")
        digest = hash_file(tmp)
    # After the index is in place: an index without its sha256 (a crash between the two) counts as not built.
    with atomic_file(_index_sha(out), "token index") as tmp:
        tmp.write_text(digest + "\n")


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
    ``token_index.parquet`` (under the cache dir if the atlas is read-only) with its sha256 beside it
    (``token_index.parquet.sha256``); rebuilt when neurons.parquet changes (its size and mtime are kept in the
    index's metadata) and when the index no longer has the sha256 it was written with.

    Raises:
        NeuronmapError: neither place is writable.
    """
    ready = token_index_ready(files)
    if ready is not None:
        return ready
    stamp, places = _stamp(files.neurons), _index_places(files)
    reason = ""
    for path in places:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _build_index(files.neurons, path, stamp)
            return path
        except (OSError, NeuronmapError, duckdb.IOException) as e:  # this place cannot be written: try the next
            reason = str(e).splitlines()[0][:160]
        except duckdb.Error as e:  # the read failed: neurons.parquet passed its footer check but is damaged inside
            raise NeuronmapError(f"{files.neurons} cannot be read ({str(e).splitlines()[0][:120]}): the file is damaged; "
                                 f"{rebuild_hint(files.root, files.meta)}") from e
    raise NeuronmapError(f"cannot write a token index in {files.root} nor in {places[1].parent} ({reason}): "
                         "make one of them writable")


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


def stored_ranks(files: AtlasFiles, tops: list[tuple[int, float]]) -> list[tuple[int, int]]:
    """For each ``(token_id, prob)``: (1 + rows whose stored p of the token exceeds ``prob``, rows whose top-k holds it).

    One query for all of them (a neuron's rows ask about up to six tokens).
    """
    values = ",".join(f"({i}, {int(t)}, {float(p)!r})" for i, (t, p) in enumerate(tops))
    got = connect().execute(f"""
        SELECT q.i, count(x.prob) FILTER (WHERE x.prob > q.p), count(x.prob)
        FROM (VALUES {values}) q(i, token_id, p)
        LEFT JOIN (SELECT token_id, prob FROM read_parquet({sql_path(token_index_file(files))})
                   WHERE token_id IN ({",".join(str(int(t)) for t, _ in tops)})) x USING (token_id)
        GROUP BY q.i ORDER BY q.i""").fetchall()
    return [(int(above) + 1, int(n)) for _, above, n in got]
