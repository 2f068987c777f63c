"""Stage 3, atlas: an atlas on disk and every query of it.

Owns the files, their schemas and checks (format, evidence files included), the DuckDB store and row selection
(store), concepts as token sets (concepts), exact re-scoring from the weights (scoring), the queries (search, show,
stats, layer rows in browse, similar), reading activation evidence back (evidence, bins) and ``Atlas``, the one
handle every reader outside this package takes (handle).

May import: core, sources, decode.
"""
