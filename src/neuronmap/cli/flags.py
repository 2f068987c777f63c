"""Library errors name Python parameters (``top_k=0``); the CLI shows them as its flags (``--top-k 0``).

A library message names an option the way a Python caller passes it: ``name=VALUE`` (``top_k=0``,
``layers='5-2'``), ``name=True`` for a switch (``pass overwrite=True to replace it``), and ``name=...`` for the
option with no particular value (``re-map with more matrices=...``). ``as_flags`` rewrites those forms, for the names
in ``PARAM_FLAGS`` only, into the command line's: ``--top-k 0``, ``--layers '5-2'``, ``--overwrite``, ``--matrices``.
``main`` applies it to every error it prints.
"""

from __future__ import annotations

import re

# Python name -> the flag that sets it (cli/*.py's add_argument). Where the two are not spelled alike:
#   n_candidates is not here (MapOptions' has no flag); candidates is RemoveOptions.candidates.
#   out: -o (map, remove, map-many); plot: the `out` of stats/compare/trajectory plots, given as --plot.
#   word: the concept of clamp and verify; concepts: remove's (and generate's) list, one --concept each.
#   prompt: one concept's prompt (remove's prompts, one --prompt each); prompts_file: a file of prompts, --prompts.
#   from_file: map-many's --from FILE (read_source_list's path); reports: the viewer's --report directories;
#   edited: the directory undo reads, given to `remove SOURCE --undo`.
PARAM_FLAGS: dict[str, str] = {
    "batch_tokens": "--batch-tokens",
    "candidates": "--candidates",
    "concepts": "--concept",
    "context": "--context",
    "control": "--control",
    "corpus": "--corpus",
    "device": "--device",
    "dtype": "--dtype",
    "edit": "--edit",
    "edited": "--undo",
    "edits": "--edits",
    "every": "--every",
    "examples": "--examples",
    "from_file": "--from",
    "kernel": "--kernel",
    "layers": "--layers",
    "level": "--level",
    "matrices": "--matrices",
    "max_new_tokens": "--max-new-tokens",
    "min_prob": "--min-prob",
    "min_ratio": "--min-ratio",
    "n": "-n",
    "noise": "--noise",
    "norm": "--norm",
    "out": "-o",
    "overwrite": "--overwrite",
    "plot": "--plot",
    "pole": "--pole",
    "positions": "--positions",
    "target": "--target",
    "fold_input_norm": "--fold-input-norm",
    "sae": "--sae",
    "prompt": "--prompt",
    "prompts": "--prompt",
    "prompts_file": "--prompts",
    "ray": "--ray",
    "reports": "--report",
    "resume": "--resume",
    "rounds": "--rounds",
    "select": "--select",
    "sort": "--sort",
    "source": "--source",
    "stored": "--stored",
    "strength": "--strength",
    "sweep": "--sweep",
    "temperature": "--temperature",
    "text_column": "--text-column",
    "tokens": "--tokens",
    "top": "--top",
    "top_k": "--top-k",
    "weights": "--weights",
    "word": "--concept",
}

# A name from the table followed by "=", not inside a word, path or another name=value ("L5N3=20x", "a/top=1").
_NAMED = re.compile(r"(?<![\w./=\\'\"-])(" + "|".join(sorted(PARAM_FLAGS, key=len, reverse=True)) + r")=(True\b|\.\.\.)?")


def as_flags(message: str) -> str:
    """A library message as the command line says it: ``name=True`` -> ``--flag``, ``name=...`` -> ``--flag``,
    ``name=VALUE`` -> ``--flag VALUE``, for the names in ``PARAM_FLAGS`` only; all other text is left alone.

    Example:
        >>> as_flags("top_k=0 is out of range: expected 1 to 49152 (the vocabulary size)")
        '--top-k 0 is out of range: expected 1 to 49152 (the vocabulary size)'
        >>> as_flags("ATLAS already exists (an atlas): pass overwrite=True to replace it, or choose another out=...")
        'ATLAS already exists (an atlas): pass --overwrite to replace it, or choose another -o'
        >>> as_flags("the model has 30 layers: layers='5-2' is reversed")
        "the model has 30 layers: --layers '5-2' is reversed"
    """
    return _NAMED.sub(lambda m: PARAM_FLAGS[m.group(1)] + ("" if m.group(2) else " "), message)
