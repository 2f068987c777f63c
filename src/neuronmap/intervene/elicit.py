"""A concept's prompts for ``remove``: the detailed prompt TARS reads it from, and the prompts that elicit it.

Bundled for a few concepts the demo model knows (``data/remove_prompts.json``:
paris, london, dog, cat); a ``--prompts`` file of the same form adds or replaces
concepts. Each eliciting prompt is ``[kind, prompt, answer]``: kinds are
``direct`` (names what the concept is known for), ``descriptive`` (describes it
without naming), ``reverse`` (names the concept and asks about it: the answer is
another word) and ``other-language``; the answer is the word whose next-token
probability is measured. Optional per concept: ``contrast`` (a few words of its
kind, for ``--select unembed``), ``neighbours`` (many words of its kind whose
logits ``--select specific`` leaves alone) and ``neighbour_prompts`` (detailed
prompts about some of them, the same form as ``prompt``); none of them should
name the control, which must stay an untouched measure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.hooks import bundled_text

BUNDLED = "remove_prompts.json"
KINDS = ("direct", "descriptive", "reverse", "other-language")


@dataclass(frozen=True)
class ConceptSpec:
    """What removing one concept needs: its detailed prompt, its eliciting prompts, its default control."""

    word: str
    prompt: str
    control: str | None
    eliciting: tuple[tuple[str, str, str], ...]  # (kind, prompt, answer)
    contrast: tuple[str, ...] = ()  # words of the same kind, for --select unembed (not the control)
    neighbours: tuple[str, ...] = ()  # words whose logits --select specific leaves alone (not the control)
    neighbour_prompts: tuple[str, ...] = ()  # detailed prompts about neighbours, for --select specific


def _spec(word: str, entry, where: str) -> ConceptSpec:
    bad = f"{where}: entry {word!r} must be an object with \"prompt\" (text), optional \"control\" (a word) and " \
          "\"eliciting\" (a list of [kind, prompt, answer]); fix it"
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise NeuronmapError(bad)
    rows = entry.get("eliciting", [])
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 3 and all(isinstance(x, str) and x.strip() for x in r)
                                             for r in rows):
        raise NeuronmapError(bad)
    kinds = [r[0] for r in rows if r[0] not in KINDS]
    if kinds:
        raise NeuronmapError(f"{where}: entry {word!r} has eliciting kind {kinds[0]!r}: expected one of {', '.join(KINDS)}")
    control = entry.get("control")
    if control is not None and not isinstance(control, str):
        raise NeuronmapError(bad)
    lists = {}
    for key in ("contrast", "neighbours", "neighbour_prompts"):
        xs = entry.get(key, [])
        if not isinstance(xs, list) or not all(isinstance(x, str) and x.strip() for x in xs):
            raise NeuronmapError(f"{where}: entry {word!r} has a malformed {key!r}: expected a list of non-empty "
                                 "strings; fix it")
        lists[key] = tuple(xs)
    return ConceptSpec(word, entry["prompt"], control, tuple(tuple(r) for r in rows), lists["contrast"],
                       lists["neighbours"], lists["neighbour_prompts"])


def concept_specs(path: str | Path | None = None) -> dict[str, ConceptSpec]:
    """The bundled concepts (``data/remove_prompts.json``), updated by a file of the same form, by lower-case word.

    Raises:
        NeuronmapError: the file is unreadable, not JSON, or an entry is malformed.
    """
    out = {k.lower(): _spec(k, v, BUNDLED) for k, v in json.loads(bundled_text(BUNDLED)).items()}
    if path is not None:
        try:
            user = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise NeuronmapError(f"cannot read prompts_file={path} ({type(e).__name__}): pass a JSON file shaped like "
                                 f"neuronmap/data/{BUNDLED}") from e
        if not isinstance(user, dict):
            raise NeuronmapError(f"prompts_file={path} holds a JSON {type(user).__name__}: expected an object of concepts, "
                                 f"shaped like neuronmap/data/{BUNDLED}")
        out.update({k.lower(): _spec(k, v, str(path)) for k, v in user.items()})
    return out


def resolve_spec(word: str, specs: dict[str, ConceptSpec], prompt: str | None) -> ConceptSpec:
    """The spec of ``word``, its prompt replaced by ``prompt`` where given; unbundled words measure on that prompt alone.

    Raises:
        NeuronmapError: a word with neither a spec nor a prompt.
    """
    spec = specs.get(word.strip().lower())
    if spec is None:
        if prompt is None:
            raise NeuronmapError(f"no bundled prompts for {word!r} (bundled: {', '.join(sorted(specs))}): pass prompt="
                                 "TEXT, a detailed description ending where its name comes next, or prompts_file=FILE")
        return ConceptSpec(word, prompt, None, (("descriptive", prompt, word),))
    return ConceptSpec(word, prompt or spec.prompt, spec.control, spec.eliciting or (("descriptive", prompt or spec.prompt, word),),
                       spec.contrast, spec.neighbours, spec.neighbour_prompts)
