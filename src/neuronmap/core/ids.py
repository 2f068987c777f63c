"""Names shared by every module: neuron ids ``L{layer}N{index}``, feature ids ``L{layer}F{index}``, matrices, poles,
layer ranges."""

from __future__ import annotations

import re

from neuronmap.core.errors import NeuronmapError

MATRICES = ("gate", "up", "down")
# An SAE or transcoder feature's two vectors: what it reads (encoder) and what it writes (decoder).
FEATURE_MATRICES = ("enc", "dec")
ALL_MATRICES = MATRICES + FEATURE_MATRICES
POLES = ("+", "-")
# ASCII digits only: Python's \d and int() also take Arabic-Indic or fullwidth digits, so "L٢٩N٧٥٠" would read as
# L29N750, an id the user never typed.
_NEURON = re.compile(r"L([0-9]+)([NF])([0-9]+)")
_LAYERS = re.compile(r"(-?[0-9]+)(?:-(-?[0-9]+))?")
# More digits than any model has layers or neurons; int() refuses beyond 4300 digits with a ValueError.
MAX_DIGITS = 9


def neuron_id(layer: int, neuron: int, letter: str = "N") -> str:
    """The id of a neuron, e.g. ``neuron_id(29, 808) == "L29N808"``, or of a feature (``letter="F"``: ``L29F808``)."""
    return f"L{layer}{letter}{neuron}"


def id_letter(meta: dict) -> str:
    """``F`` for an atlas of SAE features (its meta.json records ``sae``), ``N`` for one of neurons."""
    return "F" if meta.get("sae") else "N"


def shown(text: str, limit: int = 40) -> str:
    """``text`` as Python writes it, cut to ``limit`` characters: an error echoes what was typed, not 5,000 digits of it.

    Example:
        >>> shown("L" + "9" * 50 + "N0")
        "'L999999999999999999999999999999999999999…' (53 characters)"
    """
    return repr(text) if len(text) <= limit else f"{text[:limit] + '…'!r} ({len(text):,} characters)"


def format_ranges(xs: list[int]) -> str:
    """Integers as sorted ranges, the inverse of ``parse_layers``.

    Example:
        >>> format_ranges([9, 0, 1, 2, 5])
        '0-2,5,9'
    """
    out, xs, i = [], sorted(xs), 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def parse_neuron_id(text: str, n_layers: int | None = None, d_mlp: int | None = None,
                    letter: str | None = None) -> tuple[int, int]:
    """Parse ``L29N808`` (or the feature id ``L29F808``) into ``(29, 808)``, checking the range when the shape is given.

    Only ASCII digits are read, and at most ``MAX_DIGITS`` of them per number.

    Args:
        letter: ``N`` or ``F`` where the atlas is known (``id_letter(meta)``): the other kind of id is refused.

    Raises:
        NeuronmapError: malformed (non-ASCII digits included), of the other kind, or out of range.

    Example:
        >>> parse_neuron_id("L29N808")
        (29, 808)
    """
    m = _NEURON.fullmatch(text.strip())
    if not m:
        raise NeuronmapError(f"malformed neuron id {shown(text)}: expected L{{layer}}N{{index}} in ASCII digits, e.g. L29N808")
    for what, digits in (("layer", m.group(1)), ("index", m.group(3))):
        if len(digits) > MAX_DIGITS:
            raise NeuronmapError(f"neuron {shown(text)}: {what} has {len(digits)} digits and is out of range: expected at "
                                 f"most {MAX_DIGITS}, e.g. L29N808")
    if letter is not None and m.group(2) != letter:
        kinds = {"N": "neurons (ids L{layer}N{index})", "F": "SAE features (ids L{layer}F{index})"}
        raise NeuronmapError(f"{text.strip()} is a {'feature' if m.group(2) == 'F' else 'neuron'} id but this atlas "
                             f"holds {kinds[letter]}: write L{m.group(1)}{letter}{m.group(3)}")
    layer, neuron = int(m.group(1)), int(m.group(3))
    if n_layers is not None and layer >= n_layers:
        raise NeuronmapError(f"neuron {text}: layer {layer} is out of range, the model has layers 0-{n_layers - 1}")
    if d_mlp is not None and neuron >= d_mlp:
        what = "feature" if m.group(2) == "F" else "neuron"
        raise NeuronmapError(f"{what} {text}: index {neuron} is out of range, each layer has {what}s 0-{d_mlp - 1}")
    return layer, neuron


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """Parse ``"0-5,9"`` into ``[0, 1, 2, 3, 4, 5, 9]``; None means every layer.

    Negative indices count from the end (``-1`` is the last layer).

    Raises:
        NeuronmapError: malformed, or a layer outside ``0..n_layers-1``.
    """
    if n_layers < 1:
        raise NeuronmapError(f"the model has {n_layers} layers: there is nothing to choose with layers=...")
    if text is None or text.strip() in ("", "all"):
        return list(range(n_layers))
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = _LAYERS.fullmatch(part)
        if not m:
            raise NeuronmapError(f"malformed layers={shown(text)}: expected a list of layers and ranges in ASCII digits, "
                                 "e.g. 0-5,9")
        if any(g is not None and len(g.lstrip("-")) > MAX_DIGITS for g in m.groups()):
            raise NeuronmapError(f"layers={shown(text)} is out of range: the model has {n_layers} layers, 0-{n_layers - 1}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        lo, hi = (lo + n_layers if lo < 0 else lo), (hi + n_layers if hi < 0 else hi)
        if lo > hi:
            raise NeuronmapError(f"layers={text!r}: the range {part} is reversed; write it low-high, e.g. {m.group(2)}-{m.group(1)}")
        if not (0 <= lo <= hi < n_layers):
            raise NeuronmapError(
                f"layers={text!r} is out of range: the model has {n_layers} layers, 0-{n_layers - 1}"
            )
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_matrices(text: str | None, available: tuple[str, ...]) -> list[str]:
    """Parse ``"gate,up"`` (or ``"enc,dec"`` for features); None means every matrix ``available``.

    Raises:
        NeuronmapError: an unknown matrix, or one this family lacks (``gate`` on GPT-2, ``up`` on features).
    """
    if text is None or text.strip() in ("", "all"):
        return list(available)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise NeuronmapError(f"matrices={text!r} names no matrix: expected some of {', '.join(available)}, "
                             f"e.g. {available[-1]}")
    for n in names:
        if n not in ALL_MATRICES:
            raise NeuronmapError(f"unknown matrix {n!r}: expected some of {', '.join(available)}")
        if n not in available:
            why = ("features have enc and dec" if available == FEATURE_MATRICES else
                   "neurons have gate, up, down" if n in FEATURE_MATRICES else "its MLP is not gated")
            raise NeuronmapError(f"this {'atlas' if available == FEATURE_MATRICES else 'model'} has no {n!r} matrix "
                                 f"({why}): use {','.join(available)}")
    return [m for m in available if m in names]


def parse_poles(text: str | None) -> list[str]:
    """Parse ``"+"``, ``"-"`` or ``"both"`` (None) into a list of poles."""
    if text is None or text in ("both", "+-", "all"):
        return list(POLES)
    if text not in POLES:
        raise NeuronmapError(f"unknown pole {text!r}: expected +, - or both")
    return [text]
