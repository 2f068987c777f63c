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
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from neuronmap.core import fsio
from neuronmap.sources.checkpoint import checkpoint_files
from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.models import DEVICE, Model, load_model, require_tokenizer
from neuronmap.intervene.elicit import ConceptSpec, concept_specs, resolve_spec
from neuronmap.removal.method import Removal, RemoveOptions, Step, remove_concepts
from neuronmap.sources.safetensors_io import ITEMSIZE, TORCH_DTYPES, Entry, safetensors_reader
from neuronmap.sources.resolve import open_weights, resolve_source
from neuronmap.sources.weights import Source
from neuronmap.core.cache import file_sha256, hash_file

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
            raise NeuronmapError(f"-o {out} overlaps the model being read ({p}): write the edited checkpoint "
                                 "elsewhere, e.g. -o ./no-paris")
    if out.is_symlink():
        raise NeuronmapError(f"-o {out} is a symbolic link: give a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NeuronmapError(f"-o {out} already exists and is not empty: neuronmap never replaces it; choose a new directory")
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
                raise NeuronmapError(f"-o {out} appeared while writing (another run?): choose a new directory") from e
            raise fsio.write_error(out, e, "checkpoint") from e
    finally:
        fsio.remove_tree(tmp)


# ------------------------------------------------------------------ bytes of one row or column


def _runs(e: Entry, axis: int, index: int) -> list[tuple[int, int]]:
    """``(offset, n_bytes)`` in the file of one row (axis 0) or column (axis 1) of a 2-D tensor."""
    rows, cols = e.shape
    size = ITEMSIZE[e.dtype]
    if axis == 0:
        return [(e.start + index * cols * size, cols * size)]
    return [(e.start + (i * cols + index) * size, size) for i in range(rows)]


def _swap(e: Entry, axis: int, index: int, new: bytes) -> bytes:
    """Write ``new`` over one row or column of the tensor in its file; return the bytes it replaced."""
    old = bytearray()
    pos = 0
    with open(e.file, "r+b") as f:
        for offset, n in _runs(e, axis, index):
            f.seek(offset)
            old += f.read(n)
            f.seek(offset)
            f.write(new[pos:pos + n])
            pos += n
    return bytes(old)


def _bytes(v: torch.Tensor) -> bytes:
    return v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _entries(d: Path):
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


@dataclass(frozen=True)
class RemoveReport:
    """What ``remove`` did: every step measured, and the checkpoint it wrote.

    Attributes:
        steps: one per concept, in removal order (neuronmap.removal.method.Step).
        base: how the unedited files were made (copied, or exported from a GGUF).
        files: per rewritten weight file, its sha256 ``before`` and ``after`` the edits.
        source_files: the source's own weight files, ``{"name", "sha256"}`` each, as an atlas's meta.json records
            them: for a GGUF source ``files`` holds its safetensors export, and this is what ties the report to an
            atlas of the GGUF itself (the viewer's neuron links).
        written: every file written beside edits.json (the checkpoint and originals.safetensors) with its sha256:
            what ``undo`` checks before it restores anything.
    """

    source: str
    out: str
    options: RemoveOptions
    control: str | None
    base: str
    steps: tuple[Step, ...]
    files: dict
    source_files: tuple[dict, ...] = ()
    written: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON types only: the form ``remove --json`` prints (and edits.json holds)."""
        return {"source": self.source, "out": self.out, "options": self.options.to_dict(), "control": self.control,
                "base": self.base, "steps": [s.to_dict() for s in self.steps], "files": self.files,
                "source_files": list(self.source_files), "written": self.written}


def write_checkpoint(src: Source, m: Model, removal: Removal, out: Path, report: dict) -> tuple[str, dict, dict]:
    """Write the edited checkpoint, ``edits.json`` and ``originals.safetensors`` to ``out``, atomically.

    Returns:
        (base, files, written): how the base was made, each rewritten file's sha256 before and after, and every file
        written but edits.json with its sha256.
    """
    from safetensors.torch import save_file

    with new_dir(out, (src.path,)) as tmp:
        base = _base(src, m, tmp)
        entry = _entries(tmp)
        touched = sorted({entry(e.tensor).file for e in removal.edits})
        before = {f.name: hash_file(f) for f in touched}
        originals = {}
        for e, v in zip(removal.edits, removal.vectors):
            ent = entry(e.tensor)
            old = _swap(ent, e.axis, e.index, _bytes(v.to(TORCH_DTYPES[ent.dtype])))
            originals[f"{e.tensor}|{e.axis}|{e.index}"] = torch.frombuffer(bytearray(old), dtype=TORCH_DTYPES[ent.dtype]).clone()
        files = {name: {"before": sha, "after": hash_file(tmp / name)} for name, sha in before.items()}
        save_file(originals, str(tmp / ORIGINALS))
        written = {f.name: files[f.name]["after"] if f.name in files else hash_file(f)
                   for f in sorted(tmp.iterdir()) if f.is_file()}
        record = {"format": FORMAT, "version": VERSION, **report, "base": base, "files": files, "written": written,
                  "originals": ORIGINALS}
        (tmp / EDITS_JSON).write_text(json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return base, files, written


def remove(source: str | None, concepts: list[str], out: Path | str, prompts: list[str] = (),
           prompts_file: str | Path | None = None, control: str | None = None, options: RemoveOptions = RemoveOptions(),
           device: str = DEVICE) -> RemoveReport:
    """Remove concepts from a model (TARS or a variant of ours), measure each step, and write the edited checkpoint.

    Args:
        source: anything ``resolve_source`` takes (None: the demo model).
        concepts: words to remove, in order, e.g. ``["Paris"]``.
        out: the new checkpoint directory (must not exist, or be empty).
        prompts: detailed prompts, one per concept in order (default: the bundled one for that concept).
        prompts_file: a JSON file of concepts shaped like ``neuronmap/data/remove_prompts.json``.
        control: a concept that should stay (default: the first concept's bundled control; ``""``: none).
        options: the TARS choices (default: ``select="auto"``, specific where the concept has bundled neighbours,
            else cosine; docs/remove.md; ``RemoveOptions(select="cosine")``
            is TARS as published).
        device: ``cpu`` | ``cuda`` | ``auto``.

    Returns:
        RemoveReport: what was edited and measured; the checkpoint is at ``out``.

    Raises:
        NeuronmapError: bad options, concepts or output; a source that cannot be loaded or written.

    Example:
        >>> r = remove(None, ["Paris"], "no-paris")  # doctest: +SKIP
        >>> r.steps[0].measures[0].ratio < 1  # doctest: +SKIP
        True
    """
    options = options.resolved()  # edit and strength recorded as used, not as None (auto: per step, in its "method")
    options.check()
    if not concepts:
        raise NeuronmapError("no --concept given: name the concept to remove, e.g. --concept Paris")
    if len(prompts) > len(concepts):
        raise NeuronmapError(f"{len(prompts)} --prompt for {len(concepts)} --concept: give at most one prompt per concept, in order")
    src = resolve_source(source)
    out = check_new_dir(out, (src.path,))
    specs_all = concept_specs(prompts_file)
    specs = [resolve_spec(w, specs_all, p) for w, p in zip(concepts, [*prompts, *[None] * len(concepts)])]
    ctrl = _control(control, specs, specs_all)
    w = open_weights(src)  # the header only: what the edits would be written into, checked before the model loads
    matrices = options.check(w.family.matrices)
    stored = stored_dtypes(src, sorted({w.family.vector_slot(x, i, 0, w.d_mlp)[0] for x in matrices for i in range(w.n_layers)}))
    m = load_model(src, device)
    removal = remove_concepts(m, specs, ctrl, options, stored)
    source_files = tuple({"name": f.name, "sha256": file_sha256(f)} for f in src.files)  # cached: hashed once per file
    report = RemoveReport(src.spec, str(out), options, ctrl.word if ctrl else None, "", removal.steps, {}, source_files)
    base, files, written = write_checkpoint(src, m, removal, out, report.to_dict())
    return RemoveReport(src.spec, str(out), options, report.control, base, removal.steps, files, source_files, written)


def _control(control: str | None, specs: list[ConceptSpec], specs_all: dict[str, ConceptSpec]) -> ConceptSpec | None:
    word = specs[0].control if control is None else control.strip()
    if not word:
        return None
    removed = {s.word.strip().lower() for s in specs}
    if word.lower() in removed:
        if control is None:
            return None
        raise NeuronmapError(f"--control {word!r} is also a --concept being removed: choose a concept that should stay")
    if word.lower() not in specs_all:
        raise NeuronmapError(f"--control {word!r} has no eliciting prompts (bundled: {', '.join(sorted(specs_all))}): "
                             "add it to a --prompts FILE, or choose a bundled one")
    return specs_all[word.lower()]


# ------------------------------------------------------------------ reading a report back

BOOKKEEPING = ("format", "version", "originals")  # edits.json's own keys; the rest is RemoveReport.to_dict()
REPORT_FIX = "--report takes a directory written by `neuronmap remove` (or its edits.json), e.g. --report no-paris"

# What a reader of the report relies on: a key ending in ``?`` may be absent; ``(a, b)`` is either; ``[x]`` a list of x;
# ``{str: x}`` an object of any keys, each value an x; ``float`` any JSON number; ``SHA256`` 64 lowercase hex digits.
SHA256 = "sha256"
_EDIT = {"id": str, "matrix": str, "layer": int, "neuron": int, "pole": str, "cosine": float, "score": float,
         "old_norm": float, "old_top": [str], "new_top": [str]}
_MEASURE = {"concept": str, "role": str, "ratio": (float, None), "mean_before": float, "mean_after": float,
            "prompts": [{"kind": str, "prompt": str, "answer": str, "before": float, "after": float}]}
_STEP = {"concept": str, "method?": {"select": str, "edit": str, "strength": float}, "targeting?": {"approx_prob": float, "prob": float, "top": [str], "cosine_to_approx": float},
         "edits": [_EDIT], "measures": [_MEASURE], "kl_median": float, "kl_p95": float}
_REPORT = {"source": str, "out": str, "options": dict, "control": (str, None), "base": str, "steps": [_STEP],
           "files": dict, "source_files?": [{"name": str, "sha256": str}], "written?": {str: SHA256}}


def _shape_problem(value: object, shape: object, where: str) -> str | None:
    """The first place where ``value`` does not have ``shape`` (the notation above), e.g. ``steps[0].kl_median is
    missing``; None if none. ``where`` names ``value`` ("" for the top)."""
    if isinstance(shape, tuple):
        problems = [_shape_problem(value, s, where) for s in shape]
        return None if None in problems else problems[0]
    if shape is None:
        return None if value is None else f"{where} is {value!r}, expected null"
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {_show(value)}, expected a list"
        return next((p for i, v in enumerate(value) if (p := _shape_problem(v, shape[0], f"{where}[{i}]"))), None)
    if shape == SHA256:
        ok = isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None
        return None if ok else f"{where} is {_show(value)}, expected a sha256 (64 hex digits)"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is {_show(value)}, expected an object"
        if list(shape) == [str]:
            return next((p for k, v in value.items() if (p := _shape_problem(v, shape[str], f"{where}[{k!r}]"))), None)
        for key, sub in shape.items():
            name = key.rstrip("?")
            at = f"{where}.{name}" if where else name
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"{at} is missing"
            if p := _shape_problem(value[name], sub, at):
                return p
        return None
    ok = (isinstance(value, (int, float)) if shape is float else isinstance(value, shape)) and not isinstance(value, bool)
    want = {float: "a number", int: "a whole number", str: "a string", dict: "an object"}[shape]
    return None if ok else f"{where} is {_show(value)}, expected {want}"


def _show(value: object) -> str:
    """A JSON value as a message shows it: scalars as Python writes them (cut at 60 characters), containers by kind."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _load_record(file: Path, name: str, fix: str, use: str) -> dict:
    """``file`` read as a neuronmap edit record of this version; ``name`` and ``fix`` are how messages name it and
    what they tell to do, ``use`` what the user was doing ("view", "undo").

    Raises:
        NeuronmapError: not readable JSON (NaN and Infinity included), not a neuronmap edit record, another version.
    """
    try:
        # NaN and Infinity are not JSON (remove writes with allow_nan=False); the viewer could not send them back either.
        record = json.loads(file.read_text(encoding="utf-8"), parse_constant=_not_json)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: a deeply nested file
        raise NeuronmapError(f"{name} is not readable JSON ({type(e).__name__}: {e}): {fix}") from e
    got = record.get("format") if isinstance(record, dict) else f"a JSON {type(record).__name__}"
    if got != FORMAT:
        raise NeuronmapError(f"{name} is not a neuronmap edit record (format {got!r}, expected {FORMAT!r}): {fix}")
    if record.get("version") != VERSION:
        raise NeuronmapError(f"{name} has edit record version {_show(record.get('version'))}; this neuronmap reads "
                             f"version {VERSION}: {use} it with the neuronmap release that wrote it")
    return record


def read_report(path: Path | str) -> tuple[Path, dict]:
    """Read the report a ``remove`` run recorded, refusing anything else.

    Args:
        path: a directory written by ``neuronmap remove``, or the edits.json in it.

    Returns:
        (the edits.json read, the report): edits.json without its bookkeeping keys (``BOOKKEEPING``), which is
        ``RemoveReport.to_dict()``, the JSON ``remove --json`` printed.

    Raises:
        NeuronmapError: a path that does not exist or holds no edits.json; a file that is not JSON, not a neuronmap
            edit record, of another version, or lacks a field the report needs (named, e.g. ``steps[0].kl_median``).

    Example:
        >>> read_report("no-paris")[1]["steps"][0]["concept"]  # doctest: +SKIP
        'Paris'
    """
    path = Path(path)
    file = path / EDITS_JSON if path.is_dir() else path
    if not path.exists():
        raise NeuronmapError(f"--report {path} does not exist: {REPORT_FIX}")
    if not file.is_file():
        looks = " (it looks like an atlas: pass it without --report)" if (path / "meta.json").is_file() else ""
        raise NeuronmapError(f"--report {path} holds no {EDITS_JSON}{looks}: {REPORT_FIX}")
    record = _load_record(file, f"--report {file}", REPORT_FIX, "view")
    report = {k: v for k, v in record.items() if k not in BOOKKEEPING}
    problem = _shape_problem(report, _REPORT, "")
    if problem:
        raise NeuronmapError(f"--report {file} is damaged: {problem}; re-run `neuronmap remove` to write it anew")
    return file, report


# ------------------------------------------------------------------ undo


@dataclass(frozen=True)
class UndoReport:
    """What ``undo`` restored: ``vectors`` rows/columns put back; ``files``: every file written, with its sha256 (the
    original's, checked)."""

    edited: str
    out: str
    vectors: int
    files: dict

    def to_dict(self) -> dict:
        return {"edited": self.edited, "out": self.out, "vectors": self.vectors, "files": self.files}


UNDO_FIX = "--undo takes a directory written by `neuronmap remove`"
REDO = "re-run `neuronmap remove` on the original model"
# What undo relies on, in the notation of _REPORT.
_UNDO = {"files": {str: {"before": SHA256, "after": SHA256}}, "originals": str, "written": {str: SHA256},
         "steps": [{"edits": [{"tensor": str, "axis": int, "index": int}]}]}


def read_edits(edited: Path | str) -> dict:
    """The edits.json of a directory written by ``remove``, checked for everything ``undo`` relies on.

    Args:
        edited: the directory ``remove`` wrote.

    Returns:
        The record: ``files`` (each rewritten file's sha256 ``before`` and ``after``, at least one), ``written``
        (every file remove wrote but edits.json, with its sha256), ``originals`` (a file name in ``written``) and
        ``steps[].edits[]`` (``tensor``, ``axis`` 0 or 1, ``index`` >= 0).

    Raises:
        NeuronmapError: one line naming the field, what it is and what was expected, and the fix.

    Example:
        >>> sorted(read_edits("no-paris")["files"])  # doctest: +SKIP
        ['model.safetensors']
    """
    edited = Path(edited)
    file = edited / EDITS_JSON
    if not file.is_file():
        raise NeuronmapError(f"{edited} has no readable {EDITS_JSON} (none there): {UNDO_FIX}")
    record = _load_record(file, str(file), UNDO_FIX, "undo")
    if "written" not in record:
        raise NeuronmapError(f"{file} lists no sha256 of the files remove wrote (no \"written\": older neuronmap "
                             f"releases did not record it), so undo could check nothing it restores; {REDO}")
    problem = _shape_problem(record, _UNDO, "")
    if problem:
        raise NeuronmapError(f"{file} is damaged: {problem}; {REDO}")
    files, written = record["files"], record["written"]
    if not files:
        raise NeuronmapError(f"{file} is damaged: files is {{}}, expected the rewritten weight files with their sha256, "
                             f"so undo could check nothing it restores; {REDO}")
    for name in [*written, *files, record["originals"]]:
        if name in ("", ".", "..", EDITS_JSON) or any(c in name for c in "/\\\0"):
            raise NeuronmapError(f"{file} is damaged: it names the file {_show(name)}, expected a file name in "
                                 f"{edited} other than {EDITS_JSON}; {REDO}")
    for name, sha in files.items():
        if written.get(name) != sha["after"]:
            raise NeuronmapError(f"{file} is damaged: written[{name!r}] is {_show(written.get(name))}, expected "
                                 f"files[{name!r}].after ({sha['after']}); {REDO}")
    if record["originals"] not in written or record["originals"] in files:
        raise NeuronmapError(f"{file} is damaged: originals is {_show(record['originals'])}, expected a file of "
                             f"written that is not in files; {REDO}")
    for i, step in enumerate(record["steps"]):
        for j, e in enumerate(step["edits"]):
            if e["axis"] not in (0, 1) or e["index"] < 0:
                what = ("axis", "0 (a row) or 1 (a column)") if e["axis"] not in (0, 1) else ("index", "a whole number >= 0")
                raise NeuronmapError(f"{file} is damaged: steps[{i}].edits[{j}].{what[0]} is {_show(e[what[0]])}, "
                                     f"expected {what[1]}; {REDO}")
    return record


def _restore(entry, originals: dict, e: dict, file: Path, originals_file: Path) -> None:
    """Write one edit's original bytes back (``entry``: the copy's tensors), refusing an edit that does not fit its
    tensor or has no original of its size."""
    key = f"{e['tensor']}|{e['axis']}|{e['index']}"
    ent = entry(e["tensor"])
    if ent is None or len(ent.shape) != 2:
        raise NeuronmapError(f"{file} records an edit of tensor {_show(e['tensor'])}, which is no 2-D tensor of the "
                             f"checkpoint; {REDO}")
    if e["index"] >= ent.shape[e["axis"]]:
        raise NeuronmapError(f"{file} records an edit of {key}, past the {ent.shape[e['axis']]} "
                             f"{'rows' if e['axis'] == 0 else 'columns'} of {e['tensor']}; {REDO}")
    new = _bytes(originals[key]) if key in originals else b""
    if len(new) != sum(n for _, n in _runs(ent, e["axis"], e["index"])):
        raise NeuronmapError(f"{originals_file} holds no original of the right size for edit {key} of {file}; {REDO}")
    _swap(ent, e["axis"], e["index"], new)


def undo(edited: Path | str, out: Path | str) -> UndoReport:
    """Write ``out``: the checkpoint ``edited`` was made from, byte for byte, every file's sha256 checked.

    Every file edits.json lists (``written``) is checked against its sha256 first; then the files of the checkpoint
    are copied, the original rows and columns written back, and each copy checked against its original sha256
    (``files``' ``before`` where rewritten, else ``written``'s). Files that ``remove`` did not write are not copied.

    Raises:
        NeuronmapError: ``edited`` is not written by ``remove``, its edits.json is malformed or lists no files, one
            of its files was changed since (named); ``out`` exists.

    Example:
        >>> undo("no-paris", "paris-again").vectors  # doctest: +SKIP
        5
    """
    from safetensors.torch import load_file

    edited = Path(edited)
    record = read_edits(edited)
    file = edited / EDITS_JSON
    out = check_new_dir(out, (edited,))
    for name, sha in record["written"].items():
        f = edited / name
        if not f.is_file() or file_sha256(f) != sha:
            raise NeuronmapError(f"{f} is not the file `remove` wrote ({'missing' if not f.is_file() else 'its sha256 changed'}"
                                 f"; {EDITS_JSON} records {sha[:12]}...): its original bytes cannot be restored; {REDO}")
    originals_file = edited / record["originals"]
    try:
        originals = load_file(str(originals_file))
    except Exception as e:  # safetensors raises its own error types
        raise NeuronmapError(f"cannot read {originals_file} ({type(e).__name__}): it is damaged; {REDO}") from e
    edits = [e for s in record["steps"] for e in s["edits"]]
    restored = {n: record["files"][n]["before"] if n in record["files"] else sha for n, sha in record["written"].items()
                if n != record["originals"]}
    with new_dir(out, (edited,)) as tmp:
        for name in restored:
            shutil.copyfile(edited / name, tmp / name)
        entry = _entries(tmp)
        for e in edits:
            _restore(entry, originals, e, file, originals_file)
        for name, sha in restored.items():
            if hash_file(tmp / name) != sha:
                raise NeuronmapError(f"restoring {name} did not give back its original sha256: {file} does not match "
                                     f"its files; {REDO}")
    return UndoReport(str(edited), str(out), len(edits), restored)
