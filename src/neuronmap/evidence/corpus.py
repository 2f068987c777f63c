"""A text corpus for ``record``: its documents, its sha256, and the sequences the model reads.

Formats (by the path):
  - a directory: every ``.txt`` and ``.md`` file below it, in sorted order, one document each;
  - ``.txt`` / ``.md``: one document (tokenized in pieces split at line ends, so a large file is never held whole);
  - ``.jsonl``: one JSON object per line, the document in ``--text-column`` (default ``text``);
  - ``.parquet``: one row per document, the document in ``--text-column``;
  - ``.dict.dz`` / ``.dict`` with its ``.index`` beside it: a dictd dictionary (Debian's ``dict-gcide``,
    ``/usr/share/dictd/gcide.dict.dz``), one entry a document, its wrapped lines joined and its source tags
    (``[1913 Webster]``) left out;
  - ``hf:NAME[:CONFIG[:SPLIT]]``: a dataset already in the local Hugging Face datasets cache (read offline, with
    pyarrow alone, from its Arrow files), one row a document; CONFIG may be left out where the cache holds one,
    SPLIT defaults to ``train``.

``every`` (``record --every N``) keeps the first of each N documents: a spread-out slice of a large corpus.

A document is cut into sequences of at most ``context`` tokens (the model's input
rows); where the tokenizer puts a beginning-of-sequence token before plain text,
it is put before each sequence and never recorded. A sequence is everything the model saw when it
produced a recorded activation, so an example's window is that sequence's tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from neuronmap.core.errors import NeuronmapError

TEXT_SUFFIXES = (".txt", ".md")
FORMATS = "a .txt or .md file, a directory of them, .jsonl, .parquet, a dictd .dict.dz, or hf:NAME[:CONFIG[:SPLIT]]"
TEXT_COLUMN = "text"
_PIECE_CHARS = 1 << 16  # a text file is tokenized in pieces of about this many characters, cut at a line end


@dataclass(frozen=True)
class Corpus:
    """A corpus on disk.

    Attributes:
        path: the file or directory (for ``hf``, the cached dataset's directory).
        kind: ``text`` | ``dir`` | ``jsonl`` | ``parquet`` | ``dictd`` | ``hf``.
        files: the files read, in order.
        text_column: the column holding the text (``jsonl``, ``parquet``, ``hf``).
        every: documents kept: the first of each ``every``.
        name: what the user named (the path's name, or the ``hf:`` spec).
    """

    path: Path
    kind: str
    files: tuple[Path, ...]
    text_column: str = TEXT_COLUMN
    every: int = 1
    name: str = ""

    def sha256(self) -> str:
        """sha256 of the files' bytes, each preceded by its path relative to the corpus's folder (the layout counts)."""
        if len(self.files) == 1:
            return _file_hash(self.files[0])
        h = hashlib.sha256()
        folder = self.path if self.path.is_dir() else self.path.parent
        for f in self.files:
            h.update(str(f.relative_to(folder)).encode() + b"\0" + _file_hash(f).encode())
        return h.hexdigest()

    def to_dict(self) -> dict:
        return {"name": self.name or self.path.name, "path": str(self.path.resolve()), "format": self.kind,
                "files": len(self.files), "sha256": self.sha256(), "every": self.every}


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_corpus(path: Path | str, text_column: str | None = None, every: int = 1) -> Corpus:
    """Find a corpus's files and check its format, before any model loads.

    Args:
        path: a text file, a directory of .txt/.md files, a .jsonl or .parquet file, a dictd ``.dict.dz``, or
            ``hf:NAME[:CONFIG[:SPLIT]]``.
        text_column: the column holding the text (JSONL, Parquet, hf); default ``text``.
        every: keep the first of each ``every`` documents.

    Returns:
        Corpus.

    Raises:
        NeuronmapError: a missing path, an unknown format, a directory without text files, a Parquet file or
            cached dataset without the column, a dataset not in the cache, or ``--text-column`` given for
            plain text.

    Example:
        >>> open_corpus("src/neuronmap/data/beekeeping.txt").kind
        'text'
    """
    if every < 1:
        raise NeuronmapError(f"--every {every} is out of range: expected a whole number >= 1")
    if str(path).startswith("hf:"):
        from neuronmap.evidence.corpus_sources import cached_dataset

        root, files = cached_dataset(str(path)[3:])
        return _checked(Corpus(root, "hf", files, text_column or TEXT_COLUMN, every, str(path)))
    path = Path(path)
    if not path.exists():
        raise NeuronmapError(f"--corpus {path} does not exist: give {FORMATS}")
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES))
        if not files:
            raise NeuronmapError(f"--corpus {path} is a directory with no .txt or .md files: add some, or give {FORMATS}")
        kind = "dir"
    elif path.name.endswith((".dict.dz", ".dict")):
        index = path.with_name(path.name.removesuffix(".dz").removesuffix(".dict") + ".index")
        if not index.is_file():
            raise NeuronmapError(f"--corpus {path} is a dictd dictionary without its index {index.name} beside it: "
                                 "keep the two files together")
        kind, files = "dictd", (path, index)
    else:
        suffix = path.suffix.lower()
        kind = "text" if suffix in TEXT_SUFFIXES else {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "")
        if not kind:
            raise NeuronmapError(f"--corpus {path}: unknown format {suffix or '(no suffix)'!r}: give {FORMATS}")
        files = (path,)
    if text_column is not None and kind in ("text", "dir", "dictd"):
        raise NeuronmapError(f"--text-column {text_column!r} applies to .jsonl, .parquet and hf: corpora; {path} is "
                             "plain text: leave it out")
    return _checked(Corpus(path, kind, files, text_column or TEXT_COLUMN, every, path.name))


def _checked(corpus: Corpus) -> Corpus:
    """A table corpus whose text column exists (Parquet, hf), or any other corpus as it is."""
    if corpus.kind not in ("parquet", "hf"):
        return corpus
    try:
        if corpus.kind == "parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(corpus.path).schema_arrow.names
        else:
            from neuronmap.evidence.corpus_sources import arrow_schema

            names = arrow_schema(corpus.files[0]).names
    except NeuronmapError:
        raise
    except Exception as e:
        raise NeuronmapError(f"--corpus {corpus.name} is not a readable {corpus.kind} table "
                             f"({str(e).splitlines()[0][:100]}): give a table with a text column") from e
    if corpus.text_column not in names:
        raise NeuronmapError(f"--corpus {corpus.name} has no column {corpus.text_column!r} (it has {', '.join(names[:8])}): "
                             "name the text column with --text-column")
    return corpus


def _text(path: Path, where: str) -> Iterator[str]:
    """A text file in pieces of about ``_PIECE_CHARS`` characters cut after a newline; checked to be UTF-8 text."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            pending = ""
            for line in f:
                if "\0" in line:
                    raise NeuronmapError(f"{where} holds NUL bytes: it is a binary file, not text; give {FORMATS}")
                pending += line
                if len(pending) >= _PIECE_CHARS:
                    yield pending
                    pending = ""
            if pending:
                yield pending
    except UnicodeDecodeError as e:
        raise NeuronmapError(f"{where} is not UTF-8 text (byte {e.start} of a line is {e.object[e.start:e.start + 1]!r}): "
                             f"it looks binary; give {FORMATS}") from e


def _jsonl(c: Corpus) -> Iterator[tuple[str, Iterator[str]]]:
    try:
        with open(c.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise NeuronmapError(f"{c.path}:{n} is not a JSON object ({e}): give one JSON object per line") from e
                if not isinstance(obj, dict) or c.text_column not in obj:
                    have = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                    raise NeuronmapError(f"{c.path}:{n} has no field {c.text_column!r} (it has {have}): "
                                         "name the text field with --text-column")
                if not isinstance(obj[c.text_column], str):
                    raise NeuronmapError(f"{c.path}:{n}: field {c.text_column!r} is a {type(obj[c.text_column]).__name__}, "
                                         "expected a string: name the text field with --text-column")
                yield f"{c.path.name}:{n}", iter([obj[c.text_column]])
    except UnicodeDecodeError as e:
        raise NeuronmapError(f"{c.path} is not UTF-8 text: it looks binary; give {FORMATS}") from e


def _parquet(c: Corpus) -> Iterator[tuple[str, Iterator[str]]]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(c.path)
    row = 0
    for batch in f.iter_batches(batch_size=1024, columns=[c.text_column]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise NeuronmapError(f"{c.path}: column {c.text_column!r} holds {type(text).__name__} values, expected "
                                     "strings: name the text column with --text-column")
            yield f"{c.path.name}:{row}", iter([text])


def _texts(c: Corpus) -> Iterator[tuple[str, Iterator[str]]]:
    if c.kind == "jsonl":
        yield from _jsonl(c)
    elif c.kind == "parquet":
        yield from _parquet(c)
    elif c.kind == "dictd":
        from neuronmap.evidence.corpus_sources import dictd_entries

        yield from ((name, iter([text])) for name, text in dictd_entries(c.files[0], c.files[1]))
    elif c.kind == "hf":
        from neuronmap.evidence.corpus_sources import arrow_texts

        yield from ((name, iter([text])) for name, text in arrow_texts(c.files, c.text_column, c.name))
    else:
        for f in c.files:
            name = f.name if c.kind == "text" else str(f.relative_to(c.path))
            yield name, _text(f, str(f))


def documents(c: Corpus) -> Iterator[tuple[str, Iterator[str]]]:
    """Each document's name and its text, in pieces: the first of each ``c.every``.

    Raises:
        NeuronmapError: a binary or non-UTF-8 file, a JSONL line that is not an object with the text field.
    """
    for i, doc in enumerate(_texts(c)):
        if i % c.every == 0:
            yield doc


@dataclass(frozen=True)
class Sequence:
    """One input row: ``token_ids`` of document ``doc`` from its token ``start`` on (no BOS)."""

    doc: str
    start: int
    token_ids: list[int]


def sequences(c: Corpus, tokenizer, context: int) -> Iterator[Sequence]:
    """The corpus as sequences of at most ``context`` tokens, each within one document.

    Args:
        c: from ``open_corpus``.
        tokenizer: a transformers tokenizer (no special tokens are added).
        context: tokens per sequence.

    Raises:
        NeuronmapError: as ``documents``.

    Example:
        >>> next(sequences(open_corpus("notes.txt"), tok, 32)).start  # doctest: +SKIP
        0
    """
    for name, pieces in documents(c):
        pos, pending = 0, []
        for piece in pieces:
            pending += tokenizer(piece, add_special_tokens=False)["input_ids"]
            while len(pending) >= context:
                yield Sequence(name, pos, pending[:context])
                pos, pending = pos + context, pending[context:]
        if pending:
            yield Sequence(name, pos, pending)
