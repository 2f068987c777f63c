"""The atlas on disk: ``meta.json``, ``neurons.parquet`` and ``vocab.parquet`` in one directory.

docs/atlas-format.md is the contract. An atlas is written into a temporary
sibling directory and renamed into place only when complete, so an interrupted
run never leaves something that looks like an atlas.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap import fsio
from neuronmap.errors import NeuronmapError
from neuronmap.ids import MATRICES, POLES, neuron_id

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
        "id": pa.array([neuron_id(layer, i) for i in neurons.tolist()], pa.string()),
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
ATLAS_FILES = frozenset({"meta.json", "neurons.parquet", "vocab.parquet", "token_index.parquet", "evidence.parquet",
                         "examples.parquet", "contexts.parquet", "agreement.parquet"})


def _is_atlas_dir(out: Path) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


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
            raise NeuronmapError(f"-o {out} {where} the model being mapped ({p}): write the atlas to a directory "
                                 "outside the checkpoint, e.g. -o ./atlas")
    if out.is_symlink():
        raise NeuronmapError(f"{out} is a symbolic link: give the directory it points to, or another -o")
    if not out.exists():
        return out
    if not out.is_dir():
        raise NeuronmapError(f"{out} exists and is not a directory: choose another -o")
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        raise NeuronmapError(f"cannot read {out} ({e.strerror}): choose another -o") from e
    if not names:
        return out
    if not _is_atlas_dir(out):
        raise NeuronmapError(f"{out} already exists and is not a neuronmap atlas (no meta.json with format "
                             f"{FORMAT!r}): --overwrite replaces only atlases; choose another -o")
    foreign = [n for n in names if n not in ATLAS_FILES]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise NeuronmapError(f"{out} is an atlas but also holds files neuronmap did not write ({shown}): "
                             "move them out first, or choose another -o")
    if not overwrite:
        raise NeuronmapError(f"{out} already exists (an atlas): pass --overwrite to replace it, or choose another -o")
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
            raise NeuronmapError(f"{out} appeared while mapping (another run?): pass --overwrite to replace it, "
                                 "or choose another -o") from e
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
    from neuronmap.sources import hash_file  # sources pulls in the checkpoint readers

    return {n: hash_file(Path(root) / n) for n in names}


def verify_file(root: Path, meta: dict, name: str, hint: str) -> None:
    """Check a data file of an atlas against the sha256 meta.json recorded when it was written.

    The hash is cached by file stat (``sources.file_sha256``), so an unchanged file is hashed once; any write to it
    moves its ctime and makes it hashed again. An atlas written before neuronmap recorded sha256 (no ``sha256``
    entry for the file) is not checked.

    Args:
        root: the atlas directory.
        meta: its meta.json.
        name: the file, e.g. ``neurons.parquet``.
        hint: how to make the file anew, for the message.

    Raises:
        NeuronmapError: the file cannot be read, or its sha256 differs: naming the file and ``hint``.
    """
    want = (meta.get("sha256") or {}).get(name)
    if want is None:
        return
    from neuronmap.sources import file_sha256

    path = Path(root) / name
    try:
        got = file_sha256(path)
    except OSError as e:
        raise NeuronmapError(f"cannot read {path} ({e.strerror or e}): {hint}") from e
    if got != want:
        raise NeuronmapError(f"{path} is damaged or was changed after it was written (its sha256 is {got[:12]}..., "
                             f"meta.json records {want[:12]}...): {hint}")


def write_vocab(path: Path, tokens: tuple[str, ...] | list[str]) -> None:
    pq.write_table(pa.table({"token_id": pa.array(np.arange(len(tokens), dtype=np.int32)),
                             "token": pa.array(list(tokens), pa.string())}), path)


VOCAB_SCHEMA = pa.schema([("token_id", pa.int32()), ("token", pa.string())])


def rebuild_hint(path: Path | str, meta: object = None) -> str:
    """How to make a damaged atlas anew; --overwrite only where it would be accepted (meta.json says atlas)."""
    spec = meta.get("source", {}).get("spec") if isinstance(meta, dict) and isinstance(meta.get("source"), dict) else None
    if _is_atlas_dir(Path(path)):
        return f"rebuild it with `neuronmap map {spec or 'SOURCE'} -o {path} --overwrite`"
    return f"remove {path} yourself and map again with `neuronmap map {spec or 'SOURCE'} -o {path}`"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _meta_problem(meta: object) -> str | None:
    """What is wrong with a parsed meta.json (None: usable). The checks cover every field a reader relies on."""
    if not isinstance(meta, dict):
        return f"it holds a JSON {type(meta).__name__}, expected an object"
    for key in ("n_layers", "d_model", "d_mlp", "d_vocab", "n_rows"):
        if not _int(meta.get(key)) or meta[key] < (0 if key == "n_rows" else 1):
            return f"{key} is {meta.get(key)!r}, expected a positive integer"
    if not isinstance(meta.get("family"), str):
        return f"family is {meta.get('family')!r}, expected a family name"
    dec = meta.get("decode")
    if not isinstance(dec, dict):
        return f"decode is {dec!r}, expected an object with top_k, matrices, layers and poles"
    if not _int(dec.get("top_k")) or not 1 <= dec["top_k"] <= meta["d_vocab"]:
        return f"decode.top_k is {dec.get('top_k')!r}, expected an integer from 1 to d_vocab ({meta['d_vocab']})"
    mats, layers, poles = dec.get("matrices"), dec.get("layers"), dec.get("poles")
    if not isinstance(mats, list) or not mats or any(m not in MATRICES for m in mats):
        return f"decode.matrices is {mats!r}, expected a non-empty list of gate, up, down"
    if not isinstance(layers, list) or not layers or any(not _int(x) or not 0 <= x < meta["n_layers"] for x in layers):
        return f"decode.layers is {layers!r}, expected a non-empty list of layers 0-{meta['n_layers'] - 1}"
    if not isinstance(poles, list) or not poles or any(x not in POLES for x in poles):
        return f"decode.poles is {poles!r}, expected a list of + and -"
    # One row per (matrix, layer, neuron, pole): a decode entry that lists other rows than the file holds is wrong.
    want = len(set(mats)) * len(set(layers)) * len(set(poles)) * meta["d_mlp"]
    if meta["n_rows"] != want:
        return (f"n_rows is {meta['n_rows']}, but decode's {len(set(mats))} matrices, {len(set(layers))} layers and "
                f"{len(set(poles))} poles of {meta['d_mlp']} neurons make {want}")
    sums = meta.get("sha256", {})
    if not isinstance(sums, dict) or any(not isinstance(v, str) or not _SHA256.fullmatch(v) for v in sums.values()):
        return "sha256 is malformed, expected an object of file name -> 64 hex digits"
    src = meta.get("source", {})
    if not isinstance(src, dict) or not isinstance(src.get("files", []), list) or any(
            not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("sha256"), str)
            for f in src.get("files", [])):
        return "source is malformed, expected an object with spec, kind, path and files [{name, bytes, sha256}]"
    return None


def read_meta(path: Path | str) -> dict:
    """Read and check an atlas's ``meta.json``.

    Args:
        path: the atlas directory.

    Returns:
        The parsed meta.json, with every field readers rely on checked.

    Raises:
        NeuronmapError: not an atlas, a damaged meta.json, or a format version this neuronmap cannot read.

    Example:
        >>> read_meta("demo-atlas")["family"]  # doctest: +SKIP
        'llama'
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not path.exists():
        raise NeuronmapError(f"{path} does not exist: pass an atlas directory made by `neuronmap map`")
    if not meta_file.is_file() or not (path / "neurons.parquet").is_file():
        looks = any((path / n).exists() for n in ("config.json", "model.safetensors", "model.safetensors.index.json"))
        fix = (f"it looks like a model checkpoint: map it with `neuronmap map {path} -o ATLAS_DIR`, then pass ATLAS_DIR"
               if looks or path.suffix == ".gguf" else "make one with `neuronmap map SOURCE -o ATLAS_DIR`")
        raise NeuronmapError(f"{path} is not a neuronmap atlas: it lacks meta.json or neurons.parquet; {fix}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise NeuronmapError(f"{meta_file} is not readable JSON ({e}): {rebuild_hint(path)}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise NeuronmapError(f"{path} is not a neuronmap atlas: meta.json format is {got!r}, expected {FORMAT!r}; "
                             f"{rebuild_hint(path)}")
    if meta.get("version") != VERSION:
        raise NeuronmapError(
            f"{path} has atlas format version {meta.get('version')!r}; this neuronmap reads version {VERSION}: "
            "re-create it with `neuronmap map`, or use the neuronmap release that wrote it"
        )
    problem = _meta_problem(meta)
    if problem:
        raise NeuronmapError(f"{meta_file} is damaged: {problem}; {rebuild_hint(path, meta)}")
    return meta


def _kind(t: pa.DataType) -> str:
    """What readers rely on in a column's type: int / float / string, or a list of one (widths and offsets may vary)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_kind(t.value_type)}>"
    for kind, test in (("int", pa.types.is_integer), ("float", pa.types.is_floating),
                       ("string", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x))):
        if test(t):
            return kind
    return str(t)


def check_parquet(path: Path, schema: pa.Schema, rows: int, hint: str) -> None:
    """Check a Parquet file's footer: readable, every column of ``schema`` with its type, ``rows`` rows.

    Raises:
        NeuronmapError: naming the file, what is wrong, and ``hint`` (how to rebuild it).
    """
    try:
        f = pq.ParquetFile(path)
        have, n = f.schema_arrow, f.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise NeuronmapError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:120]}): {hint}") from e
    for field in schema:
        i = have.get_field_index(field.name)
        if i < 0:
            raise NeuronmapError(f"{path} lacks the column {field.name!r}: {hint}")
        if _kind(have.field(i).type) != _kind(field.type):
            raise NeuronmapError(f"{path}: column {field.name!r} is {have.field(i).type}, expected {field.type}: {hint}")
    if n != rows:
        raise NeuronmapError(f"{path} has {n:,} rows, meta.json says {rows:,}: it is truncated or from another atlas; {hint}")


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
    """Check an atlas directory (meta.json, the sha256 and footers of its Parquet files) and return its parts.

    Args:
        path: the atlas directory.

    Returns:
        AtlasFiles.

    Raises:
        NeuronmapError: as ``read_meta``; or a Parquet file (the evidence files too, when meta.json records
            evidence) differs from the sha256 meta.json records, is unreadable, lacks a column or has the wrong
            row count.

    Example:
        >>> open_files("demo-atlas").neurons.name  # doctest: +SKIP
        'neurons.parquet'
    """
    files = AtlasFiles(Path(path), read_meta(path))
    hint = rebuild_hint(path, files.meta)
    check_parquet(files.neurons, SCHEMA, files.meta["n_rows"], hint)
    if not files.vocab.is_file():
        raise NeuronmapError(f"{files.vocab} is missing: {hint}")
    check_parquet(files.vocab, VOCAB_SCHEMA, files.meta["d_vocab"], hint)
    # After the footer checks, whose messages say more; the sha256 catches what they cannot (a changed data page).
    for name in ("neurons.parquet", "vocab.parquet"):
        verify_file(files.root, files.meta, name, hint)
    from neuronmap.evidence import check_evidence  # evidence.py builds on this module

    check_evidence(files)
    with _OPENED_LOCK:
        _OPENED.pop(files.root, None)
        _OPENED[files.root] = files.meta
        while len(_OPENED) > _KEEP_OPENED:
            _OPENED.pop(next(iter(_OPENED)))
    return files


# The atlases this process opened, most recent last: where `find_damaged` looks when a read fails deep inside
# DuckDB or Arrow with a message that names no file.
_OPENED: dict[Path, dict] = {}
_OPENED_LOCK = threading.Lock()
_KEEP_OPENED = 16


def data_files(files: AtlasFiles) -> list[tuple[Path, str]]:
    """Every data file of an atlas with how to make it anew: ``[(path, hint)]``, neurons and vocab first."""
    from neuronmap.evidence import FILES, record_hint

    hint = rebuild_hint(files.root, files.meta)
    out = [(files.neurons, hint), (files.vocab, hint)]
    if "evidence" in files.meta:
        out += [(files.root / name, record_hint(files)) for name in FILES]
    return out


def _readable(path: Path) -> bool:
    try:
        f = pq.ParquetFile(path)
        for i in range(f.num_row_groups):
            f.read_row_group(i)
        return True
    except (OSError, pa.ArrowException):
        return False


def find_damaged() -> tuple[Path, str] | None:
    """The damaged data file of an atlas this process opened, and how to make it anew; None if none is found.

    A file with a recorded sha256 is checked against it (cached by file stat: cheap); one without (an atlas written
    before neuronmap recorded them) is read whole with Arrow, which costs a read but only runs once a read has failed.
    """
    with _OPENED_LOCK:
        opened = list(_OPENED.items())[::-1]
    from neuronmap.atlasdb import token_index_ready

    for root, meta in opened:
        files = AtlasFiles(root, meta)
        index = token_index_ready(files)
        derived = [(index, "remove it; the next --stored lookup builds it anew")] if index else []
        for path, hint in data_files(files) + derived:
            if not path.is_file():
                continue
            if path.name in meta.get("sha256", {}):
                try:
                    verify_file(root, meta, path.name, hint)
                except NeuronmapError:
                    return path, hint
            elif not _readable(path):
                return path, hint
    return None
