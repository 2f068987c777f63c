"""Token strings for every id, from a tokenizer.json or a GGUF's embedded vocabulary.

Each id is decoded on its own, keeping its leading space, so ``" dog"`` and
``"dog"`` stay different tokens. Byte-level BPE pieces (GPT-2, Llama 3, SmolLM)
map back through GPT-2's byte table; SentencePiece pieces (Llama 2, Gemma) turn
``▁`` into a space and ``<0xNN>`` into the byte. A piece that is part of a
multi-byte character shows its bytes as ``\\xNN``.
"""

from __future__ import annotations

import re

import json
from functools import lru_cache
from pathlib import Path

from neuronmap.core.errors import NeuronmapError


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _bytes_to_str(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def piece_to_string(piece: str, scheme: str) -> str:
    """Decode one vocabulary piece into the text it stands for.

    Args:
        piece: the raw piece, e.g. ``"Ġdog"`` or ``"▁dog"``.
        scheme: ``"bytelevel"`` or ``"sentencepiece"``.

    Example:
        >>> piece_to_string("Ġdog", "bytelevel"), piece_to_string("▁dog", "sentencepiece")
        (' dog', ' dog')
    """
    if scheme == "bytelevel":
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return _bytes_to_str(bytes(table[ch] for ch in piece))
        return piece  # special tokens such as <|im_start|> are stored as-is
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return _bytes_to_str(bytes([int(piece[3:5], 16)]))
        except ValueError:
            return piece
    return piece.replace("▁", " ")


def strings_from_pieces(pieces: list[str], scheme: str) -> list[str]:
    return [piece_to_string(p, scheme) for p in pieces]


def guess_scheme(pieces: list[str]) -> str:
    """``bytelevel`` if pieces look like GPT-2's byte alphabet, else ``sentencepiece``."""
    g = sum(p.startswith("Ġ") for p in pieces)
    s = sum(p.startswith("▁") for p in pieces)
    return "bytelevel" if g >= s else "sentencepiece"


def _tokenizer_error(path: Path, what: str) -> NeuronmapError:
    return NeuronmapError(f"{path} is not a valid tokenizer.json ({what}): re-download it, "
                          "or remove it to show tokens as <id>")


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_tokenizer_json(path: Path, limit: int | None = None) -> tuple[list[str], str]:
    """Pieces by id and scheme from a Hugging Face ``tokenizer.json``.

    Args:
        path: the file.
        limit: ids from ``limit`` on are dropped (the model's d_vocab: the head has no row for them).

    Returns:
        (pieces, scheme): ``pieces[i]`` is id i's raw piece; ids missing from the
        file get ``""``.

    Raises:
        NeuronmapError: not JSON, no ``model.vocab``, or a vocabulary entry that is no
            (string piece, non-negative integer id) pair.

    Example:
        >>> read_tokenizer_json(Path("ck/tokenizer.json"))[1]  # doctest: +SKIP
        'bytelevel'
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise NeuronmapError(f"cannot read {path}: {e.strerror or e}; check that it is readable") from e
    except (ValueError, RecursionError) as e:
        raise _tokenizer_error(path, f"not JSON: {str(e).splitlines()[0][:80]}") from e
    if not isinstance(data, dict):
        raise _tokenizer_error(path, f"it holds a JSON {type(data).__name__}, expected an object")
    model = data.get("model")
    raw = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(raw, list):  # Unigram: [[piece, score], ...]
        if not all(isinstance(e, list) and e and isinstance(e[0], str) for e in raw):
            raise _tokenizer_error(path, "model.vocab is a list whose entries are not [piece, score] pairs")
        vocab = {e[0]: i for i, e in enumerate(raw)}
    elif isinstance(raw, dict):
        vocab = dict(raw)
    else:
        what = "missing" if raw is None else f"a {type(raw).__name__}"
        raise _tokenizer_error(path, f"model.vocab is {what}, expected an object of piece: id")
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in added):
        raise _tokenizer_error(path, "added_tokens is not a list of objects with a string content and an integer id")
    vocab.update({t["content"]: t.get("id") for t in added})
    bad = next(((p, i) for p, i in vocab.items() if not _is_id(i)), None)
    if bad:
        raise _tokenizer_error(path, f"token {bad[0]!r} has id {bad[1]!r}, expected a non-negative integer")
    kept = {p: i for p, i in vocab.items() if limit is None or i < limit}
    pieces = [""] * (max(kept.values()) + 1 if kept else 0)
    for p, i in kept.items():
        pieces[i] = p
    dec = json.dumps(data.get("decoder")) + json.dumps(data.get("pre_tokenizer"))
    scheme = "bytelevel" if "ByteLevel" in dec else ("sentencepiece" if "▁" in dec or "Metaspace" in dec else guess_scheme(pieces))
    return pieces, scheme


# A content word for the summary: a whole word (leading space), not a function word.
WORD = re.compile(r"^ [A-Za-z][a-z]{3,}$")


STOPWORDS = frozenset(
    "about above after again also another because been before being below between both could does doing down during each "
    "even every first from further have having here herself himself however into itself just last like made make many more "
    "most much must myself never next only other ourselves over same should since some such than that their theirs them "
    "themselves then there these they this those through under until upon very well were what when where which while whom "
    "whose will with within without would your yours yourself left right around".split()
)
