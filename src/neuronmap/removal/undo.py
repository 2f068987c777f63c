"""``undo``: restore the original bytes of an edited checkpoint into a new directory, every file checked by sha256."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


from neuronmap.core.errors import NeuronmapError
from neuronmap.core.cache import file_sha256, hash_file
from neuronmap.removal.edited import EDITS_JSON, byte_runs, check_new_dir, file_entries, new_dir, swap_bytes, tensor_bytes
from neuronmap.removal.report import REDO, read_edits, show_value


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


def _restore(entry, originals: dict, e: dict, file: Path, originals_file: Path) -> None:
    """Write one edit's original bytes back (``entry``: the copy's tensors), refusing an edit that does not fit its
    tensor or has no original of its size."""
    key = f"{e['tensor']}|{e['axis']}|{e['index']}"
    ent = entry(e["tensor"])
    if ent is None or len(ent.shape) != 2:
        raise NeuronmapError(f"{file} records an edit of tensor {show_value(e['tensor'])}, which is no 2-D tensor of the "
                             f"checkpoint; {REDO}")
    if e["index"] >= ent.shape[e["axis"]]:
        raise NeuronmapError(f"{file} records an edit of {key}, past the {ent.shape[e['axis']]} "
                             f"{'rows' if e['axis'] == 0 else 'columns'} of {e['tensor']}; {REDO}")
    new = tensor_bytes(originals[key]) if key in originals else b""
    if len(new) != sum(n for _, n in byte_runs(ent, e["axis"], e["index"])):
        raise NeuronmapError(f"{originals_file} holds no original of the right size for edit {key} of {file}; {REDO}")
    swap_bytes(ent, e["axis"], e["index"], new)


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
        entry = file_entries(tmp)
        for e in edits:
            _restore(entry, originals, e, file, originals_file)
        for name, sha in restored.items():
            if hash_file(tmp / name) != sha:
                raise NeuronmapError(f"restoring {name} did not give back its original sha256: {file} does not match "
                                     f"its files; {REDO}")
    return UndoReport(str(edited), str(out), len(edits), restored)
