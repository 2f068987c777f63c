"""The one exception type users see: a one-line message naming what is wrong and the fix."""


class NeuronmapError(Exception):
    """Bad input or state. The CLI prints ``error: <message>`` and exits 2, with no traceback."""


class ResumableError(NeuronmapError):
    """A failure of the machinery, not of the input (a Ray cluster that lost workers): a map keeps its finished parts."""


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
    from neuronmap.atlas import find_damaged  # the atlas module builds on this one

    found = find_damaged()  # DuckDB and Arrow rarely name the file: look among the atlases this process opened
    if found is not None:
        return f"{found[0]} cannot be read ({first}): the file is damaged; {found[1]}"
    return (f"cannot read the atlas's data ({first}): a file is damaged; rebuild the atlas with "
            "`neuronmap map SOURCE -o ATLAS --overwrite`")
