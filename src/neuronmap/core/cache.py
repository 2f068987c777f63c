"""neuronmap's on-disk cache and file hashing: ``cache_dir`` and the stat-keyed ``file_sha256``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from neuronmap.core.errors import NeuronmapError
from neuronmap.core.fsio import atomic_file


def cache_dir() -> Path:
    """neuronmap's cache: ``$NEURONMAP_CACHE`` or ``~/.cache/neuronmap``."""
    return Path(os.environ.get("NEURONMAP_CACHE") or Path.home() / ".cache" / "neuronmap")


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks, uncached (``file_sha256`` caches it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached so that a large checkpoint is hashed once.

    The cache key is the file's path, size, mtime, ctime, inode and device. A user
    can restore a file's mtime after editing it (``touch -r``), but not its ctime,
    which every write or ``utime`` moves to now; so an edited file is hashed again.
    The cache ($NEURONMAP_CACHE/sha256.json) is rewritten whole or not at all; a
    cache that cannot be written only costs a re-hash.

    Example:
        >>> file_sha256(Path("ck/model.safetensors"))[:12]  # doctest: +SKIP
        '3f2a9c1b7d4e'
    """
    st = path.stat()
    where = f"{path.resolve()}|"
    key = f"{where}{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"
    cache = cache_dir() / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    # One entry per path: an edited file's old entries can never match again.
    known = {k: v for k, v in known.items() if not k.startswith(where)}
    known[key] = hash_file(path)
    try:
        with atomic_file(cache, "cache") as tmp:
            tmp.write_text(json.dumps(known))
    except NeuronmapError:
        pass
    return known[key]
