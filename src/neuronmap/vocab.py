"""Token strings for every id, from a tokenizer.json or a GGUF's embedded vocabulary.

Each id is decoded on its own, keeping its leading space, so ``" dog"`` and
``"dog"`` stay different tokens. Byte-level BPE pieces (GPT-2, Llama 3, SmolLM)
map back through GPT-2's byte table; SentencePiece pieces (Llama 2, Gemma) turn
``▁`` into a space and ``<0xNN>`` into the byte. A piece that is part of a
multi-byte character shows its bytes as ``\\xNN``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


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


def read_tokenizer_json(path: Path) -> tuple[list[str], str]:
    """Pieces by id and scheme from a Hugging Face ``tokenizer.json``.

    Returns:
        (pieces, scheme): ``pieces[i]`` is id i's raw piece; ids missing from the
        file get ``""``.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(data.get("model", {}).get("vocab", {}) or {})
    if isinstance(data.get("model", {}).get("vocab"), list):  # Unigram: [[piece, score], ...]
        vocab = {p: i for i, (p, _s) in enumerate(data["model"]["vocab"])}
    for tok in data.get("added_tokens", []) or []:
        vocab[tok["content"]] = tok["id"]
    size = max(vocab.values()) + 1 if vocab else 0
    pieces = [""] * size
    for p, i in vocab.items():
        pieces[i] = p
    dec = json.dumps(data.get("decoder")) + json.dumps(data.get("pre_tokenizer"))
    scheme = "bytelevel" if "ByteLevel" in dec else ("sentencepiece" if "▁" in dec or "Metaspace" in dec else guess_scheme(pieces))
    return pieces, scheme
