"""``neuronmap.remove``: load the model, run the method (neuronmap.removal.method) for each concept, write the edited
checkpoint (neuronmap.removal.edited) and return the ``RemoveReport``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.models import DEVICE, load_model
from neuronmap.intervene.elicit import ConceptSpec, concept_specs, resolve_spec
from neuronmap.removal.method import remove_concepts
from neuronmap.removal.options import RemoveOptions, Step
from neuronmap.sources.resolve import open_weights, resolve_source
from neuronmap.core.cache import file_sha256
from neuronmap.removal.edited import check_new_dir, stored_dtypes, write_checkpoint


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
        raise NeuronmapError("no concepts=... given: name the concept to remove, e.g. concepts=Paris")
    if len(prompts) > len(concepts):
        raise NeuronmapError(f"{len(prompts)} prompts=... for {len(concepts)} concepts=...: give at most one prompt per concept, in order")
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
        raise NeuronmapError(f"control={word!r} is also a concepts=... being removed: choose a concept that should stay")
    if word.lower() not in specs_all:
        raise NeuronmapError(f"control={word!r} has no eliciting prompts (bundled: {', '.join(sorted(specs_all))}): "
                             "add it to a prompts_file=FILE, or choose a bundled one")
    return specs_all[word.lower()]
