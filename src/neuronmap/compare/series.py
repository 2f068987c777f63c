"""``map-many``: a training run's checkpoints mapped into one directory, in order (``trajectory`` compares them).

``map_many`` maps each source into ``DIR/NNN-NAME`` (in the order given) and
records the order in ``DIR/series.json``. Every source and every output is
checked before the first is mapped, so a typo on line 40 of a list fails at
once, not hours later. series.json carries ``"format": "neuronmap-series"``;
one without it is never replaced, and it is written (atomically) only once
every atlas of the run is in place, so a failed run leaves the earlier
listing as it was.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from neuronmap.atlas import format as atlas_io
from neuronmap.atlas.handle import Atlas

from neuronmap.atlas import writer as atlas_out
from neuronmap.core import fsio
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.sources.resolve import resolve_source

SERIES = "series.json"


FORMAT = "neuronmap-series"


# What map-many leaves in its directory: atlases NNN-NAME, their parts (.NNN-NAME.parts) and temporaries
# (.NNN-NAME.PID-xxxx.tmp, .series.json.PID-xxxx.tmp). A directory holding only these is one map-many started.
_OURS = re.compile(r"\.?[0-9]{3}-[A-Za-z0-9._-]+|\.series\.json\..+\.tmp")


def read_source_list(path: Path | str) -> list[str]:
    """The sources in a file, one a line (blank lines and ``#`` comments skipped), each checked to exist.

    Raises:
        NeuronmapError: the file is unreadable or lists nothing; a line names no usable source (which line, and why).

    Example:
        >>> read_source_list("run.txt")  # doctest: +SKIP
        ['ckpt/step-1000', 'ckpt/step-2000']
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise NeuronmapError(f"from_file={path}: cannot read it ({e.strerror or e}); give a text file with one source a line") from e
    except UnicodeDecodeError as e:
        raise NeuronmapError(f"from_file={path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                             "give a text file with one source a line") from e
    out = []
    for i, line in enumerate(lines, 1):
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        try:
            resolve_source(spec)
        except NeuronmapError as e:
            raise NeuronmapError(f"line {i} of {path}: {e}") from e
        out.append(spec)
    if not out:
        raise NeuronmapError(f"from_file={path} lists no source: write one checkpoint directory, .gguf file or hub id a line")
    return out


def atlas_names(specs: list[str]) -> list[str]:
    """The atlas directory of each source: its position and last path part, e.g. ``001-step-2000``.

    Example:
        >>> atlas_names(["runs/a/step-10/", "org/model"])
        ['000-step-10', '001-model']
    """
    return [f"{i:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(s.rstrip('/')).name or s)[:60]}" for i, s in enumerate(specs)]


@dataclass(frozen=True)
class ManyResult:
    """What ``map_many`` did.

    Attributes:
        out: the directory holding the atlases and series.json.
        atlases: per source, in order: ``{"name", "spec", "path", "n_rows", "seconds", "reused"}``.
        seconds: wall time, end to end.
        notes: one line each (atlases reused, the cluster used).
    """

    out: Path
    atlases: list[dict]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON types only: every field."""
        return {"out": str(self.out), "atlases": [dict(a) for a in self.atlases], "seconds": round(self.seconds, 3),
                "notes": list(self.notes)}


def map_many(
    sources: list[str], out: Path | str, options: MapOptions = MapOptions(), overwrite: bool = False,
    resume: bool = False, ray: str | None = None, progress: Callable[[str], None] | None = None,
) -> ManyResult:
    """Map each source into ``out/NNN-NAME``, in order, and record the order in ``out/series.json``.

    Args:
        sources: model sources, e.g. a training run's checkpoints, first to last.
        out: the directory to hold the atlases (created if absent).
        options: as ``map``'s, the same for every source.
        overwrite: replace atlases already there; use a directory that holds other files (none of them is replaced).
        resume: keep the atlases already complete there, and resume an interrupted one.
        ray: as ``map_model``'s; one connection serves every source.
        progress: called with a one-line note before each source.

    Returns:
        ManyResult.

    Raises:
        NeuronmapError: no sources; a source that does not exist or an output in the way (which one, before anything
            is mapped); as ``check_series_dir``; anything ``map_model`` raises (series.json is then left as it was).

    Example:
        >>> map_many(["run/step-10", "run/step-20"], "run-atlases", MapOptions(layers="0,20")).atlases[1]["name"]  # doctest: +SKIP
        '001-step-20'
    """
    t0 = time.perf_counter()
    if not sources:
        raise NeuronmapError("map-many needs at least one SOURCE, or from_file=FILE with one source a line")
    for i, spec in enumerate(sources, 1):
        try:
            resolve_source(spec)
        except NeuronmapError as e:
            raise NeuronmapError(f"source {i} of {len(sources)} ({spec}): {e}") from e
    out = Path(out)
    names = atlas_names(sources)
    check_series_dir(out, overwrite)
    kept = {n for n in names if resume and _complete(out / n)}
    for n in names:
        if n not in kept:  # an atlas in the way fails now, not after the sources before it are mapped
            atlas_out.check_output(out / n, overwrite)
    fsio.ensure_parent(out / SERIES, "map-many")
    notes, done = [], []
    started = False
    if ray is not None:
        from neuronmap.mapping.distributed import connect

        started = connect(ray, notes.append)
    try:
        for i, (name, spec) in enumerate(zip(names, sources)):
            if progress:
                progress(f"mapping {i + 1} of {len(sources)}: {spec} -> {out / name}")
            if name in kept:
                meta = atlas_io.read_meta(out / name)
                done.append({"name": name, "spec": spec, "path": str(out / name), "n_rows": meta["n_rows"],
                             "seconds": 0.0, "reused": True})
                notes.append(f"{name}: already mapped, kept (--resume)")
                continue
            r = map_model(spec, out / name, options, overwrite=overwrite, resume=resume,
                          ray=None if ray is None else "auto")
            notes += [f"{name}: {n}" for n in r.notes if not n.startswith("--ray: using")]
            done.append({"name": name, "spec": spec, "path": str(r.path), "n_rows": r.meta["n_rows"],
                         "seconds": round(r.seconds, 3), "reused": False})
        _write_series(out, done)
    finally:
        if started:
            import ray as ray_module

            ray_module.shutdown()
    return ManyResult(out, done, time.perf_counter() - t0, notes)


def _series_is_ours(data) -> bool:
    """Whether a series.json's content is map-many's: the format marker, or the listing written before it had one."""
    if not isinstance(data, dict):
        return False
    if data.get("format") == FORMAT:
        return True
    entries = data.get("atlases")
    return set(data) == {"atlases"} and isinstance(entries, list) and all(
        isinstance(a, dict) and set(a) == {"name", "spec"} and isinstance(a["spec"], str) and isinstance(a["name"], str)
        and re.fullmatch(r"[0-9]{3}-[A-Za-z0-9._-]+", a["name"]) for a in entries)


def check_series_file(out: Path) -> None:
    f = out / SERIES
    try:
        ours = _series_is_ours(json.loads(f.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise NeuronmapError(f"{f} was not written by neuronmap (no \"format\": \"{FORMAT}\"), and map-many would "
                             "replace it: move it out of the way or choose another out=...")


def check_series_dir(out: Path, overwrite: bool) -> None:
    """Check that ``map_many`` can write into ``out`` without replacing anything it did not write.

    ``out`` may be absent or empty, or hold a series.json of map-many's (with anything else beside it), or only
    what an interrupted map-many leaves (atlases ``NNN-NAME``, their parts and temporaries). Any other directory
    needs ``overwrite``, which adds the atlases beside its files and replaces none of them. A series.json that
    neuronmap did not write is refused with or without ``overwrite``.

    Raises:
        NeuronmapError: ``out`` is a file or unreadable; a series.json of someone else's; other files without
            ``overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise NeuronmapError(f"out={out} is a file: give a directory to hold one atlas per source")
    try:
        entries = sorted(os.listdir(out)) if out.is_dir() else []
    except OSError as e:
        raise NeuronmapError(f"cannot read out={out} ({e.strerror or e}): choose another out=...") from e
    if SERIES in entries:
        check_series_file(out)
        return
    strangers = [e for e in entries if not _OURS.fullmatch(e)]
    if strangers and not overwrite:
        shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        raise NeuronmapError(f"out={out} is not empty and map-many did not write it (it holds {shown}): choose a new or "
                             "empty directory, or pass overwrite=True to add the atlases beside those files (none is replaced)")


def _write_series(out: Path, atlases: list[dict]) -> None:
    """series.json, once every atlas is in place; checked again first, in case someone put theirs there meanwhile."""
    check_series_file(out)
    listing = {"format": FORMAT, "atlases": [{"name": a["name"], "spec": a["spec"]} for a in atlases]}
    with fsio.atomic_file(out / SERIES, "series") as tmp:
        tmp.write_text(json.dumps(listing, indent=2) + "\n")


def _complete(path: Path) -> bool:
    try:
        Atlas.open(path)
        return True
    except NeuronmapError:
        return False
