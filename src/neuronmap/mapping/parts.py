"""Resumable maps: each finished (matrix, layer) is a part file in ``.NAME.parts/`` beside the output.

A map writes every part atomically as it finishes, then assembles the parts, in
the order a single pass writes them, into the atlas (written aside and renamed,
as before), and removes the parts. If the map dies (Ctrl-C, SIGTERM, SIGKILL, a
full disk), its parts stay; ``map ... --resume`` reuses them when the manifest
(the weights' sha256 and every option) matches, and refuses with one line when it
does not. A map without ``--resume`` that finds the parts of another run removes
them and says so; leftovers are never piled up.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.atlas import format as atlas_io
from neuronmap.core import fsio
from neuronmap.core.errors import NeuronmapError

MANIFEST = "manifest.json"
_BEST = b"neuronmap.best"


def parts_dir(out: Path) -> Path:
    """Where the parts of a map into ``out`` are kept: ``.NAME.parts`` beside it."""
    return out.parent / f".{out.name}.parts"


def part_file(parts: Path, matrix: str, layer: int) -> Path:
    return parts / f"{matrix}-L{layer}.parquet"


@dataclass(frozen=True)
class Parts:
    """The parts directory of one map.

    Attributes:
        path: ``.NAME.parts``.
        done: (matrix, layer) pairs finished, by this run or an earlier one.
        reused: how many of ``done`` came from an earlier run.
        removed: parts of an earlier, different run removed because ``--resume`` was not given.
    """

    path: Path
    done: frozenset
    reused: int
    removed: int


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs[:3]) + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")


def open_parts(out: Path, manifest: dict, resume: bool) -> Parts:
    """Prepare ``.NAME.parts`` for a map whose ``manifest`` (weights' sha256, options) is given.

    Args:
        out: the atlas directory the map will create.
        manifest: JSON data that must match for parts to be reused.
        resume: reuse the parts of an earlier run with the same manifest.

    Returns:
        Parts: what is done already.

    Raises:
        NeuronmapError: ``resume`` and the earlier run had other weights or options (naming the first differences);
            or the directory cannot be written.
    """
    fsio.ensure_parent(out, "atlas")  # a parent that is a file or unwritable: the same one line as the atlas itself
    d = parts_dir(out)
    removed = 0
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise NeuronmapError(f"{d} is not a directory neuronmap made: move it away, then map again")
    if d.is_dir():
        try:
            old = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            old = None
        if resume and old is not None and old != manifest:
            raise NeuronmapError(
                f"cannot resume the map into {out}: the parts in {d} were made from other weights or options "
                f"({_describe_difference(old, manifest)}); run the same command as before with --resume, or without "
                "--resume to start over")
        if not resume or old is None:
            removed = len(list(d.glob("*.parquet")))
            shutil.rmtree(d)
    if not d.is_dir():
        try:
            d.mkdir(parents=False)
            fsio.make_readable(d, directory=True)
            with fsio.atomic_file(d / MANIFEST, "parts manifest") as tmp:
                tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except OSError as e:
            raise fsio.write_error(out, e, "atlas") from e
    done = set()
    for f in d.glob("*.parquet"):
        matrix, _, layer = f.stem.partition("-L")
        try:
            pq.read_metadata(f)  # a part is renamed into place whole; anything unreadable is redone
            done.add((matrix, int(layer)))
        except (OSError, ValueError, pa.ArrowException):
            f.unlink(missing_ok=True)
    for f in d.glob(".*.tmp"):  # a part being written when the process was killed
        f.unlink(missing_ok=True)
    return Parts(d, frozenset(done), len(done), removed)


def write_part(parts: Path, matrix: str, layer: int, tables: list[pa.Table], best: dict) -> None:
    """Write one finished (matrix, layer) atomically, its highlights in the file's metadata."""
    table = pa.concat_tables(tables).replace_schema_metadata({_BEST: json.dumps(best).encode()})
    with fsio.atomic_file(part_file(parts, matrix, layer), "atlas part") as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_best(parts: Path, matrix: str, layer: int) -> dict:
    """The highlights (content word -> best row) recorded with a part."""
    meta = pq.read_schema(part_file(parts, matrix, layer)).metadata or {}
    return json.loads(meta.get(_BEST, b"{}"))


def assemble(parts: Path, order: list[tuple[str, int]], neurons: Path) -> int:
    """Concatenate the parts, in ``order``, into ``neurons`` (row groups as a single pass writes them); returns rows."""
    writer = atlas_io.RowsWriter(neurons)
    n = 0
    try:
        for matrix, layer in order:
            t = pq.read_table(part_file(parts, matrix, layer)).replace_schema_metadata(None)
            n += t.num_rows
            writer.write(t.cast(atlas_io.SCHEMA))
    finally:
        writer.close()
    return n
