"""Browsing an atlas: the rows of one layer and matrix (sorted, filtered by token class, paged) and its best words.

What the viewer's layer page and atlas page show, and ``neuronmap layer`` prints.
Every number is read from the atlas (no weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neuronmap.atlas.store import choose_rows, connect
from neuronmap.atlas.concepts import read_vocab
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import id_letter
from neuronmap.sources.vocab import STOPWORDS, WORD
from neuronmap.atlas.search import records
from neuronmap.atlas.stats import TOKEN_CLASSES, vocab_classes

if TYPE_CHECKING:  # the handle calls these functions; they only name its type
    from neuronmap.atlas.handle import Atlas

SORTS = ("confidence", "entropy", "norm", "neuron")
_COLUMN = {"confidence": "top_prob", "entropy": "entropy", "norm": "weight_norm", "neuron": "neuron"}
# The natural order of each key: most confident, most certain (lowest entropy), largest, first.
_DESCENDING = {"confidence": True, "entropy": False, "norm": True, "neuron": False}
PAGE = 50
MAX_PAGE = 1000
WORDS = 12  # confident words listed on the atlas page
WORD_MIN_PROB = 0.3  # as the map's summary of confident content words


@dataclass(frozen=True)
class LayerRows:
    """One page of a layer's rows for one matrix.

    Attributes:
        atlas: the atlas directory.
        layer, matrix: which rows.
        pole: ``+``, ``-`` or None for both.
        sort: one of ``SORTS``; ``descending``: its order.
        token_class: only rows whose top-1 token is of this class (``stats.TOKEN_CLASSES``), or None.
        offset, limit: the page.
        n_matching: rows that pass the filters (all pages).
        rows: ``id layer neuron matrix pole top_token top_prob token_class entropy weight_norm tokens probs``
            (``tokens``/``probs``: the stored top 5).
    """

    atlas: Path
    layer: int
    matrix: str
    pole: str | None
    sort: str
    descending: bool
    token_class: str | None
    offset: int
    limit: int
    n_matching: int
    rows: pd.DataFrame

    def to_dict(self) -> dict:
        """The serialized form (``layer --json``, the viewer's API), JSON types only.

        Example:
            >>> layer_rows(open_files("demo-atlas"), 29, "up", limit=1).to_dict()["rows"][0]["id"]  # doctest: +SKIP
            'L29N1354'
        """
        return {"atlas": str(self.atlas), "layer": self.layer, "matrix": self.matrix, "pole": self.pole,
                "sort": self.sort, "descending": self.descending, "token_class": self.token_class,
                "offset": self.offset, "limit": self.limit, "n_matching": self.n_matching, "rows": records(self.rows)}


def layer_rows(atlas: Atlas, layer: int, matrix: str | None = None, pole: str | None = None, sort: str = "confidence",
               descending: bool | None = None, token_class: str | None = None, offset: int = 0,
               limit: int = PAGE) -> LayerRows:
    """The rows of one layer and matrix, sorted and filtered, one page of them.

    Args:
        files: the atlas.
        layer, matrix: which rows (the atlas must hold them); matrix None: ``up`` (a feature atlas: ``dec``).
        pole: ``+``, ``-``, or None / ``both``.
        sort: ``confidence`` (top-1 p), ``entropy``, ``norm`` (weight norm) or ``neuron`` (index).
        descending: the order; None takes the key's natural one (confidence and norm high first,
            entropy low first, neuron in index order). Ties go by neuron, then pole.
        token_class: keep rows whose top-1 token is of this class.
        offset, limit: the page.

    Returns:
        LayerRows.

    Raises:
        NeuronmapError: a layer, matrix, pole, sort, class or page out of range.

    Example:
        >>> layer_rows(open_files("demo-atlas"), 29, "up", token_class="word", limit=3).rows["top_token"].tolist()  # doctest: +SKIP
    """
    if sort not in SORTS:
        raise NeuronmapError(f"unknown sort {sort!r}: expected one of {', '.join(SORTS)}")
    if token_class is not None and token_class not in TOKEN_CLASSES:
        raise NeuronmapError(f"unknown token class {token_class!r}: expected one of {', '.join(TOKEN_CLASSES)}")
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise NeuronmapError(f"page offset {offset} and limit {limit} out of range: expected offset >= 0 and 1 <= limit <= {MAX_PAGE}")
    matrix = matrix or ("dec" if id_letter(atlas.meta) == "F" else "up")
    (mat,), (lay,), poles = choose_rows(atlas.meta, matrix, str(layer), pole)
    descending = _DESCENDING[sort] if descending is None else descending
    df = connect().execute(
        "SELECT id, layer, neuron, matrix, pole, token_ids[1] AS top_id, tokens[1] AS top_token, probs[1] AS top_prob, "
        "entropy, weight_norm, tokens[1:5] AS tokens, probs[1:5] AS probs FROM read_parquet(?) "
        "WHERE layer = ? AND matrix = ? AND list_contains(?, pole)", [str(atlas.neurons), lay, mat, poles]).df()
    cls = vocab_classes(atlas)[df.pop("top_id").to_numpy()]
    df.insert(7, "token_class", np.array(TOKEN_CLASSES)[cls])
    if token_class is not None:
        df = df[cls == TOKEN_CLASSES.index(token_class)]
    key = df[_COLUMN[sort]].to_numpy(np.float64)
    # lexsort: the last key is primary; nan (a vector that held nan) sorts last either way.
    primary = np.where(np.isnan(key), np.inf, -key if descending else key)
    order = np.lexsort((df["pole"].to_numpy() == "-", df["neuron"].to_numpy(), primary))
    page = df.iloc[order[offset: offset + limit]].reset_index(drop=True)
    return LayerRows(atlas.root, lay, mat, None if len(poles) == 2 else poles[0], sort, descending, token_class,
                     offset, limit, len(df), page)


def confident_words(atlas: Atlas, n: int = WORDS, min_prob: float = WORD_MIN_PROB) -> pd.DataFrame:
    """The most confident row per content word (a whole word, not a function word), best first.

    The atlas-wide version of the summary ``map`` prints.

    Returns:
        At most ``n`` rows: ``id layer neuron matrix pole token prob``.
    """
    tokens = read_vocab(atlas)
    words = [i for i, t in enumerate(tokens) if WORD.match(t) and t.strip().lower() not in STOPWORDS]
    con = connect()
    con.register("words", pd.DataFrame({"token_id": np.array(words, np.int32)}))
    df = con.execute(
        "SELECT id, layer, neuron, matrix, pole, token_ids[1] AS token_id, probs[1]::DOUBLE AS prob "
        "FROM read_parquet(?) WHERE probs[1] >= ? AND token_ids[1] IN (SELECT token_id FROM words) "
        "ORDER BY prob DESC, layer, neuron, matrix, pole", [str(atlas.neurons), float(min_prob)]).df()
    df.insert(6, "token", pd.Series([tokens[i] for i in df.pop("token_id")], dtype=object))
    return df[~df["token"].str.strip().str.lower().duplicated()].head(n).reset_index(drop=True)
