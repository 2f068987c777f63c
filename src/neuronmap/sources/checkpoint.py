"""Open a Hugging Face checkpoint directory: config.json, the safetensors shards, tokenizer.json.

Each file is checked where it is read, and anything malformed gives one line
naming the file, the field, what it holds, what was expected, and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.families import family_for_model_type
from neuronmap.sources.safetensors_io import safetensors_reader
from neuronmap.sources.vocab import read_tokenizer_json, strings_from_pieces
from neuronmap.sources.weights import Source, Weights, as_int, as_number, first_line, pad_tokens


REDOWNLOAD = "re-download the checkpoint"


def _json_object(path: Path, fix: str) -> dict:
    """A JSON file that must hold an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise NeuronmapError(f"cannot read {path}: {e.strerror or e}; check that it is readable") from e
    except (ValueError, RecursionError) as e:
        raise NeuronmapError(f"{path} is not valid JSON ({first_line(e, 80)}): {fix}") from e
    if not isinstance(data, dict):
        raise NeuronmapError(f"{path} holds a JSON {type(data).__name__}: expected an object; {fix}")
    return data


def _shards(d: Path, index: Path) -> tuple[Path, ...]:
    weight_map = _json_object(index, REDOWNLOAD).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise NeuronmapError(f"{index} has weight_map {str(weight_map)[:60]!r}: expected an object mapping tensor "
                             f"names to shard file names; {REDOWNLOAD}")
    names: dict[str, None] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise NeuronmapError(f"{index} maps tensor {tensor} to {shard!r}: expected a shard file name; {REDOWNLOAD}")
        norm = os.path.normpath(shard)
        # An atlas records shard file names only, so a shard elsewhere could never be found again to check it.
        if os.path.isabs(norm) or os.sep in norm or (os.altsep and os.altsep in norm) or norm in (".", ".."):
            raise NeuronmapError(
                f"{index} names shard {shard!r} for tensor {tensor}, which is not a file in {d}: expected a shard "
                "file name inside the checkpoint directory (an atlas records file names only, so it could never "
                f"be checked against these weights); move the shard into {d} and name it by its file name"
            )
        names[norm] = None
    return tuple(d / s for s in sorted(names))


def checkpoint_files(d: Path) -> tuple[Path, ...]:
    """The safetensors files of a checkpoint directory: its index's shards, or model.safetensors.

    Raises:
        NeuronmapError: no config.json; a malformed index, one naming a shard outside ``d``
            or a missing shard; only PyTorch .bin weights; no weights at all.

    Example:
        >>> [f.name for f in checkpoint_files(Path("ck"))]  # doctest: +SKIP
        ['model.safetensors']
    """
    if not (d / "config.json").is_file():
        raise NeuronmapError(
            f"{d} is not a checkpoint directory: it has no config.json "
            "(expected config.json with model.safetensors or model.safetensors.index.json)"
        )
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = _shards(d, index)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise NeuronmapError(f"{d} is missing shards {', '.join(missing)} named in its index: re-download them")
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return (single,)
    if any(d.glob("*.bin")):
        raise NeuronmapError(
            f"{d} holds PyTorch .bin weights only; neuronmap reads safetensors: "
            "convert with transformers (model.save_pretrained(dir, safe_serialization=True))"
        )
    raise NeuronmapError(f"{d} has a config.json but no model.safetensors or model.safetensors.index.json")


def _matrix_dims(name: str, shape: tuple[int, ...], where: Path) -> tuple[int, int]:
    if len(shape) != 2 or 0 in shape:
        raise NeuronmapError(f"tensor {name} in {where} has shape {list(shape)}: expected a matrix of two non-zero "
                             "dimensions; the checkpoint is corrupt, re-export or re-download it")
    return shape[0], shape[1]


def open_checkpoint(src: Source) -> Weights:
    """Open a checkpoint directory's weights for lazy reading (see ``neuronmap.sources.resolve.open_weights``).

    Raises:
        NeuronmapError: a malformed config.json, safetensors header or tokenizer.json, or
            weights that do not match the config (one line each).
    """
    cfg_path = src.path / "config.json"
    fix = f"fix {cfg_path} or {REDOWNLOAD}"
    config = _json_object(cfg_path, REDOWNLOAD)
    if "text_config" in config and "num_hidden_layers" not in config:
        raise NeuronmapError(f"{src.path} is a multimodal checkpoint ({config.get('model_type')}); map its text-only model instead")
    fam = family_for_model_type(config.get("model_type"))
    key = next((k for k in fam.layers_keys if k in config), fam.layers_keys[0])
    n_layers = as_int(config.get(key), cfg_path, key, fix)
    read, entry = safetensors_reader(src.files)

    def has(name: str) -> bool:
        return entry(name) is not None

    up_name, last_up = fam.up.format(i=0), fam.up.format(i=n_layers - 1)
    for name in (up_name, last_up):
        if not has(name):
            raise NeuronmapError(f"tensor {name} is missing from {src.path} (config.json says {key} is {n_layers}): "
                                 f"the checkpoint does not look like a complete {fam.name} model; {REDOWNLOAD}")
    up_shape = entry(up_name).shape
    rows, d_model = _matrix_dims(up_name, up_shape[::-1] if fam.conv1d else up_shape, entry(up_name).file)
    d_mlp = rows // 2 if fam.fused_gate_up else rows
    head_name = fam.head if has(fam.head) else fam.embed
    if not has(head_name):
        raise NeuronmapError(f"{src.path} has neither {fam.head} nor {fam.embed}: expected the LM head or the token "
                             f"embedding (tied head); {REDOWNLOAD}")
    d_vocab = _matrix_dims(head_name, entry(head_name).shape, entry(head_name).file)[0]
    eps_key = next((k for k in fam.eps_keys if config.get(k) is not None), None)
    eps = as_number(config.get(eps_key), cfg_path, eps_key, fix) if eps_key else fam.default_eps
    softcap = as_number(config.get(fam.softcap_key), cfg_path, fam.softcap_key, fix) if fam.softcap_key else None
    tok_file = src.path / "tokenizer.json"
    if tok_file.is_file():
        pieces, scheme = read_tokenizer_json(tok_file, limit=d_vocab)
        tokenizer = f"tokenizer.json ({scheme})"
    else:
        pieces, scheme, tokenizer = [], "bytelevel", "none (no tokenizer.json: tokens are shown as <id>)"
    tokens = pad_tokens(strings_from_pieces(pieces, scheme), d_vocab)

    if fam.conv1d:
        def read_linear(name: str, _read=read) -> torch.Tensor:
            t = _read(name)
            return t.T.contiguous() if t.ndim == 2 and ".mlp." in name else t
    else:
        read_linear = read

    def file_of(name: str) -> Path:
        e = entry(name)
        return e.file if e else src.path

    return Weights(src, fam, n_layers, d_model, d_mlp, d_vocab, eps, softcap or None, tokens, tokenizer,
                   read_linear, has, config, file_of)
