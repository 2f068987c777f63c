"""What a viewer serves: the atlases and removal reports named on the command line, by name, and the results it keeps.

No part of a URL is ever used as a file path: a request names an atlas or a report
by the name given here (its directory's name), looked up in a dict built at start-up.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from neuronmap.atlas.handle import Atlas
from neuronmap.core.errors import NeuronmapError

_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class RequestError(NeuronmapError):
    """Bad input from a request: the one-line message the CLI gives, and the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Report:
    """A removal report served under ``name``: what ``neuronmap remove`` recorded in ``path`` (its edits.json).

    Attributes:
        report: ``RemoveReport.to_dict()`` as read back (neuronmap.removal.report.read_report): the JSON ``remove --json`` printed.
    """

    name: str
    path: Path
    report: dict

    def to_dict(self) -> dict:
        return self.report


@dataclass
class Served:
    """The atlases and reports of one viewer, in the order given, and a small cache of results computed from the atlases.

    Attributes:
        atlases: name -> the opened atlas.
        reports: name -> a removal report (read once: ``remove`` never rewrites one in place).
        hosts: the Host header values requests may carry (``*``: any).
        cache: results that take long to compute (stats, comparisons), keyed by what they depend on.
        stamps: name -> the stat of its meta.json and data files when it was opened.
        broken: name -> why an atlas that changed on disk no longer opens (its requests answer that, not old data).
    """

    atlases: dict[str, Atlas]
    reports: dict[str, Report] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost"])
    cache: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stamps: dict = field(default_factory=dict)
    broken: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.atlases)

    def get(self, name: str | None) -> tuple[str, Atlas]:
        """The atlas called ``name`` (None: the first one).

        Raises:
            RequestError: 404 for a name not served, listing the names that are (or saying that none is).
        """
        if not self.atlases:
            raise RequestError("this viewer serves no atlas, only removal reports: serve one beside them, e.g. "
                               "`neuronmap serve ATLAS --report EDITED_DIR`", 404)
        if name is None or name == "":
            name = self.names[0]
        if name not in self.atlases:
            raise RequestError(f"unknown atlas {name!r}: this viewer serves {', '.join(self.names)}; "
                               "pick one of those with ?atlas=NAME", 404)
        self._refresh(name)
        if name in self.broken:
            raise RequestError(self.broken[name], 500)
        return name, self.atlases[name]

    def report(self, name: str) -> Report:
        """The report called ``name``.

        Raises:
            RequestError: 404 for a name not served, listing the names that are (or saying that none is).
        """
        if name not in self.reports:
            have = (f"this viewer serves {', '.join(self.reports)}; open one at /report/NAME" if self.reports else
                    "this viewer serves no report; serve one with `neuronmap serve --report EDITED_DIR`")
            raise RequestError(f"unknown report {name!r}: {have}", 404)
        return self.reports[name]

    def _refresh(self, name: str) -> None:
        """Reopen an atlas whose meta.json or a data file changed since it was opened (evidence recorded, mapped
        again, or a file changed in place), and forget the results computed from it. Reopening checks every file's
        sha256 again, so an atlas damaged while served answers one line naming the file instead of wrong rows."""
        files = self.atlases[name]
        stamp = _stamp(files.root)
        if stamp == self.stamps.get(name, stamp):
            return
        try:
            fresh = Atlas.open(files.root)
        except NeuronmapError as e:
            with self.lock:
                self.broken[name], self.stamps[name] = f"atlas {name!r} changed on disk and no longer opens: {e}", stamp
                self.cache = {k: v for k, v in self.cache.items() if name not in k[1:]}
            return
        with self.lock:
            self.atlases[name], self.stamps[name] = fresh, stamp
            self.broken.pop(name, None)
            self.cache = {k: v for k, v in self.cache.items() if name not in k[1:]}

    def cached(self, key: tuple, compute: Callable[[], object]) -> object:
        """``compute()`` once per ``key`` (a failure is not kept, so a fixed cause is retried)."""
        with self.lock:
            if key in self.cache:
                return self.cache[key]
        value = compute()
        with self.lock:
            self.cache[key] = value
        return value


def serve_atlases(paths: list[Path | str], reports: list[Path | str] = ()) -> Served:
    """Open every atlas and report (refusing anything that is not one, with ``open_files``' or ``read_report``'s
    message) and name each.

    A name is the directory's name (a report given as its edits.json: the directory holding it), made URL-safe;
    a repeated name gets ``-2``, ``-3``. Atlases and reports are named apart (their URLs differ).

    Raises:
        NeuronmapError: neither an atlas nor a report given, or a path that is not a readable atlas or report.

    Example:
        >>> serve_atlases(["demo-atlas"], ["no-paris"]).names  # doctest: +SKIP
        ['demo-atlas']
    """
    from neuronmap.removal.report import read_report

    if not paths and not reports:
        raise NeuronmapError("no atlas given: pass one or more atlas directories, e.g. `neuronmap serve demo-atlas`, "
                             "or a removal report with reports=EDITED_DIR")
    atlases: dict[str, Atlas] = {}
    for p in paths:
        files = Atlas.open(p)
        atlases[_unique(files.root, atlases, "atlas")] = files
    served: dict[str, Report] = {}
    for p in reports:
        file, report = read_report(p)
        name = _unique(file.parent, served, "report")
        served[name] = Report(name, file, report)
    return Served(atlases, served, stamps={name: _stamp(f.root) for name, f in atlases.items()})


def _unique(root: Path, taken: dict, fallback: str) -> str:
    """The directory's name, URL-safe, with ``-2``, ``-3`` added while ``taken`` has it."""
    base = _NAME.sub("-", root.resolve().name).strip("-") or fallback
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def _stamp(root: Path) -> tuple | None:
    """The stat of meta.json and of every data file beside it: any write, rename or in-place edit changes it."""
    out = []
    for p in sorted(q for q in root.glob("*.parquet") if q.name != "token_index.parquet") + [root / "meta.json"]:
        try:
            st = p.stat()
        except OSError:
            if p.name == "meta.json":
                return None
            continue
        out.append((p.name, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
    return tuple(out)
