"""Resumable maps: each finished (matrix, layer) is a part file in ``.NAME.parts/`` beside the output.

A map writes every part atomically as it finishes, with its sha256 in the
manifest, then assembles the parts, in the order a single pass writes them, into
the atlas (written aside and renamed, as before), and removes the parts. If the
map dies (Ctrl-C, SIGTERM, SIGKILL, a full disk), its parts stay; ``map ...
--resume`` reuses them when the manifest (the weights' sha256, the resolved
matrices and layers, the options that change results) matches, and refuses with
one line when it does not or cannot be read. A part that fails its own check
(sha256, matrix, layer, options) is decoded again, with a note. A map without
``--resume`` that finds the parts of another run removes them and says so;
leftovers are never piled up.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from neuronmap.atlas import format as atlas_io

from neuronmap.atlas import writer as atlas_out
from neuronmap.core import fsio
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.cache import hash_file

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: each part listed with its sha256; 1 (no ``manifest`` key) kept none
# The manifest keys that change a part's rows; each part's entry repeats them.
RESULT_OPTIONS = ("top_k", "norm", "fold_input_norm", "precision")
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
        manifest: its manifest.json as kept on disk: the run's weights and options, and ``parts``, one entry per
            part file (``write_part`` adds them).
        done: (matrix, layer) pairs finished, by this run or an earlier one.
        reused: how many of ``done`` came from an earlier run.
        removed: parts of an earlier, different run removed because ``--resume`` was not given.
        redone: parts of the earlier run that failed their check (``name (why)``), removed to be decoded again.
    """

    path: Path
    manifest: dict
    done: frozenset
    reused: int
    removed: int
    redone: tuple[str, ...] = ()


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs[:3]) + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")


def _read_manifest(d: Path) -> tuple[dict | None, str]:
    """The manifest of a parts directory, or None and what is wrong with it."""
    try:
        old = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, ValueError) as e:
        return None, f"is not readable JSON ({str(e).splitlines()[0][:80]})"
    if not isinstance(old, dict) or old.get("manifest") != MANIFEST_VERSION:
        return None, "was written by an earlier neuronmap, which kept no sha256 of the parts"
    if not isinstance(old.get("parts"), dict):
        return None, "is damaged (no parts entry)"
    return old, ""


def _part_problem(f: Path, entry: object, manifest: dict) -> str | None:
    """Why a part file left by an earlier run cannot be trusted (None: it can)."""
    matrix, _, layer = f.stem.partition("-L")
    if not isinstance(entry, dict):
        return "the manifest does not list it"
    if entry.get("matrix") != matrix or str(entry.get("layer")) != layer:
        return f"the manifest lists it as {entry.get('matrix')!r} layer {entry.get('layer')!r}"
    if entry["matrix"] not in manifest["matrices"] or entry["layer"] not in manifest["layers"]:
        return "it is not a part of this map"
    wrong = [k for k in RESULT_OPTIONS if entry.get(k) != manifest[k]]
    if wrong:
        return f"it was decoded with {wrong[0]} {entry.get(wrong[0])!r}, this map uses {manifest[wrong[0]]!r}"
    try:
        if hash_file(f) != entry.get("sha256"):  # read once, so not kept in the sha256 cache
            return "its sha256 differs from the one recorded when it was written"
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    return None


def open_parts(out: Path, manifest: dict, resume: bool) -> Parts:
    """Prepare ``.NAME.parts`` for a map whose ``manifest`` (weights' sha256, resolved layers, options) is given.

    With ``resume``, each part of the earlier run is checked against its manifest entry (matrix, layer, the options
    that change results, sha256); one that fails is removed and decoded again (``Parts.redone`` says which and
    why): the result is then right, and only that part's time is lost.

    Args:
        out: the atlas directory the map will create.
        manifest: JSON data that must match for parts to be reused (no ``parts`` key; it is added).
        resume: reuse the parts of an earlier run with the same manifest.

    Returns:
        Parts: what is done already.

    Raises:
        NeuronmapError: ``resume`` and the earlier run had other weights or options (naming the first differences);
            ``resume`` and the parts' manifest is missing, unreadable or from an earlier neuronmap; or the directory
            cannot be written.
    """
    fsio.ensure_parent(out, "atlas")  # a parent that is a file or unwritable: the same one line as the atlas itself
    manifest = {**manifest, "manifest": MANIFEST_VERSION}
    d = parts_dir(out)
    removed, redone, done = 0, [], set()
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise NeuronmapError(f"{d} is not a directory neuronmap made: move it away, then map again")
    entries: dict = {}
    if d.is_dir():
        found = sorted(d.glob("*.parquet"))
        old, why = _read_manifest(d)
        if resume and old is None and found:
            raise NeuronmapError(
                f"cannot resume the map into {out}: {d / MANIFEST} {why}, so the {len(found)} parts in {d} cannot be "
                "checked; run the command without resume=True to remove them and start over")
        if resume and old is not None:
            kept = {k: v for k, v in old.items() if k != "parts"}
            if kept != manifest:
                raise NeuronmapError(
                    f"cannot resume the map into {out}: the parts in {d} were made from other weights or options "
                    f"({_describe_difference(kept, manifest)}); run the same command as before with resume=True, or "
                    "without resume=True to start over")
            for f in found:
                problem = _part_problem(f, old["parts"].get(f.name), manifest)
                if problem:
                    redone.append(f"{f.name} ({problem})")
                    f.unlink(missing_ok=True)
                else:
                    entries[f.name] = old["parts"][f.name]
                    done.add((entries[f.name]["matrix"], entries[f.name]["layer"]))
        else:
            removed = len(found)
            shutil.rmtree(d)
    for f in d.glob(".*.tmp"):  # a part being written when the process was killed
        f.unlink(missing_ok=True)
    manifest["parts"] = entries
    try:
        if not d.is_dir():
            d.mkdir(parents=False)
            fsio.make_readable(d, directory=True)
        _write_manifest(d, manifest)  # the parts removed above leave the manifest
    except OSError as e:
        raise fsio.write_error(out, e, "atlas") from e
    return Parts(d, manifest, frozenset(done), len(done), removed, tuple(redone))


def _write_manifest(d: Path, manifest: dict) -> None:
    with fsio.atomic_file(d / MANIFEST, "parts manifest") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_part(parts: Parts, matrix: str, layer: int, tables: list[pa.Table], best: dict) -> None:
    """Write one finished (matrix, layer) atomically, its highlights in the file's metadata, and its manifest entry.

    The entry (matrix, layer, the options that change results, sha256) is written before the part is renamed into
    place, so a part on disk is always listed; an entry whose part never arrived (a kill between the two) is dropped
    by the next ``open_parts``.
    """
    table = pa.concat_tables(tables).replace_schema_metadata({_BEST: json.dumps(best).encode()})
    path = part_file(parts.path, matrix, layer)
    with fsio.atomic_file(path, "atlas part") as tmp:
        pq.write_table(table, tmp, compression="zstd")
        parts.manifest["parts"][path.name] = {"matrix": matrix, "layer": layer, "rows": table.num_rows,
                                              "sha256": hash_file(tmp), **{k: parts.manifest[k] for k in RESULT_OPTIONS}}
        _write_manifest(parts.path, parts.manifest)


def read_best(parts: Path, matrix: str, layer: int) -> dict:
    """The highlights (content word -> best row) recorded with a part."""
    meta = pq.read_schema(part_file(parts, matrix, layer)).metadata or {}
    return json.loads(meta.get(_BEST, b"{}"))


def _check_rows(path: Path, t: pa.Table, matrix: str, layer: int, rows: int, top_k: int) -> None:
    """The rows of a part are those of its (matrix, layer) and top-k: a last guard before they enter the atlas."""
    lengths = pc.list_value_length(t["token_ids"])
    wrong = ("rows", t.num_rows, rows) if t.num_rows != rows else next((
        (col, got, want) for col, got, want in (
            ("matrix", pc.unique(t["matrix"]).to_pylist(), [matrix]), ("layer", pc.unique(t["layer"]).to_pylist(), [layer]),
            ("top-k", pc.unique(lengths).to_pylist(), [top_k])) if got != want), None)
    if wrong:
        raise NeuronmapError(f"{path} holds {wrong[0]} {wrong[1]}, expected {wrong[2]}: it is not the part it should be; "
                             "run the same command again with resume=True (the part is decoded again)")


def assemble(parts: Parts, order: list[tuple[str, int]], neurons: Path, d_mlp: int) -> int:
    """Concatenate the parts, in ``order``, into ``neurons`` (row groups as a single pass writes them); returns rows.

    Raises:
        NeuronmapError: a part holds rows of another matrix, layer or top-k, or another number of rows (it is
            removed from the manifest, so a resume decodes it again).
    """
    writer = atlas_out.RowsWriter(neurons)
    n = 0
    try:
        for matrix, layer in order:
            path = part_file(parts.path, matrix, layer)
            t = pq.read_table(path).replace_schema_metadata(None)
            try:
                _check_rows(path, t, matrix, layer, 2 * d_mlp, parts.manifest["top_k"])
            except NeuronmapError:
                parts.manifest["parts"].pop(path.name, None)
                _write_manifest(parts.path, parts.manifest)
                raise
            n += t.num_rows
            writer.write(t.cast(atlas_io.SCHEMA))
    finally:
        writer.close()
    return n
