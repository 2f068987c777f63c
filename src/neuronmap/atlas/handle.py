"""``Atlas``: the one handle on an opened atlas that every reader takes; its methods mirror the CLI's commands.

Each method calls the function of the same command with the same parameters (``tests/test_atlas.py`` checks the
signatures), so ``Atlas.open("demo-atlas").search(["coffee"], top=5)`` is ``neuronmap search demo-atlas coffee
--top 5`` and returns the object whose ``to_dict()`` that command's ``--json`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neuronmap.atlas.browse import PAGE, LayerRows, layer_rows
from neuronmap.atlas.concepts import Concept, expand_concept, read_vocab, vocab_index
from neuronmap.atlas.evidence import NeuronEvidence, neuron_evidence
from neuronmap.atlas.format import AtlasFiles, open_files
from neuronmap.atlas.search import MIN_PROB, TOP, NeuronReport, SearchResult, search, show
from neuronmap.atlas.similar import TOP as SIMILAR_TOP
from neuronmap.atlas.similar import SimilarResult, similar
from neuronmap.atlas.stats import Stats, stats


@dataclass(frozen=True)
class Atlas(AtlasFiles):
    """An opened, checked atlas: its directory (``root``), its meta.json (``meta``) and one method per command.

    Example:
        >>> a = Atlas.open("demo-atlas")  # doctest: +SKIP
        >>> a.search(["coffee"], top=5).table[["id", "matrix", "pole", "prob"]]
        >>> a.show("L29N750").rows
        >>> a.stats().layers
    """

    @classmethod
    def open(cls, path: Path | str) -> Atlas:
        """Open an atlas directory: meta.json, the footers and sha256 of its data files are checked.

        Raises:
            NeuronmapError: not an atlas, an unknown version, or a damaged file (named, with its fix).
        """
        f = open_files(path)
        return cls(f.root, f.meta)

    @property
    def path(self) -> Path:
        """The atlas directory (``root``)."""
        return self.root

    def variants(self, concept: str, variants: bool = True) -> Concept:
        """The single-token variants of a concept in this atlas's vocabulary."""
        return expand_concept(concept, vocab_index(read_vocab(self)), variants)

    def search(self, concepts: list[str], matrices: str | None = None, layers: str | None = None,
               pole: str | None = None, top: int = TOP, min_prob: float = MIN_PROB, stored: bool = False,
               weights: str | None = None, variants: bool = True, sort: str = "prob") -> SearchResult:
        """``neuronmap search``: rows ranked by the probability they put on each concept (``atlas.search.search``)."""
        return search(self, concepts, matrices, layers, pole, top, min_prob, stored, weights, variants, sort)

    def show(self, neuron: str, stored: bool = False, weights: str | None = None, examples: int = 5) -> NeuronReport:
        """``neuronmap show``: every matrix and pole of one neuron (``atlas.search.show``)."""
        return show(self, neuron, stored, weights, examples)

    def stats(self, matrices: str | None = None, layers: str | None = None, pole: str | None = None,
              n_top: int = 20) -> Stats:
        """``neuronmap stats``: per layer and matrix summaries (``atlas.stats.stats``)."""
        return stats(self, matrices, layers, pole, n_top)

    def layer(self, layer: int, matrix: str | None = None, pole: str | None = None, sort: str = "confidence",
              descending: bool | None = None, token_class: str | None = None, offset: int = 0,
              limit: int = PAGE) -> LayerRows:
        """``neuronmap layer``: one layer's rows, sorted and filtered (``atlas.browse.layer_rows``)."""
        return layer_rows(self, layer, matrix, pole, sort, descending, token_class, offset, limit)

    def similar(self, neuron: str, matrices: str | None = None, top: int = SIMILAR_TOP,
                weights: str | None = None) -> SimilarResult:
        """``neuronmap similar``: the vectors most aligned with one neuron's (``atlas.similar.similar``)."""
        return similar(self, neuron, matrices, top, weights)

    def examples(self, neuron: str, examples: int | None = None) -> NeuronEvidence:
        """``neuronmap examples``: what one neuron fires on in text (``atlas.evidence.neuron_evidence``)."""
        return neuron_evidence(self, neuron, examples)


# Which function each method mirrors, for the signature test and the docs.
MIRRORS = {"search": search, "show": show, "stats": stats, "layer": layer_rows, "similar": similar,
           "examples": neuron_evidence}
