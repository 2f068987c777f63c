"""The edited checkpoint on disk: ``remove`` writes it, ``undo`` restores the original bytes.

``remove`` writes a Hugging Face checkpoint that transformers and neuronmap load
as any other: a byte copy of the source checkpoint's files (a GGUF source is
first dequantized by transformers and saved as safetensors), in which only the
bytes of the edited rows and columns are rewritten, in the tensor's own dtype.
Beside them:

- ``edits.json``: every edit (tensor, row or column, neuron, pole, cosine, old
  norm, decoded tokens before and after), the options, the measured report, the
  sha256 of each rewritten file before and after (``files``), and the sha256 of
  every file ``remove`` wrote beside it (``written``, originals.safetensors included);
- ``originals.safetensors``: the replaced vectors as they were stored, one 1-D
  tensor each, keyed ``{tensor}|{axis}|{index}``.

``undo`` checks every file ``written`` lists, writes a new directory with those bytes
put back, and checks that each restored file's sha256 is the original's. Every output is built in a temporary directory
beside it and renamed into place; an existing non-empty directory is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from neuronmap.core import fsio
from neuronmap.sources.checkpoint import checkpoint_files
from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.models import Model, require_tokenizer
from neuronmap.removal.options import Removal
from neuronmap.sources.safetensors_io import ITEMSIZE, TORCH_DTYPES, Entry, safetensors_reader
from neuronmap.sources.weights import Source
from neuronmap.core.cache import hash_file

FORMAT = "neuronmap-edits"
VERSION = 1
EDITS_JSON = "edits.json"
ORIGINALS = "originals.safetensors"
WRITABLE = ("F32", "F16", "BF16", "F64")


# ------------------------------------------------------------------ output directories


def check_new_dir(out: Path | str, protect: tuple[Path, ...] = ()) -> Path:
    """Check that ``out`` can be created without losing anything; return it absolute.

    Refused: an existing file or non-empty directory, a symbolic link, a path equal to,
    inside or above one of ``protect`` (the model's files). An empty directory counts as absent.

    Raises:
        NeuronmapError: any of those, with the fix.

    Example:
        >>> check_new_dir("no-paris").name  # doctest: +SKIP
        'no-paris'
    """
    out = Path(os.path.abspath(out))
    for p in protect:
        p = Path(os.path.abspath(p))
        if out == p or p in out.parents or out in p.parents:
            raise NeuronmapError(f"out={out} overlaps the model being read ({p}): write the edited checkpoint "
                                 "elsewhere, e.g. out=./no-paris")
    if out.is_symlink():
        raise NeuronmapError(f"out={out} is a symbolic link: give a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NeuronmapError(f"out={out} already exists and is not empty: neuronmap never replaces it; choose a new directory")
    return out


@contextmanager
def new_dir(out: Path, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``, renamed to ``out`` when the block succeeds, removed otherwise."""
    out = check_new_dir(out, protect)
    tmp = fsio.temp_dir_beside(out, "checkpoint")
    try:
        try:
            yield tmp
            for f in tmp.iterdir():
                if f.is_file() and not f.is_symlink():
                    fsio.make_readable(f)  # safetensors writes its files 0600; outputs get the umask's mode
            os.rename(tmp, out)  # onto an empty directory, or nothing; a directory filled meanwhile fails here
        except OSError as e:
            if out.is_dir() and any(out.iterdir()):
                raise NeuronmapError(f"out={out} appeared while writing (another run?): choose a new directory") from e
            raise fsio.write_error(out, e, "checkpoint") from e
    finally:
        fsio.remove_tree(tmp)


# ------------------------------------------------------------------ bytes of one row or column


def byte_runs(e: Entry, axis: int, index: int) -> list[tuple[int, int]]:
    """``(offset, n_bytes)`` in the file of one row (axis 0) or column (axis 1) of a 2-D tensor."""
    rows, cols = e.shape
    size = ITEMSIZE[e.dtype]
    if axis == 0:
        return [(e.start + index * cols * size, cols * size)]
    return [(e.start + (i * cols + index) * size, size) for i in range(rows)]


def swap_bytes(e: Entry, axis: int, index: int, new: bytes) -> bytes:
    """Write ``new`` over one row or column of the tensor in its file; return the bytes it replaced."""
    old = bytearray()
    pos = 0
    with open(e.file, "r+b") as f:
        for offset, n in byte_runs(e, axis, index):
            f.seek(offset)
            old += f.read(n)
            f.seek(offset)
            f.write(new[pos:pos + n])
            pos += n
    return bytes(old)


def tensor_bytes(v: torch.Tensor) -> bytes:
    return v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def file_entries(d: Path):
    return safetensors_reader(checkpoint_files(d))[1]


def stored_dtypes(src: Source, tensors: list[str]) -> dict[str, torch.dtype]:
    """The dtype each tensor will have in the edited checkpoint (a GGUF is exported in float32).

    Raises:
        NeuronmapError: a tensor stored in a type neuronmap cannot write (quantized or integer).
    """
    if src.kind == "gguf":
        return {t: torch.float32 for t in tensors}
    entry = safetensors_reader(src.files)[1]
    out = {}
    for t in tensors:
        e = entry(t)
        if e is None or e.dtype not in WRITABLE or len(e.shape) != 2:
            what = "missing" if e is None else f"stored as {e.dtype} {list(e.shape)}"
            raise NeuronmapError(f"tensor {t} of {src.spec} is {what}: remove writes edits into 2-D "
                                 f"{'/'.join(WRITABLE)} safetensors only; re-save the checkpoint with transformers")
        out[t] = TORCH_DTYPES[e.dtype]
    return out


def _base(src: Source, m: Model, tmp: Path) -> str:
    """Put the unedited checkpoint into ``tmp``; say how."""
    if src.kind == "checkpoint":
        for f in sorted(src.path.iterdir()):
            if f.is_file() and f.name not in (EDITS_JSON, ORIGINALS):  # an edited source's record is not this one's
                shutil.copyfile(f, tmp / f.name)
        return "a byte copy of the source checkpoint's files"
    model = m.model
    quantizer, qconfig = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
    try:
        # The weights are dequantized floats in memory; without the GGUF quantizer save_pretrained writes them as they are.
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp)
    finally:
        model.hf_quantizer = quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig
    require_tokenizer(m).save_pretrained(tmp)
    return f"the GGUF dequantized by transformers ({str(m.dtype).removeprefix('torch.')}), saved as safetensors"


# ------------------------------------------------------------------ remove


def write_checkpoint(src: Source, m: Model, removal: Removal, out: Path, report: dict) -> tuple[str, dict, dict]:
    """Write the edited checkpoint, ``edits.json`` and ``originals.safetensors`` to ``out``, atomically.

    Returns:
        (base, files, written): how the base was made, each rewritten file's sha256 before and after, and every file
        written but edits.json with its sha256.
    """
    from safetensors.torch import save_file

    with new_dir(out, (src.path,)) as tmp:
        base = _base(src, m, tmp)
        entry = file_entries(tmp)
        touched = sorted({entry(e.tensor).file for e in removal.edits})
        before = {f.name: hash_file(f) for f in touched}
        originals = {}
        for e, v in zip(removal.edits, removal.vectors):
            ent = entry(e.tensor)
            old = swap_bytes(ent, e.axis, e.index, tensor_bytes(v.to(TORCH_DTYPES[ent.dtype])))
            originals[f"{e.tensor}|{e.axis}|{e.index}"] = torch.frombuffer(bytearray(old), dtype=TORCH_DTYPES[ent.dtype]).clone()
        files = {name: {"before": sha, "after": hash_file(tmp / name)} for name, sha in before.items()}
        save_file(originals, str(tmp / ORIGINALS))
        written = {f.name: files[f.name]["after"] if f.name in files else hash_file(f)
                   for f in sorted(tmp.iterdir()) if f.is_file()}
        record = {"format": FORMAT, "version": VERSION, **report, "base": base, "files": files, "written": written,
                  "originals": ORIGINALS}
        (tmp / EDITS_JSON).write_text(json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return base, files, written


# ------------------------------------------------------------------ reading a report back




# ------------------------------------------------------------------ undo


