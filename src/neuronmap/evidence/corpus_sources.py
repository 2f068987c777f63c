"""Corpora kept by other software: a dictd dictionary, and the Hugging Face datasets cache.

- dictd (``.dict.dz`` / ``.dict`` with ``.index``): the format of Debian's ``dict-*`` packages, such as
  ``dict-gcide`` (the GNU Collaborative International Dictionary of English, GPL-2+). The index has a line per
  headword, ``word TAB offset TAB length`` in dictd's base-64; several headwords share an entry, which is read
  once. A ``.dict.dz`` is gzip-compatible (dictzip), so it is read whole with ``gzip`` (GCIDE: 40 MB).
- The datasets cache (``$HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``, else ``~/.cache/huggingface/datasets``):
  a dataset ``owner/name`` that ``datasets.load_dataset`` once fetched lies in
  ``owner___name/CONFIG/VERSION/HASH/name-SPLIT[-00000-of-00003].arrow`` (Arrow IPC streams), which pyarrow reads
  directly: no network and no ``datasets`` package needed.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa

from neuronmap.core.errors import NeuronmapError

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
# GCIDE's source attributions ("[1913 Webster]", "[WordNet 1.5]", "[PJC]"): bookkeeping, not prose.
_SOURCE_TAG = re.compile(r"\s*\[[^\]\n]*(?:Webster|WordNet|PJC|Century|Chambers)[^\]\n]*\]")


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64[ch]
    return n


def dictd_entries(dict_path: Path, index_path: Path) -> Iterator[tuple[str, str]]:
    """Each entry of a dictd dictionary once, in index order: ``(headword, text)``.

    The text is the entry with its wrapped lines joined (paragraphs kept) and GCIDE's source tags removed;
    the database's own entries (``00-database-info``, ``00-gcide-url``, ...) are left out.

    Raises:
        NeuronmapError: an index line that is not ``word TAB offset TAB length``, or a file that is not dictd.
    """
    opener = gzip.open if dict_path.name.endswith(".dz") else open
    try:
        with opener(dict_path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise NeuronmapError(f"corpus={dict_path} is not a readable dictd file ({e}): give a .dict.dz with its .index") from e
    seen = set()
    with open(index_path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            try:
                word, start, length = parts[0], _b64(parts[1]), _b64(parts[2])
            except (IndexError, KeyError) as e:
                raise NeuronmapError(f"{index_path}:{n} is not a dictd index line (word TAB offset TAB length): "
                                     "give the .index made with the .dict") from e
            if word.startswith("00-") or (start, length) in seen:
                continue
            seen.add((start, length))
            text = _SOURCE_TAG.sub("", data[start:start + length].decode("utf-8", errors="replace"))
            paragraphs = (" ".join(line.strip() for line in block.splitlines()) for block in text.split("\n\n"))
            yield word, "\n".join(p for p in paragraphs if p)


def datasets_cache() -> Path:
    """The Hugging Face datasets cache directory, as ``datasets`` finds it."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "datasets"


def cached_dataset(spec: str) -> tuple[Path, tuple[Path, ...]]:
    """Find ``NAME[:CONFIG[:SPLIT]]`` in the datasets cache: the dataset's directory and its split's Arrow files.

    Raises:
        NeuronmapError: not in the cache (it names what is), an ambiguous or unknown config, no such split.

    Example:
        >>> cached_dataset("wikitext:wikitext-2-raw-v1:test")[1][0].name  # doctest: +SKIP
        'wikitext-test.arrow'
    """
    name, config, split = (spec.split(":") + [None, None])[:3]
    split = split or "train"
    cache = datasets_cache()
    root = cache / name.replace("/", "___")
    if not name or not root.is_dir():
        have = sorted(p.name.replace("___", "/") for p in cache.glob("*") if p.is_dir() and not p.name.startswith("_"))
        raise NeuronmapError(f"corpus=hf:{spec}: dataset {name!r} is not in the Hugging Face datasets cache {cache} "
                             f"(it holds {', '.join(have[:8]) or 'nothing'}): fetch it once with "
                             "datasets.load_dataset where there is a network, or set HF_DATASETS_CACHE")
    configs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if config and config not in configs:
        raise NeuronmapError(f"corpus=hf:{spec}: no config {config!r} (the cache has {', '.join(configs) or 'none'}): "
                             "name one the cache has")
    if not config and len(configs) != 1:
        raise NeuronmapError(f"corpus=hf:{spec}: name a config (the cache has {', '.join(configs) or 'none'}): "
                             f"use hf:{name}:CONFIG[:SPLIT]")
    cfg = root / (config or configs[0])
    builds = sorted((p for p in cfg.glob("*/*") if p.is_dir() and (p / "dataset_info.json").is_file()),
                    key=lambda p: p.stat().st_mtime)
    if not builds:
        raise NeuronmapError(f"corpus=hf:{spec}: {cfg} holds no finished dataset (no dataset_info.json): "
                             "load it again with datasets.load_dataset")
    build = builds[-1]  # the newest, as datasets itself would reuse
    files = sorted(build.glob(f"*-{split}.arrow")) + sorted(build.glob(f"*-{split}-[0-9]*-of-[0-9]*.arrow"))
    if not files:
        splits = sorted({re.sub(r"-\d+-of-\d+$", "", p.stem).rsplit("-", 1)[-1] for p in build.glob("*.arrow")})
        raise NeuronmapError(f"corpus=hf:{spec}: no split {split!r} (the cache has {', '.join(splits) or 'none'}): "
                             f"use hf:{name}:{cfg.name}:SPLIT")
    return build, tuple(files)


def damaged_table(name: str, kind: str, row: int, e: Exception) -> NeuronmapError:
    """The error for a corpus table (Parquet, Arrow) whose data cannot be read after ``row`` rows: the corpus's fault."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return NeuronmapError(f"corpus={name} is damaged: its {kind} data after row {row:,} cannot be read ({first}); "
                          "it is the corpus file that is damaged, not the atlas: replace it with a good copy")


def table_texts(path: Path, kind: str, batches: Callable[[], Iterable], column: str, label: str,
                row: int = 0) -> Iterator[tuple[str, str]]:
    """Each row's text of a table's record batches, named ``LABEL:ROW``; null rows skipped, rows counted on from ``row``.

    Args:
        path: the file the batches come from, named when it is damaged; kind: ``Parquet`` or ``Arrow``.
        batches: opens the file and gives its record batches (opened inside, so that a damaged footer is caught too).
        column: the text column; label: the document names' prefix.
        row: the rows of earlier files of the same corpus.

    Returns:
        (as the generator's value) the rows counted, for the next file.

    Raises:
        NeuronmapError: values that are not strings; data that cannot be read, named as the corpus's fault (left to
            the CLI, Arrow's error would read as a damaged atlas).
    """
    try:
        for batch in batches():
            for text in batch.column(column).to_pylist():
                row += 1
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise NeuronmapError(f"corpus={path}: column {column!r} holds {type(text).__name__} values, "
                                         "expected strings: name the text column with text_column=...")
                yield f"{label}:{row}", text
    except (OSError, pa.ArrowException) as e:
        raise damaged_table(str(path), kind, row, e) from e
    return row


def arrow_schema(path: Path) -> pa.Schema:
    """The schema of a cached Arrow file (an IPC stream, as ``datasets`` writes it)."""
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).schema


def arrow_texts(files: tuple[Path, ...], column: str, name: str) -> Iterator[tuple[str, str]]:
    """Each row's text of cached Arrow files, named ``NAME:ROW`` (rows counted from 1 across the files).

    Raises:
        NeuronmapError: the column holds something other than strings; a damaged Arrow file (named).
    """
    def batches(path: Path) -> Iterator[pa.RecordBatch]:
        with pa.memory_map(str(path)) as src:
            yield from pa.ipc.open_stream(src)

    row = 0
    for path in files:
        row = yield from table_texts(path, "Arrow", lambda path=path: batches(path), column, name, row)
