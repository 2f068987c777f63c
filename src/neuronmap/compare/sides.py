"""The two sides of a comparison: an atlas, or a model source mapped once into the cache; what keeps them apart."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.atlas import format as atlas_io
from neuronmap.atlas.handle import Atlas
from neuronmap.atlas.store import choose_rows
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.sources.resolve import PACKAGED, looks_like_hub_id, resolve_source
from neuronmap.core.cache import cache_dir, file_sha256

SHAPE_KEYS = ("n_layers", "d_model", "d_mlp", "d_vocab")
DECODE_KEYS = ("norm", "fold_input_norm", "top_k")  # what the user chose; final norm and softcap belong to the model


@dataclass(frozen=True)
class Side:
    """One side of a comparison.

    Attributes:
        spec: what the user gave (atlas path or model source).
        path: the atlas directory.
        meta: its meta.json.
        mapped: True when ``spec`` was a model source (mapped now or found in the cache).
    """

    spec: str
    path: Path
    meta: dict
    mapped: bool

    def to_dict(self) -> dict:
        """JSON types only: what was given, the atlas, and the model's shape."""
        return {"spec": self.spec, "atlas": str(self.path), "mapped": self.mapped, "family": self.meta.get("family"),
                **{k: self.meta.get(k) for k in SHAPE_KEYS}, "top_k": self.meta["decode"]["top_k"]}


def atlas_key(files_sha256: list[str], options: MapOptions) -> str:
    """The cache key of a source's atlas: its weight files and every map option that changes the result.

    Example:
        >>> len(atlas_key(["ab" * 32], MapOptions()))
        20
    """
    opts = {"matrices": options.matrices, "layers": options.layers, "top_k": options.top_k, "norm": options.norm,
            "fold_input_norm": options.fold_input_norm, "dtype": options.dtype, "n_candidates": options.n_candidates,
            "atlas_version": atlas_io.VERSION}
    blob = json.dumps({"files": files_sha256, "options": opts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _looks_like_source(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.exists() or spec in PACKAGED or spec in ("demo",) or looks_like_hub_id(spec)


def resolve_atlas(
    spec: str, options: MapOptions = MapOptions(), progress: Callable[[str], None] | None = None,
) -> Side:
    """An atlas for ``spec``: the directory itself, or the cached atlas of a model source (mapped if missing).

    Args:
        spec: an atlas directory, or anything ``resolve_source`` takes.
        options: how to map a source (ignored for an atlas).
        progress: called with a one-line note before a source is mapped.

    Returns:
        Side.

    Raises:
        NeuronmapError: the path does not exist, or is neither an atlas nor a model source.

    Example:
        >>> resolve_atlas("/tmp/demo-atlas").meta["family"]  # doctest: +SKIP
        'llama'
    """
    p = Path(spec).expanduser()
    if p.is_dir() and ((p / "meta.json").exists() or (p / "neurons.parquet").exists()):
        return Side(spec, p, Atlas.open(p).meta, False)
    if not _looks_like_source(spec):
        raise NeuronmapError(
            f"{spec} does not exist: pass an atlas directory (made by `neuronmap map`) or a model source "
            f"(checkpoint directory, .gguf file, hub id org/name, or a packaged model: {', '.join(PACKAGED)})"
        )
    if p.is_dir() and not (p / "config.json").exists():
        raise NeuronmapError(
            f"{spec} is neither an atlas (no meta.json) nor a checkpoint directory (no config.json): "
            "pass an atlas made by `neuronmap map` or a model source"
        )
    try:
        src = resolve_source(spec)
    except NeuronmapError as e:
        if p.exists():
            raise
        raise NeuronmapError(f"{spec} is not an atlas directory (no such path), nor a usable model source: {e}") from e
    from neuronmap.decode.engine import resolve_device, resolve_dtype

    opts = replace(options, dtype=resolve_dtype(options.dtype, resolve_device(options.device)))
    shas = [file_sha256(f) for f in src.files]
    out = cache_dir() / "atlases" / atlas_key(shas, opts)
    # A cached atlas of every matrix and layer serves any subset too.
    for cand in (cache_dir() / "atlases" / atlas_key(shas, replace(opts, matrices=None, layers=None)), out):
        try:
            return Side(spec, cand, Atlas.open(cand).meta, True)
        except NeuronmapError:
            pass
    if progress:
        progress(f"mapping {spec} into {out} (once; later compares reuse it)")
    result = map_model(src, out, opts, overwrite=True)
    return Side(spec, out, result.meta, True)


def side_vocab(side: Side) -> pa.Array:
    """The side's token strings by id, ``[d_vocab]``."""
    return pq.read_table(side.path / "vocab.parquet", columns=["token"]).column("token").combine_chunks()


def vocab_hash(tokens: pa.Array) -> str:
    """sha256 of the token strings in id order: equal hashes mean the same tokenizer for decoding purposes."""
    h = hashlib.sha256()
    for t in tokens.to_pylist():
        h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()


def shape_differences(a: dict, b: dict, same_vocab: bool) -> list[str]:
    """What keeps two atlases from a neuron-level join, e.g. ``["n_layers 30 vs 18"]``; empty when none."""
    out = [f"{k} {a.get(k)} vs {b.get(k)}" for k in SHAPE_KEYS if a.get(k) != b.get(k)]
    if not same_vocab and a.get("d_vocab") == b.get("d_vocab"):
        out.append("token strings differ (same vocabulary size, different tokenizer)")
    return out


def decode_differences(a: dict, b: dict) -> list[str]:
    """Decode options that differ between two atlases, e.g. ``["top_k 10 vs 20"]``."""
    da, db = a.get("decode", {}), b.get("decode", {})
    out = [f"{k} {da.get(k)} vs {db.get(k)}" for k in DECODE_KEYS if da.get(k) != db.get(k)]
    if a.get("dtype") != b.get("dtype"):
        out.append(f"dtype {a.get('dtype')} vs {b.get('dtype')}")
    return out


def select_rows(side: Side, name: str, matrices: str | None, layers: str | None) -> tuple[list[str], list[int]]:
    """The matrices and layers of one side to compare (``choose_rows``), its errors naming the side.

    Raises:
        NeuronmapError: malformed, or rows the side's atlas was not mapped with.
    """
    try:
        mats, lays, _ = choose_rows(side.meta, matrices, layers, None)
    except NeuronmapError as e:
        raise NeuronmapError(f"{name} ({side.spec}): {e}") from e
    return mats, lays


def row_filters(side: Side, matrices: list[str], layers: list[int]) -> list | None:
    """A pyarrow filter for the chosen rows, or None when they are all the atlas holds."""
    d = side.meta["decode"]
    if set(d["matrices"]) <= set(matrices) and set(d["layers"]) <= set(layers):
        return None  # everything: skip the row filter
    return [("matrix", "in", matrices), ("layer", "in", layers)]
