"""A text corpus for ``record``: its documents, its sha256, and the sequences the model reads.

Formats (by the path):
  - a directory: every ``.txt`` and ``.md`` file below it, in sorted order, one document each; symlinked folders
    are followed, each real folder read once (a link back up ends there);
  - ``.txt`` / ``.md``: one document, read a line at a time (a line in chunks of ``PIECE_CHARS``), never whole;
  - ``.jsonl``: one JSON object per line (at most ``JSONL_LINE_CHARS`` characters), the document in
    ``--text-column`` (default ``text``);
  - ``.parquet``: one row per document, the document in ``--text-column``;
  - ``.dict.dz`` / ``.dict`` with its ``.index`` beside it: a dictd dictionary (Debian's ``dict-gcide``,
    ``/usr/share/dictd/gcide.dict.dz``), one entry a document, its wrapped lines joined and its source tags
    (``[1913 Webster]``) left out;
  - ``hf:NAME[:CONFIG[:SPLIT]]``: a dataset already in the local Hugging Face datasets cache (read offline, with
    pyarrow alone, from its Arrow files), one row a document; CONFIG may be left out where the cache holds one,
    SPLIT defaults to ``train``.

``every`` (``record --every N``) keeps the first of each N documents: a spread-out slice of a large corpus.

Only regular files are read (through symlinks): a named pipe would block and a device such as /dev/zero never
ends, so both are refused. ``open_corpus`` reads the start of the corpus (the first document, the head of each
file of a directory) so that a binary file, another encoding or a missing column is reported before a model loads.

The tokenizer never sees more than ``PIECE_CHARS`` characters at once: a document is given to it in pieces cut
at a line end, else before a space or tab, else (a run with neither) at the limit, so a 20 MB line costs what
its tokens cost. A cut inside a line can tokenize a word at the cut differently from the text read whole.

A document is cut into sequences of at most ``context`` tokens (the model's input
rows); where the tokenizer puts a beginning-of-sequence token before plain text,
it is put before each sequence and never recorded. A sequence is everything the model saw when it
produced a recorded activation, so an example's window is that sequence's tokens.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from neuronmap.core.errors import NeuronmapError

TEXT_SUFFIXES = (".txt", ".md")
FORMATS = "a .txt or .md file, a directory of them, .jsonl, .parquet, a dictd .dict.dz, or hf:NAME[:CONFIG[:SPLIT]]"
TEXT_COLUMN = "text"
PIECE_CHARS = 1 << 16  # the most text the tokenizer is given at once (characters)
JSONL_LINE_CHARS = 1 << 26  # a JSONL line is one document parsed whole: bounded so that memory is
_HEAD_BYTES = 1 << 13  # read of each file before the model loads, to find binary files and other encodings


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
    """Find a corpus's files and read its start, before any model loads.

    Args:
        path: a text file, a directory of .txt/.md files, a .jsonl or .parquet file, a dictd ``.dict.dz``, or
            ``hf:NAME[:CONFIG[:SPLIT]]``.
        text_column: the column holding the text (JSONL, Parquet, hf); default ``text``.
        every: keep the first of each ``every`` documents.

    Returns:
        Corpus.

    Raises:
        NeuronmapError: a missing path, an unknown format, a directory without text files, a named pipe, device or
            other file that is not a regular one (through symlinks too), a Parquet file or cached dataset without
            the column, a dataset not in the cache, ``--text-column`` given for plain text, or a start of the
            corpus that ``documents`` would refuse (binary, not UTF-8, a first JSONL line without the field).

    Example:
        >>> open_corpus("src/neuronmap/data/beekeeping.txt").kind
        'text'
    """
    if every < 1:
        raise NeuronmapError(f"every={every} is out of range: expected a whole number >= 1")
    if str(path).startswith("hf:"):
        from neuronmap.evidence.corpus_sources import cached_dataset

        root, files = cached_dataset(str(path)[3:])
        for f in files:
            _regular(f)
        return _checked(Corpus(root, "hf", files, text_column or TEXT_COLUMN, every, str(path)))
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise NeuronmapError(f"corpus={path} does not exist: give {FORMATS}")
    if path.is_dir():
        files = _dir_files(path)
        if not files:
            raise NeuronmapError(f"corpus={path} is a directory with no .txt or .md files: add some, or give {FORMATS}")
        kind = "dir"
    elif path.name.endswith((".dict.dz", ".dict")):
        _regular(path)
        index = path.with_name(path.name.removesuffix(".dz").removesuffix(".dict") + ".index")
        if not index.is_file():
            raise NeuronmapError(f"corpus={path} is a dictd dictionary without its index {index.name} beside it: "
                                 "keep the two files together")
        kind, files = "dictd", (path, index)
    else:
        _regular(path)
        suffix = path.suffix.lower()
        kind = "text" if suffix in TEXT_SUFFIXES else {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "")
        if not kind:
            raise NeuronmapError(f"corpus={path}: unknown format {suffix or '(no suffix)'!r}: give {FORMATS}")
        files = (path,)
    if text_column is not None and kind in ("text", "dir", "dictd"):
        raise NeuronmapError(f"text_column={text_column!r} applies to .jsonl, .parquet and hf: corpora; {path} is "
                             "plain text: leave it out")
    return _checked(Corpus(path, kind, files, text_column or TEXT_COLUMN, every, path.name))


def _regular(path: Path) -> None:
    """Refuse anything but a regular file, through symlinks: a named pipe blocks a read, /dev/zero never ends.

    Raises:
        NeuronmapError: a pipe, device, socket, broken symlink or unreadable path, named with what it is.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        what = f"a broken symlink (to {os.readlink(path)})" if path.is_symlink() else f"unreadable ({e.strerror})"
        raise NeuronmapError(f"corpus={path} is {what}: give {FORMATS}") from e
    if stat.S_ISREG(mode):
        return
    what = ("a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    via = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
    raise NeuronmapError(f"corpus={path}{via} is {what}, not a regular file: record reads regular files only (a pipe "
                         "or device may block or never end); save the text to a file and give that")


def _dir_files(root: Path) -> tuple[Path, ...]:
    """The .txt and .md files below ``root`` in sorted order, each a regular file.

    Symlinked folders are followed; each real folder is read once, under its own name where the walk meets it
    there first, so a link back up the tree ends there.

    Raises:
        NeuronmapError: a folder that cannot be listed, or a text file that is not a regular file (``_regular``).
    """
    def fail(e: OSError) -> None:
        raise NeuronmapError(f"corpus={root}: cannot list {e.filename} ({e.strerror}): make it readable or move it "
                             "out of the corpus") from e

    seen, found = set(), []
    for folder, dirs, names in os.walk(root, onerror=fail, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort(key=lambda d: (os.path.islink(os.path.join(folder, d)), d))  # a folder's own name before a link's
        found += [Path(folder, n) for n in names if Path(n).suffix.lower() in TEXT_SUFFIXES]
    for f in found:
        _regular(f)
    return tuple(sorted(found))


def _checked(corpus: Corpus) -> Corpus:
    """The corpus, its text column checked (Parquet, hf) and its start read (``_probe``)."""
    if corpus.kind in ("parquet", "hf"):
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
            raise NeuronmapError(f"corpus={corpus.name} is not a readable {corpus.kind} table "
                                 f"({str(e).splitlines()[0][:100]}): give a table with a text column") from e
        if corpus.text_column not in names:
            raise NeuronmapError(f"corpus={corpus.name} has no column {corpus.text_column!r} (it has "
                                 f"{', '.join(names[:8])}): name the text column with text_column=...")
    _probe(corpus)
    return corpus


def _probe(c: Corpus) -> None:
    """Read the start of the corpus: what would stop ``record`` after its model loads stops it before.

    Text files (one, or a directory's) are read ``_HEAD_BYTES`` each; other formats, their first document.

    Raises:
        NeuronmapError: a text file that starts binary or in another encoding, or is unreadable; text files all
            empty; a first document that ``documents`` refuses; no document at all.
    """
    if c.kind in ("text", "dir"):
        for f in c.files:
            _check_head(f)
        if all(f.stat().st_size == 0 for f in c.files):
            raise NeuronmapError(f"corpus={c.path} holds no text (0 bytes): give a corpus with some text")
        return
    for _, chunks in _texts(c):
        next(iter(chunks), None)
        return
    raise NeuronmapError(f"corpus={c.name or c.path} holds no documents: give a corpus with some text")


def _binary(where: str) -> NeuronmapError:
    return NeuronmapError(f"{where} holds NUL bytes: it is a binary file, not text; give {FORMATS}")


def _not_utf8(where: str, e: UnicodeDecodeError) -> NeuronmapError:
    return NeuronmapError(f"{where} is not UTF-8 text (it holds the byte {e.object[e.start:e.start + 1]!r}): it is "
                          f"binary or in another encoding; convert it to UTF-8, or give {FORMATS}")


def _check_head(path: Path) -> None:
    """The first ``_HEAD_BYTES`` of a text file: no NUL byte, valid UTF-8 (a character cut at the end is fine)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        raise NeuronmapError(f"corpus={path} cannot be read ({e.strerror}): make it readable") from e
    if b"\0" in head:
        raise _binary(str(path))
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError as e:
        raise _not_utf8(str(path), e) from e


def _text(path: Path, where: str) -> Iterator[str]:
    """A text file's lines, a long one in chunks of ``PIECE_CHARS``; checked to be UTF-8 text without NUL bytes."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for chunk in iter(lambda: f.readline(PIECE_CHARS), ""):
                if "\0" in chunk:
                    raise _binary(where)
                yield chunk
    except UnicodeDecodeError as e:
        raise _not_utf8(where, e) from e


def _pieces(chunks: Iterable[str]) -> Iterator[str]:
    """Text in pieces of at most ``PIECE_CHARS`` characters: cut at a line end, else before a space or tab, else at
    the limit (a space starts the next piece, as a word's leading space does in the tokenizer's own split)."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        at = 0
        while len(pending) - at >= PIECE_CHARS:
            end = at + PIECE_CHARS
            cut = pending.rfind("\n", at, end) + 1 or max(pending.rfind(" ", at + 1, end), pending.rfind("\t", at + 1, end))
            cut = cut if cut > at else end
            yield pending[at:cut]
            at = cut
        pending = pending[at:]
    if pending:
        yield pending


def _jsonl(c: Corpus) -> Iterator[tuple[str, Iterator[str]]]:
    try:
        with open(c.path, encoding="utf-8") as f:
            for n, line in enumerate(iter(lambda: f.readline(JSONL_LINE_CHARS + 1), ""), 1):
                if len(line) > JSONL_LINE_CHARS and not line.endswith("\n"):
                    raise NeuronmapError(f"{c.path}:{n} is longer than {JSONL_LINE_CHARS:,} characters, the most a JSONL "
                                         "line may hold (a line is parsed whole): split the document over several lines, "
                                         "or give it as a .txt file (read in pieces)")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise NeuronmapError(f"{c.path}:{n} is not a JSON object ({e}): give one JSON object per line") from e
                if not isinstance(obj, dict) or c.text_column not in obj:
                    have = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                    raise NeuronmapError(f"{c.path}:{n} has no field {c.text_column!r} (it has {have}): "
                                         "name the text field with text_column=...")
                if not isinstance(obj[c.text_column], str):
                    raise NeuronmapError(f"{c.path}:{n}: field {c.text_column!r} is a {type(obj[c.text_column]).__name__}, "
                                         "expected a string: name the text field with text_column=...")
                yield f"{c.path.name}:{n}", iter([obj[c.text_column]])
    except UnicodeDecodeError as e:
        raise _not_utf8(str(c.path), e) from e


def _texts(c: Corpus) -> Iterator[tuple[str, Iterator[str]]]:
    if c.kind == "jsonl":
        yield from _jsonl(c)
    elif c.kind == "parquet":
        import pyarrow.parquet as pq

        from neuronmap.evidence.corpus_sources import table_texts

        batches = lambda: pq.ParquetFile(c.path).iter_batches(batch_size=1024, columns=[c.text_column])  # noqa: E731
        yield from ((name, iter([text])) for name, text in table_texts(c.path, "Parquet", batches, c.text_column,
                                                                       c.path.name))
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
    """Each document's name and its text in pieces of at most ``PIECE_CHARS`` characters: the first of each ``c.every``.

    Raises:
        NeuronmapError: a binary or non-UTF-8 file, a JSONL line that is not an object with the text field or is
            too long, a damaged Parquet or Arrow file.
    """
    for i, (name, chunks) in enumerate(_texts(c)):
        if i % c.every == 0:
            yield name, _pieces(chunks)


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
            full = len(pending) // context * context  # sliced once a piece: not once a sequence
            for at in range(0, full, context):
                yield Sequence(name, pos + at, pending[at:at + context])
            pos, pending = pos + full, pending[full:]
        if pending:
            yield Sequence(name, pos, pending)
