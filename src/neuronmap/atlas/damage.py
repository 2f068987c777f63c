"""Naming the damaged file when a read fails deep inside DuckDB or Arrow with a message that names none."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neuronmap.core.errors import NeuronmapError

from neuronmap.atlas.format import OPENED, OPENED_LOCK, SCHEMAS, AtlasFiles, rebuild_hint, record_hint, verify_file


def data_files(files: AtlasFiles) -> list[tuple[Path, str]]:
    """Every data file of an atlas with how to make it anew: ``[(path, hint)]``, neurons and vocab first."""

    hint = rebuild_hint(files.root, files.meta)
    out = [(files.neurons, hint), (files.vocab, hint)]
    if "evidence" in files.meta:
        out += [(files.root / f"{k}.parquet", record_hint(files)) for k in SCHEMAS]
    return out


def _readable(path: Path) -> bool:
    try:
        f = pq.ParquetFile(path)
        for i in range(f.num_row_groups):
            f.read_row_group(i)
        return True
    except (OSError, pa.ArrowException):
        return False


def find_damaged() -> tuple[Path, str] | None:
    """The damaged data file of an atlas this process opened, and how to make it anew; None if none is found.

    A file with a recorded sha256 is checked against it (cached by file stat: cheap); one without (an atlas written
    before neuronmap recorded them) is read whole with Arrow, which costs a read but only runs once a read has failed.
    """
    with OPENED_LOCK:
        opened = list(OPENED.items())[::-1]
    from neuronmap.atlas.store import token_index_ready

    for root, meta in opened:
        files = AtlasFiles(root, meta)
        index = token_index_ready(files)
        derived = [(index, "remove it; the next stored=True lookup builds it anew")] if index else []
        for path, hint in data_files(files) + derived:
            if not path.is_file():
                continue
            if path.name in meta.get("sha256", {}):
                try:
                    verify_file(root, meta, path.name, hint)
                except NeuronmapError:
                    return path, hint
            elif not _readable(path):
                return path, hint
    return None


def damaged_data(e: Exception) -> str | None:
    """One line for a read error from DuckDB or Arrow: an atlas file that passed its footer checks but is damaged inside.

    The file is named, with its fix (map again for neurons and vocab, record again for evidence), when a data
    file of an atlas this process opened is found damaged (``atlas.find_damaged``).

    Returns:
        The message (the CLI prints it, the viewer answers it with a 500), or None for any other exception:
        a bug, which keeps its traceback.
    """
    import duckdb
    import pyarrow as pa

    # Errors in neuronmap's own SQL are bugs and keep their traceback; the rest come from the data.
    bugs = (duckdb.ParserException, duckdb.SyntaxException, duckdb.BinderException, duckdb.CatalogException,
            duckdb.InvalidTypeException)
    if not isinstance(e, (duckdb.Error, pa.ArrowInvalid, pa.ArrowIOError)) or isinstance(e, bugs):
        return None
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    found = find_damaged()  # DuckDB and Arrow rarely name the file: look among the atlases this process opened
    if found is not None:
        return f"{found[0]} cannot be read ({first}): the file is damaged; {found[1]}"
    return (f"cannot read the atlas's data ({first}): a file is damaged; rebuild the atlas with "
            "`neuronmap map SOURCE -o ATLAS --overwrite`")
