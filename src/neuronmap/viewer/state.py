"""What a viewer serves: the atlases named on the command line, by name, and the results it keeps.

No part of a URL is ever used as a file path: a request names an atlas by the
name given here (its directory's name), looked up in a dict built at start-up.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from neuronmap.atlas import AtlasFiles, open_files
from neuronmap.errors import NeuronmapError

_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class RequestError(NeuronmapError):
    """Bad input from a request: the one-line message the CLI gives, and the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Served:
    """The atlases of one viewer, in the order given, and a small cache of results computed from them.

    Attributes:
        atlases: name -> the opened atlas.
        hosts: the Host header values requests may carry (``*``: any).
        cache: results that take long to compute (stats, comparisons), keyed by what they depend on.
        stamps: name -> the (mtime, size) of its meta.json when it was opened.
    """

    atlases: dict[str, AtlasFiles]
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost"])
    cache: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stamps: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.atlases)

    def get(self, name: str | None) -> tuple[str, AtlasFiles]:
        """The atlas called ``name`` (None: the first one).

        Raises:
            RequestError: 404 for a name not served, listing the names that are.
        """
        if name is None or name == "":
            name = self.names[0]
        if name not in self.atlases:
            raise RequestError(f"unknown atlas {name!r}: this viewer serves {', '.join(self.names)}; "
                               "pick one of those with ?atlas=NAME", 404)
        self._refresh(name)
        return name, self.atlases[name]

    def _refresh(self, name: str) -> None:
        """Reopen an atlas whose meta.json changed since it was opened (evidence recorded, or mapped again), and
        forget the results computed from it. Every writer renames meta.json into place last, so a changed stamp
        means a finished atlas; one that fails to open is left as it was served."""
        files = self.atlases[name]
        stamp = _stamp(files.root)
        if stamp == self.stamps.get(name, stamp):
            return
        try:
            fresh = open_files(files.root)
        except NeuronmapError:
            return
        with self.lock:
            self.atlases[name], self.stamps[name] = fresh, stamp
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


def serve_atlases(paths: list[Path | str]) -> Served:
    """Open every atlas (refusing anything that is not one, with ``open_files``' message) and name it.

    A name is the directory's name, made URL-safe; a repeated name gets ``-2``, ``-3``.

    Raises:
        NeuronmapError: no atlas given, or a path that is not a readable atlas.

    Example:
        >>> serve_atlases(["demo-atlas"]).names  # doctest: +SKIP
        ['demo-atlas']
    """
    if not paths:
        raise NeuronmapError("no atlas given: pass one or more atlas directories, e.g. `neuronmap serve demo-atlas`")
    atlases: dict[str, AtlasFiles] = {}
    for p in paths:
        files = open_files(p)
        base = _NAME.sub("-", files.root.resolve().name).strip("-") or "atlas"
        name, n = base, 1
        while name in atlases:
            n += 1
            name = f"{base}-{n}"
        atlases[name] = files
    return Served(atlases, stamps={name: _stamp(f.root) for name, f in atlases.items()})


def _stamp(root: Path) -> tuple[int, int] | None:
    try:
        st = (root / "meta.json").stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
