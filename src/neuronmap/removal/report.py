"""Reading an edit record back (``edits.json``): its shape checked field by field, for the viewer's report page
(``read_report``) and for ``undo`` (``read_edits``); every problem is one line naming the field."""

from __future__ import annotations

import json
import re
from pathlib import Path


from neuronmap.core.errors import NeuronmapError
from neuronmap.removal.edited import EDITS_JSON, FORMAT, VERSION


BOOKKEEPING = ("format", "version", "originals")  # edits.json's own keys; the rest is RemoveReport.to_dict()


REPORT_FIX = "reports=... takes a directory written by `neuronmap remove` (or its edits.json), e.g. reports=no-paris"


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
            return f"{where} is {show_value(value)}, expected a list"
        return next((p for i, v in enumerate(value) if (p := _shape_problem(v, shape[0], f"{where}[{i}]"))), None)
    if shape == SHA256:
        ok = isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None
        return None if ok else f"{where} is {show_value(value)}, expected a sha256 (64 hex digits)"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is {show_value(value)}, expected an object"
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
    return None if ok else f"{where} is {show_value(value)}, expected {want}"


def show_value(value: object) -> str:
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
        raise NeuronmapError(f"{name} has edit record version {show_value(record.get('version'))}; this neuronmap reads "
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
        raise NeuronmapError(f"reports={path} does not exist: {REPORT_FIX}")
    if not file.is_file():
        looks = " (it looks like an atlas: pass it without reports=...)" if (path / "meta.json").is_file() else ""
        raise NeuronmapError(f"reports={path} holds no {EDITS_JSON}{looks}: {REPORT_FIX}")
    record = _load_record(file, f"reports={file}", REPORT_FIX, "view")
    report = {k: v for k, v in record.items() if k not in BOOKKEEPING}
    problem = _shape_problem(report, _REPORT, "")
    if problem:
        raise NeuronmapError(f"reports={file} is damaged: {problem}; re-run `neuronmap remove` to write it anew")
    return file, report


UNDO_FIX = "edited=... takes a directory written by `neuronmap remove`"


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
            raise NeuronmapError(f"{file} is damaged: it names the file {show_value(name)}, expected a file name in "
                                 f"{edited} other than {EDITS_JSON}; {REDO}")
    for name, sha in files.items():
        if written.get(name) != sha["after"]:
            raise NeuronmapError(f"{file} is damaged: written[{name!r}] is {show_value(written.get(name))}, expected "
                                 f"files[{name!r}].after ({sha['after']}); {REDO}")
    if record["originals"] not in written or record["originals"] in files:
        raise NeuronmapError(f"{file} is damaged: originals is {show_value(record['originals'])}, expected a file of "
                             f"written that is not in files; {REDO}")
    for i, step in enumerate(record["steps"]):
        for j, e in enumerate(step["edits"]):
            if e["axis"] not in (0, 1) or e["index"] < 0:
                what = ("axis", "0 (a row) or 1 (a column)") if e["axis"] not in (0, 1) else ("index", "a whole number >= 0")
                raise NeuronmapError(f"{file} is damaged: steps[{i}].edits[{j}].{what[0]} is {show_value(e[what[0]])}, "
                                     f"expected {what[1]}; {REDO}")
    return record
