"""``compare``: what a fine-tune (or any change) kept and what it changed, neuron by neuron.

Two levels:

* **neuron** (same ``n_layers d_model d_mlp d_vocab`` and the same token strings): the
  atlases are joined on (matrix, layer, pole, neuron). Per layer, matrix and pole:
  the share of vectors whose top-1 token is the same, the mean top-k overlap
  ``|A ∩ B| / k``, and the mean Jensen-Shannon divergence (bits, 0 to 1) of the two
  decoded distributions. Each side's distribution is its own top-k tokens plus one
  ``rest`` bucket holding ``1 - sum(top-k probs)``; a token in the other side's
  top-k but not in this side's gets 0 here, its mass (at most this side's k-th
  prob) being in ``rest``. The buckets sum to 1 on both sides, identical rows give
  exactly 0, and disjoint confident rows give close to 1.
* **concept** (any two models): a concept is a decoded top-1 token string,
  normalised by ``strip().lower()`` (empty strings dropped), that is some vector's
  *confident* top token (``p > min_prob``). Reported: the overlap of the two
  concept sets (Jaccard and per-side coverage) and, per concept, how many vectors
  carry it in each model and at what relative depth ``layer / (n_layers - 1)``.

A and B are atlases or model sources; a source is mapped once into
``cache_dir()/atlases/<key>``, the key hashing the weight files' sha256 and the
map options, so the second compare of the same pair starts at once.

Stage 9, compare: two atlases (or a series of them, trajectory) side by side.
May import: every stage below (core .. removal).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

from neuronmap.compare.concepts import ConceptComparison, compare_concepts, confident_concepts, normalise
from neuronmap.compare.neurons import NeuronComparison, Rows, compare_neurons, load_rows, row_stats
from neuronmap.compare.plotting import plot
from neuronmap.compare.sides import (
    DECODE_KEYS, SHAPE_KEYS, Side, atlas_key, decode_differences, resolve_atlas, select_rows, shape_differences,
    side_vocab, vocab_hash,
)
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import format_ranges
from neuronmap.mapping.part import MapOptions

__all__ = ["Comparison", "ConceptComparison", "DECODE_KEYS", "LEVELS", "NeuronComparison", "Rows", "MIN_PROB", "SHAPE_KEYS", "Side", "TOP",
           "atlas_key", "compare", "compare_concepts", "compare_neurons", "confident_concepts", "decode_differences",
           "load_rows", "normalise", "plot", "resolve_atlas", "row_stats", "select_rows", "shape_differences",
           "side_vocab", "vocab_hash"]

LEVELS = ("auto", "neuron", "concept")
TOP = 15  # rows listed per ranking; the CLI's --top default reads it
MIN_PROB = 0.5  # a top-1 prob above this is confident; the CLI's --min-prob default reads it


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` found.

    Attributes:
        a, b: the two sides.
        level: ``neuron`` or ``concept``.
        reason: why this level (e.g. the shape differences that forced the concept level).
        warnings: one line each, e.g. decode options that differ.
        matrices: the matrices compared.
        seconds: wall time of the comparison itself, after any mapping.
        neuron: the neuron-level result, or None at the concept level.
        concept: the concept-level result, or None at the neuron level.
    """

    a: Side
    b: Side
    level: str
    reason: str
    warnings: list[str]
    matrices: list[str]
    seconds: float
    neuron: NeuronComparison | None = None
    concept: ConceptComparison | None = None

    def to_dict(self) -> dict:
        """JSON types only: the form ``compare --json`` prints."""
        out = {"a": self.a.to_dict(), "b": self.b.to_dict(), "level": self.level, "reason": self.reason,
               "warnings": list(self.warnings), "matrices": list(self.matrices), "seconds": round(self.seconds, 3)}
        if self.neuron is not None:
            out["neuron"] = self.neuron.to_dict()
        if self.concept is not None:
            out["concept"] = self.concept.to_dict()
        return out


def compare(
    a: str, b: str, level: str = "auto", matrices: str | None = None, layers: str | None = None,
    min_prob: float = MIN_PROB, top: int = TOP, options: MapOptions = MapOptions(),
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Compare two models' neuron maps.

    Args:
        a, b: atlas directories or model sources (mapped once into the cache).
        level: ``auto`` (neuron when shapes and tokenizers match, else concept), ``neuron`` or ``concept``.
        matrices: comma list of gate,up,down (default: those both atlases hold).
        layers: layers and ranges, parsed against each model's own layer count (default: all mapped).
        min_prob: a top-1 prob above this is confident.
        top: how many rows to list in each ranking (0: all).
        options: how to map a model source (its matrices and layers default to ``matrices`` and ``layers``).
        progress: called with one-line notes (mapping a source).

    Returns:
        Comparison.

    Raises:
        NeuronmapError: unknown paths; ``level="neuron"`` on atlases of different shapes or
            tokenizers; matrices or layers absent from an atlas; a bad ``min_prob`` or ``level``.

    Example:
        >>> c = compare("base-atlas", "tuned-atlas")  # doctest: +SKIP
        >>> c.neuron.overall[-1]["same_top1"]
        0.87
    """
    if level not in LEVELS:
        raise NeuronmapError(f"unknown level={level!r}: expected auto, neuron or concept")
    if not 0.0 <= min_prob < 1.0:
        raise NeuronmapError(f"min_prob={min_prob} is out of range: expected 0 <= p < 1")
    options = replace(options, matrices=options.matrices or matrices, layers=options.layers or layers)
    sa, sb = resolve_atlas(a, options, progress), resolve_atlas(b, options, progress)
    t0 = time.perf_counter()
    warnings = []
    dec = decode_differences(sa.meta, sb.meta)
    if dec:
        warnings.append(f"decode options differ between A and B: {'; '.join(dec)} (A vs B); comparing anyway"
                        + (f", top-k overlap over the first {min(sa.meta['decode']['top_k'], sb.meta['decode']['top_k'])} tokens"
                           if any(d.startswith("top_k") for d in dec) else ""))
    diffs = shape_differences(sa.meta, sb.meta, vocab_hash(side_vocab(sa)) == vocab_hash(side_vocab(sb))
                              if sa.meta.get("d_vocab") == sb.meta.get("d_vocab") else False)
    if level == "neuron" and diffs:
        raise NeuronmapError(
            f"cannot compare neuron by neuron: A ({sa.spec}) and B ({sb.spec}) differ in {', '.join(diffs)}; "
            "use level=concept to compare them by decoded token strings"
        )
    use = "concept" if level == "concept" or diffs else "neuron"
    reason = ("asked for with --level concept" if level == "concept" else
              f"A and B differ in {', '.join(diffs)}, so neurons cannot be paired" if diffs else
              "same shapes and token strings")
    sel_a, sel_b = select_rows(sa, "A", matrices, layers), select_rows(sb, "B", matrices, layers)
    common = [m for m in sel_a[0] if m in sel_b[0]]
    if not common:
        raise NeuronmapError(f"A and B share no matrix: A holds {','.join(sel_a[0])}, B holds {','.join(sel_b[0])}; re-map one of them with matrices=...")
    if use == "neuron":
        lay = sorted(set(sel_a[1]) & set(sel_b[1]))
        if not lay:
            raise NeuronmapError(f"A and B share no layer: A holds {format_ranges(sel_a[1])}, B holds {format_ranges(sel_b[1])}; re-map one of them with layers=...")
        res = compare_neurons(sa, sb, common, lay, min_prob, top)
        return Comparison(sa, sb, use, reason, warnings, common, time.perf_counter() - t0, neuron=res)
    res = compare_concepts(sa, sb, (common, sel_a[1]), (common, sel_b[1]), min_prob, top)
    return Comparison(sa, sb, use, reason, warnings, common, time.perf_counter() - t0, concept=res)
