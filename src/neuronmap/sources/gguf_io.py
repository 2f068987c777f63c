"""Open a GGUF file: its metadata checked, its tensors dequantized one at a time and named as in Hugging Face.

llama.cpp names tensors its own way (``blk.{i}.ffn_up.weight``); the reader
translates the HF names ``Weights`` asks for, so the rest of neuronmap works in
one naming. Metadata that is missing or of the wrong type (block_count, the
epsilon, the vocabulary) gives one line naming the key, what it holds and what
was expected.
"""

from __future__ import annotations

from typing import Callable



import numpy as np
import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.families import GGUF_NAMES, family_for_gguf_arch
from neuronmap.sources.vocab import guess_scheme, strings_from_pieces
from neuronmap.sources.weights import FLOATS_EXPECTED, Source, Weights, as_int, as_number, first_line, pad_tokens


FIX = "the GGUF file is corrupt or incomplete; re-download or re-convert it"


def _field(reader, path, key: str):
    """A metadata value, or None where absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception as e:  # the gguf package's own decoding of a corrupt field (bad UTF-8, short array)
        raise NeuronmapError(f"{path} has an unreadable metadata field {key} ({type(e).__name__}): {FIX}") from e


def _vocab(reader, path) -> tuple[list[str], object]:
    pieces = _field(reader, path, "tokenizer.ggml.tokens")
    if pieces is None:
        pieces = []
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        raise NeuronmapError(f"{path} has tokenizer.ggml.tokens of type {type(pieces).__name__}: "
                             f"expected a list of strings; {FIX}")
    model = _field(reader, path, "tokenizer.ggml.model")
    if model is not None and not isinstance(model, str):
        raise NeuronmapError(f"{path} has tokenizer.ggml.model {model!r}: expected a string such as gpt2 or llama; {FIX}")
    return pieces, model


def _dims(path, name: str, t) -> tuple[int, int]:
    """A matrix's GGUF shape ``[in, out]``."""
    shape = [int(x) for x in t.shape]
    if len(shape) != 2 or 0 in shape:
        raise NeuronmapError(f"tensor {name} in {path} has shape {shape}: expected a matrix of two non-zero dimensions; {FIX}")
    return shape[0], shape[1]


def tensor_reader(tensors: dict, path, fam) -> Callable[[str], torch.Tensor]:
    """A reader of GGUF tensors by llama.cpp name: dequantized to fp32, Gemma's ``1 + w`` norm gains back to HF's ``w``.

    Integer tensors come back as stored, for ``Weights`` to refuse by name.
    """
    import gguf

    ints = {gguf.GGMLQuantizationType[n] for n in ("I8", "I16", "I32", "I64")}

    def read(name: str) -> torch.Tensor:
        if name not in tensors:
            raise NeuronmapError(f"tensor {name} is missing from {path}: the GGUF file is incomplete")
        t = tensors[name]
        if t.tensor_type in ints:  # handed back as stored, for Weights to refuse by name
            return torch.from_numpy(np.array(t.data, copy=True))
        try:
            f64 = t.tensor_type == gguf.GGMLQuantizationType.F64  # stored plain, but dequantize() lacks it
            arr = t.data if f64 else gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise NeuronmapError(f"tensor {name} in {path} has GGUF type {t.tensor_type.name}, which neuronmap cannot "
                                 f"dequantize yet: expected {FLOATS_EXPECTED}") from e
        except Exception as e:  # the gguf package on a block of the wrong size
            raise NeuronmapError(f"cannot dequantize tensor {name} in {path} ({type(e).__name__}): {FIX}") from e
        out = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        # llama.cpp stores Gemma's norm gains as 1 + w; the adapters use HF's w.
        if fam.norm == "rms_1p" and name.endswith("norm.weight"):
            out = out - 1.0
        return out

    return read


def hf_to_gguf_names(fam, n_layers: int) -> dict[str, str]:
    """HF tensor names -> llama.cpp's for one family, so ``Weights`` works in one naming."""
    out: dict[str, str] = {}
    for i in range(n_layers):
        for role in ("gate", "up", "down", "mlp_norm"):
            tmpl = getattr(fam, role)
            if tmpl:
                out[tmpl.format(i=i)] = GGUF_NAMES[role].format(i=i)
    for suffix in (".weight", ".bias"):
        out[fam.final_norm + suffix] = GGUF_NAMES["final_norm"] + suffix
    out[fam.head] = GGUF_NAMES["head"]
    out[fam.embed] = GGUF_NAMES["embed"]
    return out


def open_gguf(src: Source) -> Weights:
    """Open a GGUF file's weights for lazy reading (see ``neuronmap.sources.resolve.open_weights``).

    Raises:
        NeuronmapError: the file is truncated or corrupt, its metadata lacks or misstates
            block_count, the epsilon or the vocabulary, or it has no LM head nor embedding.
    """
    from neuronmap.sources.gguf_fast import GGUFReader

    path = src.path
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf package raises many kinds on a corrupt file
        raise NeuronmapError(
            f"cannot read GGUF file {path}: it is truncated or corrupt ({type(e).__name__}: {first_line(e)}); re-download it"
        ) from e
    arch = _field(reader, path, "general.architecture")
    fam = family_for_gguf_arch(arch)
    tensors = {t.name: t for t in reader.tensors}
    read = tensor_reader(tensors, path, fam)

    key = f"{arch}.block_count"
    n_layers = as_int(_field(reader, path, key), path, key, FIX)
    last_up = GGUF_NAMES["up"].format(i=n_layers - 1)
    if last_up not in tensors:  # before naming every layer's tensors: a corrupt count may be huge
        raise NeuronmapError(f"{path} says {key} is {n_layers}, but has no tensor {last_up}: {FIX}")
    hf_to_gguf = hf_to_gguf_names(fam, n_layers)

    def gname(name: str) -> str:
        return hf_to_gguf.get(name, name)

    up_name = GGUF_NAMES["up"].format(i=0)
    if up_name not in tensors:
        raise NeuronmapError(f"{path} has no tensor {up_name}: {FIX}")
    d_model, up_rows = _dims(path, up_name, tensors[up_name])  # GGUF shapes are [in, out]
    d_mlp = up_rows // 2 if fam.fused_gate_up else up_rows
    head_name = GGUF_NAMES["head"] if GGUF_NAMES["head"] in tensors else GGUF_NAMES["embed"]
    if head_name not in tensors:
        raise NeuronmapError(f"{path} has neither {GGUF_NAMES['head']} nor {GGUF_NAMES['embed']}: expected the LM head "
                             f"or the token embedding; {FIX}")
    d_vocab = _dims(path, head_name, tensors[head_name])[1]
    eps_key = next((k for k in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon")
                    if _field(reader, path, k)), None)
    eps = as_number(_field(reader, path, eps_key), path, eps_key, FIX) if eps_key else fam.default_eps
    cap_key = f"{arch}.final_logit_softcapping"
    softcap = as_number(_field(reader, path, cap_key), path, cap_key, FIX) if fam.softcap_key else None
    pieces, model = _vocab(reader, path)
    scheme = {"gpt2": "bytelevel", "llama": "sentencepiece"}.get(model) or guess_scheme(pieces)
    tokens = pad_tokens(strings_from_pieces(pieces, scheme), d_vocab)
    return Weights(src, fam, n_layers, d_model, d_mlp, d_vocab, eps, softcap or None, tokens, f"gguf:{model} ({scheme})",
                   lambda n: read(gname(n)), lambda n: gname(n) in tensors, {"gguf_architecture": arch})
