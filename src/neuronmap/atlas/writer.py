"""Writing an atlas: its rows as Parquet, the directory built beside the output and renamed into place (never over
something that is not an atlas), and the sha256 of each data file sealed into meta.json."""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.core import fsio
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import neuron_id

from neuronmap.atlas.format import FORMAT, SCHEMA, is_atlas_dir


def _lists(flat: pa.Array, k: int, n: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)), flat)


def rows_table(
    matrix: str, layer: int, pole: str, neurons: np.ndarray, token_ids: np.ndarray, logits: np.ndarray,
    logsumexp: np.ndarray, entropy: np.ndarray, weight_norm: np.ndarray, vocab: pa.Array, letter: str = "N",
) -> pa.Table:
    """One block of atlas rows.

    Args:
        neurons: ``[n]`` neuron indices in the layer.
        token_ids, logits: ``[n, k]``.
        logsumexp, entropy, weight_norm: ``[n]``.
        vocab: ``[d_vocab]`` token strings.
        letter: ``N`` for neurons, ``F`` for SAE features (the id column).
    """
    n, k = token_ids.shape
    ids32 = token_ids.astype(np.int32, copy=False)
    probs = np.exp(logits - logsumexp[:, None]).astype(np.float32)
    return pa.table({
        "matrix": pa.array([matrix] * n, pa.string()),
        "layer": pa.array(np.full(n, layer, np.int32)),
        "neuron": pa.array(neurons.astype(np.int32)),
        "id": pa.array([neuron_id(layer, i, letter) for i in neurons.tolist()], pa.string()),
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


# What `map` writes into an atlas (and `search`, `record` add beside it): the only names --overwrite may delete.
ATLAS_FILES = frozenset({"meta.json", "neurons.parquet", "vocab.parquet", "token_index.parquet",
                         "token_index.parquet.sha256", "evidence.parquet",
                         "examples.parquet", "contexts.parquet", "agreement.parquet"})


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies below it (paths already absolute)."""
    return a == b or b in a.parents


def check_output(out: Path, overwrite: bool, protect: tuple[Path, ...] = ()) -> Path:
    """Check that writing an atlas to ``out`` can lose nothing; return its absolute path.

    ``--overwrite`` replaces only an atlas: a directory whose meta.json says
    ``"format": "neuronmap-atlas"`` and that holds nothing but atlas files. Any
    other directory, a file, a symbolic link, and any path equal to, inside or
    above one of ``protect`` (the source's files) is refused, with or without it.
    An empty directory counts as absent.

    Args:
        out: the atlas directory to create.
        overwrite: replace an existing atlas.
        protect: paths the output must not touch (the model's files and directory).

    Returns:
        ``out`` made absolute (symlinks in its parents kept).

    Raises:
        NeuronmapError: any of the cases above, with the fix.

    Example:
        >>> check_output(Path("new-atlas"), overwrite=False).name  # doctest: +SKIP
        'new-atlas'
    """
    out = Path(os.path.abspath(out))
    for p in protect:
        p = Path(os.path.abspath(p))
        if _inside(out, p) or _inside(p, out):
            where = "is" if out == p else "is inside" if _inside(out, p) else "contains"
            raise NeuronmapError(f"out={out} {where} the model being mapped ({p}): write the atlas to a directory "
                                 "outside the checkpoint, e.g. out=./atlas")
    if out.is_symlink():
        raise NeuronmapError(f"{out} is a symbolic link: give the directory it points to, or another out=...")
    if not out.exists():
        return out
    if not out.is_dir():
        raise NeuronmapError(f"{out} exists and is not a directory: choose another out=...")
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        raise NeuronmapError(f"cannot read {out} ({e.strerror}): choose another out=...") from e
    if not names:
        return out
    if not is_atlas_dir(out):
        raise NeuronmapError(f"{out} already exists and is not a neuronmap atlas (no meta.json with format "
                             f"{FORMAT!r}): overwrite=True replaces only atlases; choose another out=...")
    foreign = [n for n in names if n not in ATLAS_FILES]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise NeuronmapError(f"{out} is an atlas but also holds files neuronmap did not write ({shown}): "
                             "move them out first, or choose another out=...")
    if not overwrite:
        raise NeuronmapError(f"{out} already exists (an atlas): pass overwrite=True to replace it, or choose another out=...")
    return out


@contextmanager
def atlas_writer(out: Path, overwrite: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` on success.

    The output is checked again just before the rename, so an atlas that another
    run wrote meanwhile is replaced only with ``overwrite``, and a directory that
    is not an atlas never. On any exception (an interrupt included) the temporary
    directory is removed and ``out`` is untouched.

    Raises:
        NeuronmapError: as ``check_output``; or ``out`` cannot be written (disk full, no permission).
    """
    out = check_output(out, overwrite, protect)
    tmp = fsio.temp_dir_beside(out, "atlas")
    try:
        try:
            yield tmp
        except OSError as e:
            raise fsio.write_error(out, e, "atlas") from e
        check_output(out, overwrite, protect)
        _publish_dir(tmp, out)
    finally:
        fsio.remove_tree(tmp)


def _publish_dir(tmp: Path, out: Path) -> None:
    try:
        if not out.exists():
            # rename(2) fails on a non-empty directory that appeared since the check: nothing is replaced silently.
            os.rename(tmp, out)
            return
        old = fsio.temp_dir_beside(out, "atlas")
        with fsio.signals_held():  # between these renames `old` is the user's atlas: never removed as a leftover
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)
                raise
        fsio.remove_tree(old)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise NeuronmapError(f"{out} appeared while mapping (another run?): pass overwrite=True to replace it, "
                                 "or choose another out=...") from e
        raise fsio.write_error(out, e, "atlas") from e


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def seal(root: Path, names) -> dict[str, str]:
    """The sha256 of data files just written into ``root``, for meta.json's ``sha256`` (``verify_file`` checks them).

    Hashed uncached: the files are about to be renamed, and a read hashes (and caches) them under their final path.

    Args:
        root: the directory the files are in now.
        names: their names, e.g. ``("neurons.parquet", "vocab.parquet")``.

    Returns:
        ``{name: sha256 hex}``.

    Example:
        >>> seal(tmp, ["neurons.parquet"])["neurons.parquet"][:12]  # doctest: +SKIP
        '3f2a9c1b7d4e'
    """
    from neuronmap.core.cache import hash_file

    return {n: hash_file(Path(root) / n) for n in names}


def write_vocab(path: Path, tokens: tuple[str, ...] | list[str]) -> None:
    pq.write_table(pa.table({"token_id": pa.array(np.arange(len(tokens), dtype=np.int32)),
                             "token": pa.array(list(tokens), pa.string())}), path)
