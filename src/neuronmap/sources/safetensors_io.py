"""Read safetensors files one tensor at a time, checking the header before trusting it.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [lo, hi]}}``, then the data. Every
entry is checked when the file is opened (a list shape of non-negative integers,
offsets inside the data, ``hi - lo == prod(shape) x itemsize``, no two tensors
overlapping), so a corrupt or hand-edited header gives one line, never a
traceback or a tensor read from the wrong bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.weights import dtype_error, first_line

MAX_HEADER = 100_000_000  # safetensors' own limit: a corrupt length must not make us read gigabytes as JSON
# Every safetensors dtype and its size in bytes.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# Those read as torch tensors: the floats neuronmap decodes, and the integer types Weights refuses by name.
TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, checked: where its bytes are (absolute offsets) and what they hold."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _bad(f: Path, detail: str) -> NeuronmapError:
    return NeuronmapError(f"cannot read {f}: it is truncated or not a safetensors file ({detail}); re-download or re-export it")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(f: Path, name: str, info, start: int, data_size: int) -> Entry:
    if not isinstance(info, dict):
        raise _bad(f, f"tensor {name}'s entry is {type(info).__name__}, expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise _bad(f, f"tensor {name} has dtype {dtype!r}, expected one of {', '.join(ITEMSIZE)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(f, f"tensor {name} has shape {shape!r}, expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)):
        raise _bad(f, f"tensor {name} has data_offsets {offsets!r}, expected [begin, end] as two integers")
    lo, hi = offsets
    if not 0 <= lo <= hi <= data_size:
        raise _bad(f, f"tensor {name} has data_offsets {offsets}, outside the file's {data_size} bytes of data")
    need = math.prod(shape) * ITEMSIZE[dtype]
    if hi - lo != need:
        raise _bad(f, f"tensor {name} has data_offsets {offsets} ({hi - lo} bytes), expected {need} bytes "
                      f"for shape {shape} of {dtype}")
    return Entry(f, dtype, tuple(shape), start + lo, start + hi)


def safetensors_header(f: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file, every header entry checked against the file.

    Returns:
        name -> ``Entry`` (``__metadata__`` is dropped).

    Raises:
        NeuronmapError: truncated, not a safetensors file, or a header entry that does not
            fit the file (its message names the tensor, the field and the expected value).

    Example:
        >>> sorted(safetensors_header(Path("ck/model.safetensors")))[:1]  # doctest: +SKIP
        ['lm_head.weight']
    """
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise _bad(f, f"a header of {n} bytes in a file of {size}")
            if n > MAX_HEADER:
                raise _bad(f, f"a header of {n} bytes, more than the format's limit of {MAX_HEADER}")
            raw = fh.read(n)
    except OSError as e:
        raise NeuronmapError(f"cannot read {f}: {e.strerror or e}; check that it exists and is readable") from e
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _bad(f, f"its header is not JSON: {first_line(e, 80)}") from e
    if not isinstance(header, dict):
        raise _bad(f, f"its header is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    entries = {name: _entry(f, name, info, 8 + n, size - 8 - n) for name, info in header.items()}
    spans = sorted((e.start, e.end, k) for k, e in entries.items() if e.end > e.start)
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise _bad(f, f"tensors {a} and {b} overlap in the file")
    return entries


def safetensors_reader(files: tuple[Path, ...]) -> tuple[Callable[[str], torch.Tensor], Callable[[str], Entry | None]]:
    """Lazy readers over the tensors of one or more safetensors files (a checkpoint's shards).

    Tensors are read with plain reads, not through safetensors' mmap: mapped pages
    count in the process's resident memory, so mapping a whole 8B checkpoint layer
    by layer would grow it by the checkpoint's size.

    Returns:
        (read, entry): ``read(name)`` gives the tensor in its stored dtype (integer ones
        too: ``Weights`` refuses them by name); ``entry(name)`` its ``Entry``, or None.
        A name missing its ``model.``/``transformer.`` prefix is found too (bare
        base-model checkpoints, e.g. GPT-2's ``h.0.mlp...``).

    Raises:
        NeuronmapError: a file's header is bad (at once); a tensor is missing, of a dtype
            torch cannot hold, or cannot be read (when read).
    """
    home = files[0].parent if files else "the checkpoint"
    where: dict[str, Entry] = {}
    for f in files:
        where.update(safetensors_header(f))

    def entry(name: str) -> Entry | None:
        if name in where:
            return where[name]
        short = name.split(".", 1)[1] if "." in name else name
        return where.get(short)

    def read(name: str) -> torch.Tensor:
        e = entry(name)
        if e is None:
            raise NeuronmapError(f"tensor {name} is missing from {home}: is the checkpoint complete, and of the family "
                                 "its config.json names? re-download or re-export it")
        if e.dtype not in TORCH_DTYPES:
            raise dtype_error(name, e.file, e.dtype)
        buf = bytearray(e.end - e.start)
        try:
            with open(e.file, "rb") as fh:
                fh.seek(e.start)
                got = fh.readinto(buf)
        except OSError as err:
            raise NeuronmapError(f"cannot read tensor {name} from {e.file}: {err.strerror or err}; check the file") from err
        if got != len(buf):
            raise NeuronmapError(f"cannot read tensor {name} from {e.file}: {got} of {len(buf)} bytes read; "
                                 "the file was truncated since it was opened, re-download it")
        dtype = TORCH_DTYPES[e.dtype]
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape(e.shape)

    return read, entry
