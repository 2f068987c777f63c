"""The atlas on disk: ``meta.json``, ``neurons.parquet`` and ``vocab.parquet`` in one directory.

docs/atlas-format.md is the contract. An atlas is written into a temporary
sibling directory and renamed into place only when complete, so an interrupted
run never leaves something that looks like an atlas.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import ALL_MATRICES, POLES

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
    from neuronmap.core.cache import file_sha256

    path = Path(root) / name
    try:
        got = file_sha256(path)
    except OSError as e:
        raise NeuronmapError(f"cannot read {path} ({e.strerror or e}): {hint}") from e
    if got != want:
        raise NeuronmapError(f"{path} is damaged or was changed after it was written (its sha256 is {got[:12]}..., "
                             f"meta.json records {want[:12]}...): {hint}")


VOCAB_SCHEMA = pa.schema([("token_id", pa.int32()), ("token", pa.string())])


def is_atlas_dir(out: Path) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def rebuild_hint(path: Path | str, meta: object = None) -> str:
    """How to make a damaged atlas anew; --overwrite only where it would be accepted (meta.json says atlas)."""
    spec = meta.get("source", {}).get("spec") if isinstance(meta, dict) and isinstance(meta.get("source"), dict) else None
    if is_atlas_dir(Path(path)):
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
    if not isinstance(mats, list) or not mats or any(m not in ALL_MATRICES for m in mats):
        return f"decode.matrices is {mats!r}, expected a non-empty list of gate, up, down (features: enc, dec)"
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


# ------------------------------------------------------------------ activation evidence (neuronmap record)

AGREEMENT_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("neuron", pa.int32()), ("id", pa.string()), ("matrix", pa.string()), ("pole", pa.string()),
    ("n", pa.int32()), ("next_hit", pa.float32()), ("current_hit", pa.float32()), ("effect_share", pa.float32()),
    ("next_base", pa.float32()), ("current_base", pa.float32()), ("effect_base", pa.float32()),
])
SCORES = ("next_hit", "current_hit", "effect_share", "next_base", "current_base", "effect_base")
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99, 0.999)
EVIDENCE_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("neuron", pa.int32()), ("id", pa.string()), ("mean", pa.float32()), ("min", pa.float32()),
    ("max", pa.float32()), ("density", pa.float32()), ("quantiles", pa.list_(pa.float32())),
    ("hist", pa.list_(pa.int64())),
])
EXAMPLES_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("neuron", pa.int32()), ("id", pa.string()), ("pole", pa.string()), ("rank", pa.int32()),
    ("activation", pa.float32()), ("seq", pa.int64()), ("position", pa.int32()), ("token_id", pa.int32()),
])
CONTEXTS_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("doc", pa.string()), ("start", pa.int64()), ("token_ids", pa.list_(pa.int32())),
])
SCHEMAS = {"evidence": EVIDENCE_SCHEMA, "examples": EXAMPLES_SCHEMA, "contexts": CONTEXTS_SCHEMA,
           "agreement": AGREEMENT_SCHEMA}


def record_hint(files: AtlasFiles) -> str:
    """How to make an atlas's evidence files anew: record again, from the corpus meta.json names where it can."""
    entry = files.meta.get("evidence")
    corpus = entry.get("corpus") if isinstance(entry, dict) else None
    key = "name" if isinstance(corpus, dict) and corpus.get("format") == "hf" else "path"  # hf: the spec is its name
    spec = corpus.get(key) if isinstance(corpus, dict) and isinstance(corpus.get(key), str) else None
    return f"record it again with `neuronmap record {files.root} --corpus {spec or 'CORPUS'} --overwrite`"


def check_evidence(files: AtlasFiles) -> None:
    """Check the evidence files meta.json announces: present, readable, with their columns and row counts.

    Raises:
        NeuronmapError: naming the file and the fix (record again).

    Example:
        >>> check_evidence(AtlasFiles(Path("demo-atlas"), read_meta("demo-atlas")))  # doctest: +SKIP
    """
    entry = files.meta.get("evidence")
    if entry is None:
        return
    rows = entry.get("rows") if isinstance(entry, dict) else None
    hint = record_hint(files)
    if not isinstance(rows, dict) or any(not isinstance(rows.get(k), int) for k in SCHEMAS):
        raise NeuronmapError(f"{files.root}/meta.json has a damaged evidence entry (rows): {hint}")
    for k, schema in SCHEMAS.items():
        path = files.root / f"{k}.parquet"
        if not path.is_file():
            raise NeuronmapError(f"{path} is missing, though meta.json records activation evidence: {hint}")
        check_parquet(path, schema, rows[k], hint)
        verify_file(files.root, files.meta, path.name, hint)  # after the footer checks, whose messages say more


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
    check_evidence(files)
    with OPENED_LOCK:
        OPENED.pop(files.root, None)
        OPENED[files.root] = files.meta
        while len(OPENED) > _KEEPOPENED:
            OPENED.pop(next(iter(OPENED)))
    return files


# The atlases this process opened, most recent last: where `find_damaged` looks when a read fails deep inside
# DuckDB or Arrow with a message that names no file.
OPENED: dict[Path, dict] = {}
OPENED_LOCK = threading.Lock()
_KEEPOPENED = 16


