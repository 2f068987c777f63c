"""``Atlas``: the one handle on an opened atlas that every reader takes; its methods mirror the CLI's commands."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from neuronmap.atlas.concepts import Concept, expand_concept, read_vocab, vocab_index
from neuronmap.atlas.format import AtlasFiles, open_files
from neuronmap.atlas.search import NeuronReport, search, show
from neuronmap.atlas.stats import Stats, stats


@dataclass(frozen=True)
class Atlas:
    """An opened atlas; the Python API mirrors the CLI.

    Example:
        >>> a = Atlas.open("demo-atlas")  # doctest: +SKIP
        >>> a.search("coffee", top=5)[["id", "matrix", "pole", "prob"]]
        >>> a.show("L29N750")
        >>> a.stats().layers
    """

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: Path | str) -> "Atlas":
        """Open an atlas directory. Raises NeuronmapError if it is none or has an unknown version."""
        f = open_files(path)
        return cls(f.root, f.meta)

    @property
    def files(self) -> AtlasFiles:
        return AtlasFiles(self.path, self.meta)

    def variants(self, concept: str, variants: bool = True) -> Concept:
        """The single-token variants of a concept in this atlas's vocabulary."""
        return expand_concept(concept, vocab_index(read_vocab(self.files)), variants)

    def search(self, *concepts: str, matrices: str | None = None, layers: str | None = None, pole: str | None = None,
               top: int = 10, min_prob: float = 0.0, stored: bool = False, weights: str | None = None,
               variants: bool = True) -> pd.DataFrame:
        """``search`` as a DataFrame; ``.attrs`` holds ``method``, ``n_scored`` and the ``concepts``."""
        r = search(self.files, list(concepts), matrices, layers, pole, top, min_prob, stored, weights, variants)
        table = r.table.copy()
        table.attrs.update(method=r.method, n_scored=r.n_scored, concepts=[dataclasses.asdict(c) for c in r.concepts])
        return table

    def show(self, neuron: str, stored: bool = False, weights: str | None = None) -> NeuronReport:
        """``neuronmap.atlas.search.show``: every matrix and pole of one neuron (a ``NeuronReport``)."""
        return show(self.files, neuron, stored, weights)

    def stats(self, matrices: str | None = None, layers: str | None = None, pole: str | None = None) -> Stats:
        """``neuronmap.atlas.stats.stats``: per layer and matrix summaries (a ``Stats``)."""
        return stats(self.files, matrices, layers, pole)
