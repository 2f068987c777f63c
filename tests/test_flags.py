"""Library errors name Python parameters (``top=0``); the CLI shows the same errors with its flags (``--top 0``).

``neuronmap.cli.flags``: ``PARAM_FLAGS`` (Python name -> flag) and ``as_flags``, which ``main`` applies to every
error it prints. A scan keeps flags out of the library's messages.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from neuronmap.atlas.handle import Atlas
from neuronmap.atlas.search import search
from neuronmap.cli import build_parser, main
from neuronmap.cli.flags import PARAM_FLAGS, as_flags
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.fsio import check_png
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.testing.synthetic import synthetic_atlas

SRC = Path(__file__).resolve().parents[1] / "src" / "neuronmap"


def _cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    last = capsys.readouterr().err.rstrip("\n").splitlines()[-1]  # after any note (building the token index)
    assert last.startswith("error: "), last
    return last[len("error: "):]


# ------------------------------------------------------------------ as_flags


@pytest.mark.parametrize("message, shown", [
    ("the model has 30 layers", "the model has 30 layers"),  # prose: no name=
    ("layers='5-2': the range 5-2 is reversed", "--layers '5-2': the range 5-2 is reversed"),
    ("top_k=0 is out of range: expected 1 to 49152 (the vocabulary size)",
     "--top-k 0 is out of range: expected 1 to 49152 (the vocabulary size)"),
    ("x already exists (an atlas): pass overwrite=True to replace it, or choose another out=...",
     "x already exists (an atlas): pass --overwrite to replace it, or choose another -o"),
    ("widen matrices=..., layers=... or pole=...", "widen --matrices, --layers or --pole"),
    ("n=0 and max_new_tokens=5 must be at least 1", "-n 0 and --max-new-tokens 5 must be at least 1"),
    ("unknown kernel='fast': expected one of auto, eager, compiled",
     "unknown --kernel 'fast': expected one of auto, eager, compiled"),
    # names outside the table, inside a word or a path, and the CLI's own flags stay as they are
    ("neuron spec 'L1N5' has no value: give one (e.g. L1N5=20x) or a sweep=...",
     "neuron spec 'L1N5' has no value: give one (e.g. L1N5=20x) or a --sweep"),
    ("variants=False, stop=3, d_top=2, ckpt/top=1 and 'top=1'", "variants=False, stop=3, d_top=2, ckpt/top=1 and 'top=1'"),
    ("argument --top-k: 0 is out of range; see `neuronmap map --help`",
     "argument --top-k: 0 is out of range; see `neuronmap map --help`"),
])
def test_as_flags_rewrites_named_parameters_only(message, shown):
    assert as_flags(message) == shown


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def test_every_flag_in_the_table_is_an_option_of_a_command():
    missing = sorted(set(PARAM_FLAGS.values()) - _options(build_parser()))
    assert not missing, f"PARAM_FLAGS names flags no command has: {missing}"


# ------------------------------------------------------------------ the same error, from Python and from the CLI


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return synthetic_atlas(tmp_path_factory.mktemp("flags") / "syn", n_layers=4, d_mlp=8, d_vocab=100, k=3)


def test_search_errors_name_parameters_in_python_and_flags_on_the_command_line(syn, capsys):
    with pytest.raises(NeuronmapError, match=r"^layers='3-1': the range 3-1 is reversed; write it low-high, e.g. 1-3$"):
        search(Atlas.open(syn), ["tok5"], layers="3-1", stored=True)
    assert _cli_error(capsys, "search", str(syn), "tok5", "--layers", "3-1", "--stored") == (
        "--layers '3-1': the range 3-1 is reversed; write it low-high, e.g. 1-3")

    with pytest.raises(NeuronmapError, match=r", or leave out sort=agreement$"):
        search(Atlas.open(syn), ["tok5"], sort="agreement")
    assert _cli_error(capsys, "search", str(syn), "tok5", "--sort", "agreement").endswith(", or leave out --sort agreement")


def test_plot_path_errors(syn, tmp_path, capsys):
    with pytest.raises(NeuronmapError, match=r"^plot=\S+x\.svg: the plot is a PNG; give a file name ending in \.png$"):
        check_png(tmp_path / "x.svg")
    assert _cli_error(capsys, "stats", str(syn), "--plot", str(tmp_path / "x.svg")) == (
        f"--plot {tmp_path / 'x.svg'}: the plot is a PNG; give a file name ending in .png")


def test_map_errors_name_parameters_in_python_and_flags_on_the_command_line(ckpt, atlas, tmp_path, capsys):
    with pytest.raises(NeuronmapError, match=r"\(an atlas\): pass overwrite=True to replace it, or choose another out=\.\.\.$"):
        map_model(str(ckpt), atlas)
    assert _cli_error(capsys, "map", str(ckpt), "-o", str(atlas)) == (
        f"{atlas} already exists (an atlas): pass --overwrite to replace it, or choose another -o")

    with pytest.raises(NeuronmapError, match=r"^layers='1-0': the range 1-0 is reversed"):
        map_model(str(ckpt), tmp_path / "new", MapOptions(layers="1-0"))
    assert _cli_error(capsys, "map", str(ckpt), "-o", str(tmp_path / "new"), "--layers", "1-0").startswith(
        "--layers '1-0': the range 1-0 is reversed")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ no flags in the library's messages

FLAG = re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, set(PARAM_FLAGS.values())), key=len, reverse=True))
                  + r")(?![\w-])")

# Strings outside cli/ that may name a flag: none of them is an error message.
ALLOWED = {
    "compare/__init__.py": ["asked for with --level concept"],  # Comparison.reason
    "compare/series.py": ["{}: already mapped, kept (--resume)", "--ray: using"],  # map-many's notes
    "decode/native.py": ["-o"],  # the compiler's argument
    "mapping/distributed.py": ["--ray: using the Ray cluster this process is already connected to",  # notes
                               "--ray: {} parts in {} tasks on {} node(s), {} {} slots"],
    "removal/options.py": [  # Step.warning, printed after a removal
        "removing {} moved the neutral reference text by a median KL of {} nats/token (above {}): the edited model is "
        "damaged well beyond the concept (--select {}, --edit {}{}); try fewer --edits{} or another --select "
        "(docs/remove.md)", ", --strength {}", ", a smaller --strength"],
    # map_model's messages: left to the split of map_model (issue 21 item 6); remove each as it names parameters.
    "mapping/mapper.py": [
        "removed {} parts of an earlier interrupted map into {} (--resume continues one instead)",
        "{} of {} parts are kept in {}; run the same command with --resume to continue",
    ],
}


def _strings(tree: ast.Module):
    """(line, text) of every string literal but docstrings; an f-string whole, each placeholder as ``{}``."""
    docstrings, parts = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            parts.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | parts:
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def test_library_messages_name_parameters_not_flags():
    """Outside cli/, a message names ``top=...``, not ``--top``; a command to run (in backticks, or in <code> on a
    viewer page) keeps its flags, and so do the few strings in ``ALLOWED``."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("cli/"):
            continue
        allowed = ALLOWED.get(rel, [])
        for line, text in _strings(ast.parse(path.read_text(encoding="utf-8"))):
            if text in allowed:
                continue
            if FLAG.search(re.sub(r"`[^`]*`|<code>.*?</code>", "", text)):
                found.append(f"{rel}:{line}: {text!r}")
    assert not found, "library messages that name flags (name the parameter: top=..., overwrite=True):\n" + "\n".join(found)


def test_the_allow_list_is_current():
    """Each allowed string still exists, so the list shrinks as messages change (map_model's first)."""
    for rel, allowed in ALLOWED.items():
        texts = {t for _, t in _strings(ast.parse((SRC / rel).read_text(encoding="utf-8")))}
        assert not set(allowed) - texts, (rel, set(allowed) - texts)


def test_map_model_names_top_k_and_the_cli_its_flag(ckpt, tmp_path, capsys):
    with pytest.raises(NeuronmapError, match=r"^top_k=0 is out of range: expected 1 to \d+ \(the vocabulary size\)$"):
        map_model(str(ckpt), tmp_path / "a", MapOptions(top_k=0))
    with pytest.raises(NeuronmapError, match=r"^unknown norm='rms': expected final or none$"):
        map_model(str(ckpt), tmp_path / "a", MapOptions(norm="rms"))
    assert main(["map", str(ckpt), "-o", str(tmp_path / "a"), "--norm", "rms"]) == 2
    assert capsys.readouterr().err == "error: unknown --norm 'rms': expected final or none\n"
