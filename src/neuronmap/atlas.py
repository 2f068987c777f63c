"""The atlas on disk: ``meta.json``, ``neurons.parquet`` and ``vocab.parquet`` in one directory.

docs/atlas-format.md is the contract. An atlas is written into a temporary
sibling directory and renamed into place only when complete, so an interrupted
run never leaves something that looks like an atlas.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.errors import NeuronmapError

FORMAT = "neuronmap-atlas"
VERSION = 1

SCHEMA = pa.schema([
    ("matrix", pa.string()),
    ("layer", pa.int32()),
    ("neuron", pa.int32()),
    ("id", pa.string()),
    ("pole", pa.string()),
    ("token_ids", pa.list_(pa.int32())),
    ("tokens", pa.list_(pa.string())),
    ("probs", pa.list_(pa.float32())),
    ("logits", pa.list_(pa.float32())),
    ("logsumexp", pa.float32()),
    ("entropy", pa.float32()),
    ("weight_norm", pa.float32()),
])


def _lists(flat: pa.Array, k: int, n: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)), flat)


def rows_table(
    matrix: str, layer: int, pole: str, neurons: np.ndarray, token_ids: np.ndarray, logits: np.ndarray,
    logsumexp: np.ndarray, entropy: np.ndarray, weight_norm: np.ndarray, vocab: pa.Array,
) -> pa.Table:
    """One block of atlas rows.

    Args:
        neurons: ``[n]`` neuron indices in the layer.
        token_ids, logits: ``[n, k]``.
        logsumexp, entropy, weight_norm: ``[n]``.
        vocab: ``[d_vocab]`` token strings.
    """
    n, k = token_ids.shape
    ids32 = token_ids.astype(np.int32, copy=False)
    probs = np.exp(logits - logsumexp[:, None]).astype(np.float32)
    return pa.table({
        "matrix": pa.array([matrix] * n, pa.string()),
        "layer": pa.array(np.full(n, layer, np.int32)),
        "neuron": pa.array(neurons.astype(np.int32)),
        "id": pa.array([f"L{layer}N{i}" for i in neurons.tolist()], pa.string()),
        "pole": pa.array([pole] * n, pa.string()),
        "token_ids": _lists(pa.array(ids32.ravel()), k, n),
        "tokens": _lists(vocab.take(pa.array(ids32.ravel())), k, n),
        "probs": _lists(pa.array(probs.ravel()), k, n),
        "logits": _lists(pa.array(logits.astype(np.float32).ravel()), k, n),
        "logsumexp": pa.array(logsumexp.astype(np.float32)),
        "entropy": pa.array(entropy.astype(np.float32)),
        "weight_norm": pa.array(weight_norm.astype(np.float32)),
    }, schema=SCHEMA)


ROW_GROUP_ROWS = 65536


class RowsWriter:
    """neurons.parquet written in row groups of about ``ROW_GROUP_ROWS`` rows, whatever the blocks' size.

    Decode blocks are a few hundred rows; a row group per block gives readers
    thousands of groups to open, and a point query (one neuron) costs seconds on a
    Llama-8B-sized atlas instead of tens of milliseconds.
    """

    def __init__(self, path: Path, rows: int = ROW_GROUP_ROWS):
        self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
        self._pending: list[pa.Table] = []
        self._n = 0
        self._rows = rows

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._n += table.num_rows
        if self._n >= self._rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=max(self._n, 1))
        self._pending, self._n = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``.

    Raises:
        NeuronmapError: ``out`` exists and ``overwrite`` is False, or it is a file.
    """
    if out.exists() and not overwrite:
        raise NeuronmapError(f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise NeuronmapError(f"{out} exists and is not a directory: choose another -o")


@contextmanager
def atlas_writer(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` on success.

    On any exception the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    # mkdtemp makes the directory private (0700); an atlas is an ordinary directory.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_vocab(path: Path, tokens: tuple[str, ...] | list[str]) -> None:
    pq.write_table(pa.table({"token_id": pa.array(np.arange(len(tokens), dtype=np.int32)),
                             "token": pa.array(list(tokens), pa.string())}), path)


def read_meta(path: Path | str) -> dict:
    """Read and check an atlas's ``meta.json``.

    Raises:
        NeuronmapError: not an atlas, or a format version this neuronmap cannot read.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not path.exists():
        raise NeuronmapError(f"{path} does not exist: pass an atlas directory made by `neuronmap map`")
    if not meta_file.is_file() or not (path / "neurons.parquet").is_file():
        raise NeuronmapError(f"{path} is not a neuronmap atlas: it lacks meta.json or neurons.parquet (make one with `neuronmap map -o {path}`)")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:
        raise NeuronmapError(f"{meta_file} is not valid JSON ({e}): re-create the atlas with `neuronmap map`") from None
    if meta.get("format") != FORMAT:
        raise NeuronmapError(f"{path} is not a neuronmap atlas: meta.json format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise NeuronmapError(
            f"{path} has atlas format version {meta.get('version')!r}; this neuronmap reads version {VERSION}: "
            "re-create it with `neuronmap map`, or use the neuronmap release that wrote it"
        )
    return meta


@dataclass(frozen=True)
class AtlasFiles:
    """Paths of an atlas's parts, checked to exist."""

    root: Path
    meta: dict

    @property
    def neurons(self) -> Path:
        return self.root / "neurons.parquet"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab.parquet"


def open_files(path: Path | str) -> AtlasFiles:
    """Check an atlas directory and return its parts. Raises NeuronmapError as ``read_meta``."""
    return AtlasFiles(Path(path), read_meta(path))
