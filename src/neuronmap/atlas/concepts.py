"""A concept as the tokens that stand for it: case and plural variants, with and without a leading space.

A concept's probability under a decoded distribution is the sum over its variants
that are single tokens. A concept that is no single token in any variant is
matched, approximately, by its first content token (never a whitespace-only one).
The vocabulary is an atlas's (``read_vocab``) or a loaded tokenizer's
(``tokenizer_strings``): the same strings for the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from neuronmap.atlas.format import AtlasFiles
from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.vocab import guess_scheme, strings_from_pieces


@dataclass(frozen=True)
class Concept:
    """A concept and the single tokens that stand for it.

    Attributes:
        text: as the user typed it.
        token_ids, tokens: the variants that are single tokens, in the order tried.
        missing: the variants tried that are no single token.
        approximate: no variant is a single token, so ``tokens`` are the first
            content tokens (longest vocabulary prefix that is not only whitespace)
            of the concept with and without a leading space, which stand for more
            than the concept.
    """

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    missing: tuple[str, ...]
    approximate: bool

    def to_dict(self) -> dict:
        """JSON types only: ``{"concept", "tokens": [{"id", "token"}], "missing", "approximate"}``."""
        return {"concept": self.text, "tokens": [{"id": int(i), "token": t} for i, t in zip(self.token_ids, self.tokens)],
                "missing": list(self.missing), "approximate": self.approximate}


def read_vocab(files: AtlasFiles) -> list[str]:
    """Every token id's string (leading space kept), from the atlas's vocab.parquet. ``[d_vocab]``."""
    if not files.vocab.is_file():
        raise NeuronmapError(f"{files.root} has no vocab.parquet: re-create the atlas with `neuronmap map`")
    t = pq.read_table(files.vocab, columns=["token_id", "token"]).sort_by("token_id")
    return t.column("token").to_pylist()


def tokenizer_strings(tokenizer) -> list[str]:
    """Every token id's string from a loaded transformers tokenizer, as an atlas of its model stores them. ``[d_vocab]``.

    Example:
        >>> tokenizer_strings(load_model(None).tokenizer)[2767]  # doctest: +SKIP
        ' dog'
    """
    pieces = [p or "" for p in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    return strings_from_pieces(pieces, guess_scheme(pieces))


def vocab_index(tokens: list[str]) -> dict[str, int]:
    """String -> id; where two ids decode to the same string, the lower id wins."""
    index: dict[str, int] = {}
    for i, s in enumerate(tokens):
        index.setdefault(s, i)
    return index


def _plurals(word: str) -> list[str]:
    low = word.lower()
    s, es, ies = ("S", "ES", "IES") if word.isupper() and len(word) > 1 else ("s", "es", "ies")
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return [word + es]
    if len(low) > 1 and low.endswith("y") and low[-2] not in "aeiou":
        return [word[:-1] + ies, word + s]
    return [word + s]


def variant_strings(text: str) -> list[str]:
    """The strings tried for a concept: case forms, a simple plural, each with and without a leading space.

    Cases: as typed, lower, Title (first letter), UPPER. Plural: ``+es`` after
    s/x/z/ch/sh, ``y -> ies`` after a consonant, else ``+s``.

    Example:
        >>> variant_strings("coffee")[:4]
        [' coffee', 'coffee', ' coffees', 'coffees']
    """
    word = text.strip()
    low = word.lower()
    cases = dict.fromkeys([word, low, low[:1].upper() + low[1:], word.upper()])
    out: dict[str, None] = {}
    for case in cases:
        for form in [case, *_plurals(case)]:
            out.update(dict.fromkeys([" " + form, form]))
    return list(out)


def _first_token(s: str, index: dict[str, int]) -> str | None:
    """The longest prefix of ``s`` that is a token, if it has content: what BPE most often, not always, makes the first token.

    A whitespace-only first token (``' '`` before an emoji the vocabulary splits into
    bytes) says nothing about the concept, so it gives None.
    """
    for n in range(len(s), 0, -1):
        if s[:n] in index:
            return s[:n] if s[:n].strip() else None
    return None


def expand_concept(text: str, index: dict[str, int], variants: bool = True) -> Concept:
    """A concept's single-token variants in a vocabulary.

    Args:
        text: what the user typed, e.g. ``"coffee"`` or ``" coffee"``.
        index: from ``vocab_index``.
        variants: False uses ``text`` exactly as typed, leading space included.

    Raises:
        NeuronmapError: an empty concept, or one that starts with no content token (e.g. an
            emoji the vocabulary splits into byte pieces).

    Example:
        >>> c = expand_concept("coffee", vocab_index(read_vocab(files)))  # doctest: +SKIP
        >>> c.tokens  # the demo model: no 'coffee', 'coffees' or 'COFFEE' token
        (' coffee', ' Coffee')
    """
    if not text.strip():
        raise NeuronmapError(f"empty concept {text!r}: give a word or token, e.g. coffee")
    tried = variant_strings(text) if variants else [text]
    found = {index[s]: s for s in tried if s in index}
    approximate = not found
    if approximate:
        for s in ([" " + text.strip(), text.strip()] if variants else [text]):
            first = _first_token(s, index)
            if first is not None:
                found.setdefault(index[first], first)
    if not found:
        raise NeuronmapError(f"concept {text!r} matches no token of this vocabulary: no variant is a single token and it starts "
                             "with no token but whitespace (emoji and other characters split into bytes cannot be matched): "
                             "try a word or another spelling")
    return Concept(text, tuple(found), tuple(found.values()), tuple(s for s in tried if s not in index), approximate)
