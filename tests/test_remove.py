"""remove: TARS edits on a tiny llama (mechanics, files, undo, bad input) and on the real demo model (removal, collateral).

The tiny model's numbers mean nothing; its tests check what is written: only the
recorded rows and columns change, the checkpoint loads and gives what was
measured, undo gives back every byte. The demo-model test checks the measured
effect against the model's own before-values.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from neuronmap.cli import build_parser, main
from neuronmap.decode.engine import build_head
from neuronmap.decode.head import logits
from neuronmap.removal.undo import undo
from neuronmap.removal.remove import remove
from neuronmap.intervene.elicit import ConceptSpec
from neuronmap.core.errors import NeuronmapError
from neuronmap.intervene.effects import concept_tokens, next_token_logprobs
from neuronmap.runtime.models import load_model
from neuronmap.removal.method import single_tokens, specific_direction
from neuronmap.removal.options import RemoveOptions
from neuronmap.sources.resolve import open_weights

PROMPTS = {
    "dog": {"prompt": "my favourite animal is the", "control": "cat",
            "eliciting": [["direct", "my favourite animal is a", "dog"], ["reverse", "the dog is a", "animal"]]},
    "cat": {"prompt": "what is your favourite animal", "eliciting": [["direct", "the favourite animal is a", "cat"]]},
}
TINY = RemoveOptions(edits=3, matrices="gate,up,down", select="cosine", candidates=64, rounds=2)  # TARS as published


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.json"
    p.write_text(json.dumps(PROMPTS))
    return p


@pytest.fixture(scope="module")
def removed(tiny_with_tokenizer, prompts_file, tmp_path_factory):
    """dog then cat removed from the tiny llama, with every matrix allowed."""
    out = tmp_path_factory.mktemp("removed") / "no-dog"
    return remove(str(tiny_with_tokenizer), ["dog", "cat"], out, prompts_file=prompts_file, control="", options=TINY), out


def run_cli(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def slots(tensor: torch.Tensor, other: torch.Tensor) -> set[tuple[int, int]]:
    """(axis, index) of every row and column where two 2-D tensors differ."""
    diff = tensor != other
    return {(0, int(i)) for i in diff.any(1).nonzero()} | {(1, int(j)) for j in diff.any(0).nonzero()}


# ------------------------------------------------------------------ mechanics on the tiny llama


def test_only_the_recorded_rows_and_columns_change(removed, tiny_with_tokenizer):
    r, out = removed
    before, after = load_file(tiny_with_tokenizer / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    recorded: dict[str, set] = {}
    for e in (e for s in r.steps for e in s.edits):
        recorded.setdefault(e.tensor, set()).add((e.axis, e.index))
    assert sum(len(v) for v in recorded.values()) == 6  # 3 per concept, none edited twice
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(recorded)
    for name, want in recorded.items():
        got = slots(before[name], after[name])
        # A row edit touches every column at that row (and vice versa); keep the slots along the edited axis.
        assert {s for s in got if s[0] in {a for a, _ in want}} == want
    d = json.loads((out / "edits.json").read_text())
    assert d["format"] == "neuronmap-edits" and d["steps"] == r.to_dict()["steps"]
    assert set(d["files"]) == {"model.safetensors"}


def test_each_new_vector_is_the_reversed_targeting_vector_at_the_old_norm(removed, tiny_with_tokenizer):
    r, out = removed
    w0, w1 = open_weights(str(tiny_with_tokenizer)), open_weights(str(out))
    head = build_head(w1)
    first = r.steps[0].edits
    news = [w1.vectors(e.matrix, e.layer)[e.neuron] * (1 if e.pole == "+" else -1) for e in first]
    for e, new in zip(first, news):
        old = w0.vectors(e.matrix, e.layer)[e.neuron]
        assert float(new.norm()) == pytest.approx(float(old.norm()), rel=1e-5)
        assert float(old.norm()) == pytest.approx(e.old_norm, rel=1e-5)
        assert tuple(w1.tokens[int(i)] for i in logits(head, new[None])[0].topk(3).indices) == e.new_top
    # One targeting vector per concept: every new vector of a step points the same way.
    for a in news[1:]:
        assert float(torch.cosine_similarity(a, news[0], 0)) == pytest.approx(1.0, abs=1e-5)


def test_edited_checkpoint_loads_and_gives_what_was_measured(removed):
    r, out = removed
    AutoModelForCausalLM.from_pretrained(out)  # loads as any checkpoint
    m = load_model(str(out))
    last = r.steps[-1]
    for x in last.measures:
        lp = next_token_logprobs(m, [p for _, p, _ in x.prompts])
        got = [float(lp[i, list(concept_tokens(m, a).token_ids)].exp().sum()) for i, (_, _, a) in enumerate(x.prompts)]
        assert got == pytest.approx(list(x.after), rel=1e-4, abs=1e-7)
    assert [x.concept for x in last.measures] == ["dog", "cat"]  # every concept removed so far, measured after each step


def test_undo_restores_every_byte(removed, tiny_with_tokenizer, tmp_path):
    r, out = removed
    u = undo(out, tmp_path / "back")
    assert u.vectors == 6
    original = sorted(p.name for p in tiny_with_tokenizer.iterdir())
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == original
    for name in original:
        assert (tmp_path / "back" / name).read_bytes() == (tiny_with_tokenizer / name).read_bytes(), name
    assert (out / "model.safetensors").read_bytes() != (tiny_with_tokenizer / "model.safetensors").read_bytes()


def test_undo_refuses_a_changed_checkpoint(removed, tmp_path, capsys):
    _, out = removed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x3f")
    rc, _, err = run_cli(["remove", str(copy), "--undo", "-o", str(tmp_path / "back")], capsys)
    assert rc == 2 and "is not the file `remove` wrote" in err and err.count("\n") == 1
    assert not (tmp_path / "back").exists()



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_edits_json_records_the_sha256_of_every_file_written(removed):
    """edits.json's `written` holds every file remove wrote beside it (originals.safetensors included), as hashed now."""
    _, out = removed
    d = json.loads((out / "edits.json").read_text())
    names = sorted(p.name for p in out.iterdir() if p.name != "edits.json")
    assert sorted(d["written"]) == names and "originals.safetensors" in names and "config.json" in names
    for name in names:
        assert d["written"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    assert d["files"]["model.safetensors"]["after"] == d["written"]["model.safetensors"]
    assert d["originals"] == "originals.safetensors"


def test_outputs_have_the_mode_the_umask_gives(removed, tmp_path):
    """safetensors writes 0600 files; remove's and undo's outputs get 0666 & ~umask like every other output."""
    _, out = removed
    undo(out, tmp_path / "back")
    want = 0o666 & ~_umask()
    for d in (out, tmp_path / "back"):
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in d.iterdir()}
        assert modes == {name: oct(want) for name in modes}, modes
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~_umask()


def edited_copy(out: Path, tmp_path: Path, change=None, damage: dict | None = None) -> Path:
    """A copy of the edited checkpoint ``out`` in tmp_path, its edits.json passed through ``change`` (record -> record)
    and its files' bytes changed per ``damage`` ({file name: bytes written at offset -4, or None to delete it})."""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    if change is not None:
        (copy / "edits.json").write_text(json.dumps(change(json.loads((copy / "edits.json").read_text()))))
    for name, data in (damage or {}).items():
        if data is None:
            (copy / name).unlink()
            continue
        with open(copy / name, "r+b") as f:
            f.seek(-4, 2)
            f.write(data)
    return copy


def undo_cli(copy: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    rc, _, err = run_cli(["remove", str(copy), "--undo", "-o", str(tmp_path / "back")], capsys)
    assert not (tmp_path / "back").exists() or rc == 0
    return rc, err


FLIP = b"\x00\x00\x80\x3f"


@pytest.mark.parametrize("damage", [{"model.safetensors": FLIP}, {}], ids=["flipped-byte", "untouched"])
def test_undo_refuses_a_record_that_lists_no_files(removed, tmp_path, capsys, damage):
    """Issue 25: `files: {}` (with a flipped byte in model.safetensors, or none) undid to exit 0 and 'sha256 of  matches
    the original', having checked nothing."""
    _, out = removed
    copy = edited_copy(out, tmp_path, lambda d: {**d, "files": {}}, damage)
    rc, err = undo_cli(copy, tmp_path, capsys)
    assert rc == 2 and err == (f"error: {copy / 'edits.json'} is damaged: files is {{}}, expected the rewritten weight "
                               "files with their sha256, so undo could check nothing it restores; re-run `neuronmap "
                               "remove` on the original model\n")


@pytest.mark.parametrize("damage, name, why", [
    ({"originals.safetensors": FLIP}, "originals.safetensors", "its sha256 changed"),
    ({"config.json": b"    "}, "config.json", "its sha256 changed"),
    ({"tokenizer.json": None}, "tokenizer.json", "missing"),
], ids=["originals", "config", "tokenizer-missing"])
def test_undo_refuses_a_damaged_edited_checkpoint_naming_the_file(removed, tmp_path, capsys, damage, name, why):
    """Every file remove wrote is checked before anything is restored, not only the rewritten weights."""
    _, out = removed
    copy = edited_copy(out, tmp_path, damage=damage)
    rc, err = undo_cli(copy, tmp_path, capsys)
    assert rc == 2 and err.startswith(f"error: {copy / name} is not the file `remove` wrote ({why}; edits.json records ")
    assert err.endswith("): its original bytes cannot be restored; re-run `neuronmap remove` on the original model\n")
    assert err.count("\n") == 1


def _first_edit(d: dict, **change) -> dict:
    step = d["steps"][0]
    edit = {k: v for k, v in {**step["edits"][0], **change}.items() if v is not None}
    return {**d, "steps": [{**step, "edits": [edit, *step["edits"][1:]]}, *d["steps"][1:]]}


DAMAGED = "is damaged: "
REDO = "; re-run `neuronmap remove` on the original model"


@pytest.mark.parametrize("change, message", [
    (lambda d: {**d, "files": "model.safetensors"}, DAMAGED + "files is 'model.safetensors', expected an object" + REDO),
    (lambda d: _first_edit(d, tensor=None), DAMAGED + "steps[0].edits[0].tensor is missing" + REDO),
    (lambda d: {**d, "steps": "oops"}, DAMAGED + "steps is 'oops', expected a list" + REDO),
    (lambda d: _first_edit(d, axis=2), DAMAGED + "steps[0].edits[0].axis is 2, expected 0 (a row) or 1 (a column)" + REDO),
    (lambda d: _first_edit(d, index=-1), DAMAGED + "steps[0].edits[0].index is -1, expected a whole number >= 0" + REDO),
    (lambda d: _first_edit(d, index="7"), DAMAGED + "steps[0].edits[0].index is '7', expected a whole number" + REDO),
    (lambda d: {**d, "files": {"model.safetensors": {"before": "abc", "after": d["files"]["model.safetensors"]["after"]}}},
     DAMAGED + "files['model.safetensors'].before is 'abc', expected a sha256 (64 hex digits)" + REDO),
    (lambda d: {**d, "files": {"model.safetensors": ["a", "b"]}},
     DAMAGED + "files['model.safetensors'] is a JSON list, expected an object" + REDO),
    (lambda d: {**d, "written": {**d["written"], "../../etc/passwd": "0" * 64}},
     DAMAGED + "it names the file '../../etc/passwd', expected a file name in {copy} other than edits.json" + REDO),
    (lambda d: {**d, "written": {k: v for k, v in d["written"].items() if k != "model.safetensors"}},
     DAMAGED + "written['model.safetensors'] is None, expected files['model.safetensors'].after ({after})" + REDO),
    (lambda d: {**d, "originals": 3}, DAMAGED + "originals is 3, expected a string" + REDO),
    (lambda d: {**d, "originals": "config.json", "written": d["written"]},
     "error: cannot read {copy}/config.json (SafetensorError): it is damaged" + REDO),
    (lambda d: {k: v for k, v in d.items() if k != "written"},
     "lists no sha256 of the files remove wrote (no \"written\": older neuronmap releases did not record it), so "
     "undo could check nothing it restores" + REDO),
    (lambda d: [d], "is not a neuronmap edit record (format 'a JSON list', expected 'neuronmap-edits'): --undo takes a "
                    "directory written by `neuronmap remove`"),
    (lambda d: {**d, "version": "2" * 5000}, "has edit record version '" + "2" * 56 + "...; this neuronmap reads "
                                              "version 1: undo it with the neuronmap release that wrote it"),
    (lambda d: _first_edit(d, tensor="model.norm.weight"), "records an edit of tensor 'model.norm.weight', which is no "
                                                          "2-D tensor of the checkpoint" + REDO),
    (lambda d: _first_edit(d, index=10**6), "records an edit of {key}, past the"),
], ids=["files-string", "edit-without-tensor", "steps-oops", "axis-2", "index-negative", "index-string", "sha-not-hex",
        "files-value-list", "name-escapes", "written-lacks-rewritten", "originals-number", "originals-not-safetensors",
        "no-written", "record-list", "version-huge", "tensor-1d", "index-past-end"])
def test_undo_refuses_a_malformed_edits_json_with_one_line(removed, tmp_path, capsys, change, message):
    """Issue 25 item 9: a `files` string, an edit without `tensor`, `"steps": "oops"` ... gave tracebacks."""
    r, out = removed
    d = json.loads((out / "edits.json").read_text())
    e = d["steps"][0]["edits"][0]
    copy = edited_copy(out, tmp_path, change)
    rc, err = undo_cli(copy, tmp_path, capsys)
    want = message.format(copy=copy, after=d["files"]["model.safetensors"]["after"],
                          key=f"{e['tensor']}|{e['axis']}|{10**6}")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and want in err, err
    assert err.startswith("error: ")


def test_undo_refuses_deeply_nested_edits_json(removed, tmp_path, capsys):
    _, out = removed
    copy = edited_copy(out, tmp_path)
    (copy / "edits.json").write_text("[" * 100_000 + "]" * 100_000)
    rc, err = undo_cli(copy, tmp_path, capsys)
    assert rc == 2 and err.startswith(f"error: {copy / 'edits.json'} is not readable JSON (RecursionError: ")
    assert err.endswith("): --undo takes a directory written by `neuronmap remove`\n") and err.count("\n") == 1


def test_undo_checks_what_it_restored(removed, tmp_path, capsys):
    """An originals.safetensors that is not the one remove wrote, recorded as if it were: every file checks out before
    the restore, and the restored model.safetensors is refused after it, nothing written."""
    from safetensors.torch import save_file

    _, out = removed
    copy = edited_copy(out, tmp_path)
    originals = load_file(copy / "originals.safetensors")
    key = sorted(originals)[0]
    originals[key] = originals[key] + 1
    save_file(originals, str(copy / "originals.safetensors"))
    d = json.loads((copy / "edits.json").read_text())
    d["written"]["originals.safetensors"] = hashlib.sha256((copy / "originals.safetensors").read_bytes()).hexdigest()
    (copy / "edits.json").write_text(json.dumps(d))
    rc, err = undo_cli(copy, tmp_path, capsys)
    assert rc == 2 and err == (f"error: restoring model.safetensors did not give back its original sha256: "
                               f"{copy / 'edits.json'} does not match its files; re-run `neuronmap remove` on the "
                               "original model\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_undo_prints_every_file_checked(removed, tiny_with_tokenizer, tmp_path, capsys):
    _, out = removed
    rc, printed, _ = run_cli(["remove", str(out), "--undo", "-o", str(tmp_path / "back"), "--json"], capsys)
    u = json.loads(printed)
    names = sorted(p.name for p in tiny_with_tokenizer.iterdir())
    assert rc == 0 and sorted(u["files"]) == names
    assert u["files"] == {n: hashlib.sha256((tiny_with_tokenizer / n).read_bytes()).hexdigest() for n in names}


def test_high_collateral_kl_is_a_warning(tiny_with_tokenizer, prompts_file, tmp_path, capsys):
    """Issue 25: --strength 1e30 exited 0 with a median KL of 8.3 nats/token and no word. A run whose measured median
    KL is above 0.1 is written, and says so on stderr; one below says nothing."""
    base = ["remove", str(tiny_with_tokenizer), "--concept", "dog", "--prompts", str(prompts_file), "--select", "cosine",
            "--candidates", "16", "--rounds", "1", "--json"]
    rc, printed, err = run_cli([*base, "-o", str(tmp_path / "hard"), "--edit", "reflect", "--strength", "100"], capsys)
    kl = json.loads(printed)["steps"][0]["kl_median"]
    assert rc == 0 and kl > 0.1 and (tmp_path / "hard" / "edits.json").is_file()
    assert err == (f"warning: removing 'dog' moved the neutral reference text by a median KL of {kl:.3g} nats/token "
                   "(above 0.1): the edited model is damaged well beyond the concept (--select cosine, --edit reflect, "
                   "--strength 100); try fewer --edits, a smaller --strength or another --select (docs/remove.md)\n")
    rc, printed, err = run_cli([*base, "-o", str(tmp_path / "soft"), "--edits", "1"], capsys)
    assert rc == 0 and json.loads(printed)["steps"][0]["kl_median"] < 0.1 and err == ""
    with pytest.raises(NeuronmapError, match=r"^strength=1e\+30 is out of range: expected a number above 0 and at most 100"):
        RemoveOptions(select="cosine", edit="reflect", strength=1e30).check()

def test_contribution_selection_and_bfloat16_checkpoint(tiny_with_tokenizer, prompts_file, tmp_path):
    """A bf16 checkpoint is edited in bf16 (nothing else rewritten), with the contribution ranking."""
    ck = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.bfloat16)
    model.save_pretrained(ck)
    for f in tiny_with_tokenizer.glob("tokenizer*"):
        shutil.copyfile(f, ck / f.name)
    opts = RemoveOptions(edits=2, select="contribution", candidates=32, rounds=1)
    r = remove(str(ck), ["dog"], tmp_path / "out", prompts_file=prompts_file, options=opts)
    before, after = load_file(ck / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    assert {k for k in before if not torch.equal(before[k], after[k])} == {e.tensor for e in r.steps[0].edits}
    assert all(e.matrix == "down" and e.score > 0 for e in r.steps[0].edits)
    assert r.control == "cat" and r.steps[0].measures[-1].role == "control"
    undo(tmp_path / "out", tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (ck / "model.safetensors").read_bytes()


def test_cli_json_is_the_report(tiny_with_tokenizer, prompts_file, tmp_path, capsys):
    rc, out, err = run_cli(["remove", str(tiny_with_tokenizer), "--concept", "dog", "--prompts", str(prompts_file),
                            "-o", str(tmp_path / "o"), "--edits", "1", "--candidates", "16", "--select", "cosine",
                            "--json"], capsys)
    assert rc == 0 and err == ""
    d = json.loads(out)
    assert d["options"]["edits"] == 1 and len(d["steps"][0]["edits"]) == 1
    assert json.loads((tmp_path / "o" / "edits.json").read_text())["steps"] == d["steps"]
    rc, out, _ = run_cli(["remove", str(tmp_path / "o"), "--undo", "-o", str(tmp_path / "b"), "--json"], capsys)
    assert rc == 0 and json.loads(out)["vectors"] == 1


def test_cli_defaults_are_the_api_defaults():
    a = build_parser().parse_args(["remove", "--concept", "Paris", "-o", "x"])
    assert RemoveOptions(a.edits, a.matrices, a.select, a.noise, a.candidates, a.rounds, a.seed,
                         a.edit, a.strength) == RemoveOptions()


def test_unembed_reflect_changes_only_the_component_along_the_direction(tiny_with_tokenizer, prompts_file, tmp_path):
    """--select unembed --edit reflect: each edited down column differs from the old one by a multiple of one direction."""
    opts = RemoveOptions(edits=3, select="unembed", edit="reflect", strength=3.0)
    r = remove(str(tiny_with_tokenizer), ["dog"], tmp_path / "out", prompts_file=prompts_file, options=opts)
    before, after = load_file(tiny_with_tokenizer / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    deltas = []
    for e in r.steps[0].edits:
        assert e.matrix == "down" and e.score > 0
        old = before[e.tensor][:, e.index] if e.axis == 1 else before[e.tensor][e.index]
        new = after[e.tensor][:, e.index] if e.axis == 1 else after[e.tensor][e.index]
        deltas.append((new - old).double())
    d = deltas[0] / deltas[0].norm()
    for x in deltas[1:]:  # every delta is parallel to the same direction
        assert abs(float(x @ d)) / float(x.norm()) > 0.999
    assert all(float((before[e.tensor][:, e.index] if e.axis == 1 else before[e.tensor][e.index]).double() @ d) * float(x @ d) < 0
               for e, x in zip(r.steps[0].edits, deltas))  # the component along it is taken away, not added


def test_specific_writes_only_along_what_no_neighbour_shares(tiny_with_tokenizer, tmp_path):
    """The default, --select auto, is specific for a concept with neighbours: every edited down column moves along
    one direction, which leaves the neighbours' logits alone (to first order) and is not made to spare the control."""
    prompts = {"dog": {**PROMPTS["dog"], "neighbours": ["cat", "animal", "book", "zebra"],
                       "neighbour_prompts": ["my favourite book is the", "the town library is in the"]}}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    r = remove(str(tiny_with_tokenizer), ["dog"], tmp_path / "out", prompts_file=tmp_path / "p.json",
               options=RemoveOptions(edits=2, candidates=16, rounds=1))
    assert (r.options.select, r.options.edit, r.options.strength) == ("auto", None, None)
    assert r.steps[0].method == {"select": "specific", "edit": "reflect", "strength": 40.0}
    m = load_model(str(tiny_with_tokenizer))
    head = build_head(open_weights(str(tiny_with_tokenizer)))
    # The control (cat) and a word the tokenizer lacks (zebra) are left out of the neighbours.
    neighbours = single_tokens(m, ("cat", "animal", "book", "zebra"), ("dog", "cat"))
    assert neighbours == ["animal", "book"]
    d = specific_direction(m, head, "dog", neighbours).double()
    for w in neighbours:
        row = (head.gain * head.W_U[list(concept_tokens(m, w).token_ids)].mean(0)).double()
        assert abs(float(row @ d)) < 1e-6 * float(row.norm() * d.norm())
    before, after = load_file(tiny_with_tokenizer / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert r.steps[0].edits
    for e in r.steps[0].edits:
        assert e.matrix == "down" and e.score > 0
        old = (before[e.tensor][:, e.index] if e.axis == 1 else before[e.tensor][e.index]).double()
        new = (after[e.tensor][:, e.index] if e.axis == 1 else after[e.tensor][e.index]).double()
        delta = new - old
        assert abs(float(delta @ d)) / float(delta.norm() * d.norm()) > 0.999  # along d only
        assert float(new @ d) == pytest.approx(-39 * float(old @ d), rel=1e-3)  # reflected 40-fold: 1 - 40


def test_auto_takes_cosine_for_a_concept_without_neighbours_and_says_so(tiny_with_tokenizer, prompts_file, tmp_path,
                                                                        capsys):
    """--select auto (the default) on a concept with no bundled neighbours, or with more than down edited, is TARS as
    published (cosine, replace); each step records what removed it, and the CLI prints it."""
    for extra, method in (([], "cosine"), (["--matrices", "gate,up,down"], "cosine")):
        out = tmp_path / f"o{len(extra)}"
        rc, printed, _ = run_cli(["remove", str(tiny_with_tokenizer), "--concept", "dog", "--prompts", str(prompts_file),
                                  "-o", str(out), "--edits", "2", "--candidates", "16", "--rounds", "1", *extra], capsys)
        assert rc == 0 and "Edits for 'dog' (cosine, replace)" in printed
        step = json.loads((out / "edits.json").read_text())["steps"][0]
        assert step["method"] == {"select": method, "edit": "replace", "strength": 2.0}
    spec = ConceptSpec("Paris", "The capital of France is", None, (), neighbours=("Rome",), neighbour_prompts=("x",))
    assert RemoveOptions().for_concept(spec).select == "specific"
    assert RemoveOptions(matrices="up,down").for_concept(spec, ("gate", "up", "down")).select == "cosine"
    assert RemoveOptions(select="specific", edit="replace").for_concept(spec).edit == "replace"  # asked for: kept


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("argv, message", [
    (["--concept", "qzxjvwk", "--prompt", "the dog"], "error: concept 'qzxjvwk' matches no token of this vocabulary"),
    (["--concept", "doggo", "--prompt", "the dog"], "error: concept 'doggo' is no single token of this model"),
    (["--concept", "hello"], "error: no bundled prompts for 'hello'"),
    (["--concept", "dog", "--edits", "0"], "error: argument --edits: 0 is out of range"),
    (["--concept", "dog", "--matrices", "gate,ffn"], "error: unknown matrix 'ffn'"),
    (["--concept", "dog", "--control", "hello"], "error: --control 'hello' has no eliciting prompts"),
    (["--concept", "dog", "--select", "specific"], "error: --select specific needs neighbour words and prompts for 'dog'"),
    # Issue 25: 1e30 ran with exit 0 and left a median KL of 8.3 nats/token on the demo model.
    (["--concept", "dog", "--edit", "reflect", "--strength", "1e30"],
     "error: --strength 1e+30 is out of range: expected a number above 0 and at most 100, e.g. 2 (or 40 with --select "
     "specific)"),
    (["--concept", "dog", "--strength", "0"], "error: --strength 0 is out of range: expected a number above 0 and at most 100"),
])
def test_cli_bad_input(tiny_with_tokenizer, prompts_file, tmp_path, argv, message, capsys):
    rc, _, err = run_cli(["remove", str(tiny_with_tokenizer), *argv, "--prompts", str(prompts_file),
                          "-o", str(tmp_path / "o")], capsys)
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("content, message", [
    ("{not json", "error: cannot read --prompts"),
    ('{"dog": {"prompt": "the dog", "eliciting": [["guess", "a", "dog"]]}}', "has eliciting kind 'guess': expected one of"),
    ('{"dog": {"eliciting": []}}', "entry 'dog' must be an object with \"prompt\""),
])
def test_cli_malformed_prompts_file(tiny_with_tokenizer, tmp_path, content, message, capsys):
    (tmp_path / "p.json").write_text(content)
    rc, _, err = run_cli(["remove", str(tiny_with_tokenizer), "--concept", "dog", "--prompts", str(tmp_path / "p.json"),
                          "-o", str(tmp_path / "o")], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_cli_never_writes_over_user_files_or_the_source(tiny_with_tokenizer, prompts_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    base = ["remove", str(tiny_with_tokenizer), "--concept", "dog", "--prompts", str(prompts_file)]
    rc, _, err = run_cli([*base, "-o", str(mine)], capsys)
    assert rc == 2 and "already exists and is not empty: neuronmap never replaces it" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    rc, _, err = run_cli([*base, "-o", str(tiny_with_tokenizer / "sub")], capsys)
    assert rc == 2 and "overlaps the model being read" in err and not (tiny_with_tokenizer / "sub").exists()
    rc, _, err = run_cli(["remove", str(mine), "--undo", "-o", str(tmp_path / "b")], capsys)
    assert rc == 2 and "has no readable edits.json" in err and err.count("\n") == 1


def test_cli_refuses_tensors_it_cannot_write(tiny_with_tokenizer, prompts_file, tmp_path, capsys):
    """A checkpoint whose MLP tensors are not float safetensors is refused before the model loads."""
    from safetensors.torch import save_file

    ck = tmp_path / "int"
    shutil.copytree(tiny_with_tokenizer, ck)
    t = load_file(ck / "model.safetensors")
    t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].to(torch.int8)
    save_file(t, str(ck / "model.safetensors"))
    rc, _, err = run_cli(["remove", str(ck), "--concept", "dog", "--prompts", str(prompts_file), "-o", str(tmp_path / "o")], capsys)
    assert rc == 2 and err.startswith("error: tensor model.layers.0.mlp.down_proj.weight of ") and "stored as I8" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the real demo model


@pytest.mark.slow
def test_demo_default_meets_issue_12_targets(tmp_path, capsys):
    """`neuronmap remove --concept Paris -o DIR` with default options (--select auto: specific for Paris): every direct and
    descriptive Paris prompt falls >= 100-fold or below 0.01, with at most 5 edits; median collateral KL on the reference
    text < 0.01 nats/token; London (the control) keeps >= 80 % of its probability (docs/remove.md)."""
    rc, out, _ = run_cli(["remove", "--concept", "Paris", "-o", str(tmp_path / "no-paris"), "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    step = d["steps"][0]
    assert d["options"]["select"] == "auto" and step["method"] == {"select": "specific", "edit": "reflect", "strength": 40.0}
    assert 1 <= len(step["edits"]) <= 5
    paris, london = step["measures"]
    assert (paris["role"], london["role"]) == ("removed", "control") and london["concept"].lower() == "london"
    named = [p for p in paris["prompts"] if p["kind"] in ("direct", "descriptive")]
    assert len(named) == 5
    for p in named:
        assert p["after"] < 0.01 or p["after"] <= p["before"] / 100, p
    assert london["ratio"] >= 0.8 and step["kl_median"] < 0.01
    # The checkpoint written is the model measured.
    m = load_model(str(tmp_path / "no-paris"))
    lp = next_token_logprobs(m, [p["prompt"] for p in named])
    got = lp[:, list(concept_tokens(m, "Paris").token_ids)].exp().sum(-1)
    assert [float(x) for x in got] == pytest.approx([p["after"] for p in named], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_demo_paris_falls_more_than_the_control_and_the_reference_text(tmp_path):
    """TARS as published (--select cosine): Paris falls more than London, but is not removed (docs/remove.md)."""
    r = remove(None, ["Paris"], tmp_path / "no-paris", options=RemoveOptions(select="cosine"))
    step = r.steps[0]
    paris, london = step.measures
    assert (paris.role, london.role) == ("removed", "control") and step.targeting.prob > step.targeting.approx_prob
    direct = [(b, a) for (k, _, _), b, a in zip(paris.prompts, paris.before, paris.after) if k == "direct"]
    assert all(a < b for b, a in direct)  # P(Paris) falls on every prompt that names it directly
    assert paris.ratio < london.ratio  # the removed concept falls more than the control
    # The edits move the concept's own prompts more than a neutral text: mean |log ratio| there vs median KL here.
    shift = sum(abs(torch.log(torch.tensor(a / b))) for b, a in direct) / len(direct)
    assert step.kl_median < float(shift)
    # The checkpoint written is the model measured, and undo gives back the export it was made from.
    m = load_model(str(tmp_path / "no-paris"))
    lp = next_token_logprobs(m, [p for _, p, _ in paris.prompts])
    got = lp[:, list(concept_tokens(m, "Paris").token_ids)].exp().sum(-1)
    assert [float(x) for x, (_, _, a) in zip(got, paris.prompts) if a == "Paris"] == pytest.approx(
        [x for x, (_, _, a) in zip(paris.after, paris.prompts) if a == "Paris"], rel=1e-3, abs=1e-6)
    undo(tmp_path / "no-paris", tmp_path / "paris")
    before = load_file(tmp_path / "paris" / "model.safetensors")
    after = load_file(tmp_path / "no-paris" / "model.safetensors")
    assert {k for k in before if not torch.equal(before[k], after[k])} == {e.tensor for e in step.edits}


@pytest.mark.slow
def test_demo_unembed_reflect_keeps_the_control_and_the_reference_text(tmp_path):
    """Ours at strength 2: Paris falls on every direct prompt, London keeps >= 80 %, median KL < 0.01 (docs/remove.md)."""
    r = remove(None, ["Paris"], tmp_path / "no-paris", options=RemoveOptions(select="unembed", edit="reflect"))
    step = r.steps[0]
    paris, london = step.measures
    assert all(a < b / 2 for (k, _, _), b, a in zip(paris.prompts, paris.before, paris.after) if k == "direct")
    assert london.ratio > 0.8 and step.kl_median < 0.01
