"""The atlas on disk: what --overwrite may replace, races at the final rename, damaged atlases, a meta.json fuzz."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_tiny
from neuronmap.atlas.format import open_files, read_meta
from neuronmap.atlas.writer import atlas_writer
from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.atlas.stats import stats


def _tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` with its sha256: 'still there, byte for byte'."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys, *fragments: str, notice: str | None = None) -> str:
    err = capsys.readouterr().err.strip()
    if notice:  # a progress line printed before the work that failed
        err = "\n".join(line for line in err.splitlines() if not line.startswith(notice))
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


# ------------------------------------------------------------------ --overwrite never deletes what neuronmap did not write


def test_overwrite_refuses_a_directory_of_user_files(ckpt, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("a week of work")
    (mine / "sub" / "data.bin").write_bytes(bytes(range(256)))
    before = _tree(mine)
    assert main(["map", str(ckpt), "-o", str(mine), "--overwrite"]) == 2
    _one_line_error(capsys, "is not a neuronmap atlas", "--overwrite replaces only atlases")
    assert _tree(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directory left


@pytest.mark.parametrize("where, says", [
    (lambda ck: ck, "is the model being mapped"),
    (lambda ck: ck / "atlas", "is inside the model being mapped"),
    (lambda ck: ck.parent, "contains the model being mapped"),
])
def test_overwrite_never_touches_the_source(where, says, tmp_path, capsys):
    ck = tmp_path / "models" / "ck"
    make_tiny("llama", ck)
    capsys.readouterr()
    before = _tree(tmp_path)
    assert main(["map", str(ck), "-o", str(where(ck)), "--overwrite"]) == 2
    _one_line_error(capsys, says, "write the atlas to a directory outside the checkpoint")
    assert _tree(tmp_path) == before


def test_overwrite_refuses_an_atlas_holding_foreign_files(ckpt, tmp_path, capsys):
    out = tmp_path / "a"
    map_model(str(ckpt), out)
    (out / "my-notes.md").write_text("keep me")
    before = _tree(out)
    assert main(["map", str(ckpt), "-o", str(out), "--overwrite"]) == 2
    _one_line_error(capsys, "also holds files neuronmap did not write (my-notes.md)")
    assert _tree(out) == before


def test_overwrite_replaces_an_atlas_and_an_empty_directory_counts_as_absent(ckpt, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    map_model(str(ckpt), out)  # empty: no --overwrite needed
    assert read_meta(out)["decode"]["layers"] == [0, 1]
    map_model(str(ckpt), out, MapOptions(layers="1"), overwrite=True)
    assert read_meta(out)["decode"]["layers"] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_symlink_output_is_refused(ckpt, atlas, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(atlas)
    assert main(["map", str(ckpt), "-o", str(link), "--overwrite"]) == 2
    _one_line_error(capsys, "is a symbolic link")
    assert read_meta(atlas)["format"] == "neuronmap-atlas"


def test_no_message_suggests_mapping_over_a_checkpoint(ckpt, capsys):
    """`stats` on a checkpoint used to suggest `neuronmap map -o <that checkpoint>`."""
    assert main(["stats", str(ckpt)]) == 2
    err = _one_line_error(capsys, "looks like a model checkpoint", f"neuronmap map {ckpt} -o ATLAS_DIR")
    assert f"-o {ckpt}" not in err


# ------------------------------------------------------------------ the final rename


def test_an_atlas_that_appears_meanwhile_is_not_replaced(ckpt, atlas, tmp_path):
    out = tmp_path / "a"
    with pytest.raises(NeuronmapError, match="pass overwrite=True to replace it"):
        with atlas_writer(out, overwrite=False) as tmp:
            (tmp / "meta.json").write_text("{}")
            shutil.copytree(atlas, out)  # another run finished first
    assert _tree(out) == _tree(atlas)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_user_directory_that_appears_meanwhile_is_not_replaced_even_with_overwrite(tmp_path):
    out = tmp_path / "a"
    with pytest.raises(NeuronmapError, match="is not a neuronmap atlas"):
        with atlas_writer(out, overwrite=True) as tmp:
            (tmp / "meta.json").write_text("{}")
            out.mkdir()
            (out / "precious.txt").write_text("x")
    assert (out / "precious.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_an_error_inside_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atlas_writer(tmp_path / "a", overwrite=False) as tmp:
            (tmp / "neurons.parquet").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ damaged atlases: one line naming the file


def _damage(atlas: Path, tmp_path: Path, how) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(atlas, bad)
    how(bad)
    return bad


def _rewrite_parquet(path: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(path)), path)


DAMAGE = {
    "garbage neurons": (lambda a: (a / "neurons.parquet").write_bytes(b"not parquet at all" * 10),
                        "neurons.parquet is not a readable Parquet file"),
    "truncated neurons": (lambda a: (a / "neurons.parquet").write_bytes((a / "neurons.parquet").read_bytes()[:-100]),
                          "neurons.parquet is not a readable Parquet file"),
    "scrambled pages": (lambda a: _scramble(a / "neurons.parquet"), "damaged"),
    "dropped column": (lambda a: _rewrite_parquet(a / "neurons.parquet", lambda t: t.drop_columns(["probs"])),
                       "neurons.parquet lacks the column 'probs'"),
    "wrong column type": (lambda a: _rewrite_parquet(a / "neurons.parquet", lambda t: t.set_column(
        t.schema.get_field_index("layer"), "layer", t["layer"].cast(pa.string()))), "column 'layer' is string, expected int32"),
    "missing rows": (lambda a: _rewrite_parquet(a / "neurons.parquet", lambda t: t.slice(0, 10)),
                     "neurons.parquet has 10 rows, meta.json says 288"),
    "scrambled pages, no sha256": (lambda a: (_edit_meta(a, lambda m: m.pop("sha256")), _scramble(a / "neurons.parquet")),
                                   "neurons.parquet cannot be read ("),
    "two bytes flipped": (lambda a: _flip_two_bytes(a / "neurons.parquet"), "neurons.parquet is damaged or was changed"),
    "vocab bytes flipped": (lambda a: _flip_two_bytes(a / "vocab.parquet"), "vocab.parquet is damaged or was changed"),
    "garbage vocab": (lambda a: (a / "vocab.parquet").write_bytes(b"\x00" * 64), "vocab.parquet is not a readable Parquet file"),
    "missing vocab": (lambda a: (a / "vocab.parquet").unlink(), "vocab.parquet is missing"),
    "meta is a list": (lambda a: (a / "meta.json").write_text("[1, 2]"), "meta.json format is 'a JSON list'"),
    "meta is not JSON": (lambda a: (a / "meta.json").write_text("{oops"), "meta.json is not readable JSON"),
    "meta lacks decode": (lambda a: _edit_meta(a, lambda m: m.pop("decode")), "decode is None, expected an object"),
    "meta bad layers": (lambda a: _edit_meta(a, lambda m: m["decode"].update(layers=[0, 7])), "decode.layers is [0, 7]"),
    "meta bad d_mlp": (lambda a: _edit_meta(a, lambda m: m.update(d_mlp="24")), "d_mlp is '24', expected a positive integer"),
}


def _scramble(path: Path) -> None:
    """Garble the data pages, keep the footer: the file opens, its reads fail."""
    b = bytearray(path.read_bytes())
    for i in range(100, len(b) // 2):
        b[i] = (b[i] * 7 + 13) % 256
    path.write_bytes(bytes(b))


def _flip_two_bytes(path: Path, at: float = 0.5) -> None:
    """Flip two bytes inside a data page (footer and header untouched): the file still opens and decodes."""
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    b[i] ^= 0x01
    b[i + 1] ^= 0x01
    path.write_bytes(bytes(b))


def _edit_meta(a: Path, fn) -> None:
    m = json.loads((a / "meta.json").read_text())
    fn(m)
    (a / "meta.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("argv", [["search", "{a}", "<5>", "--stored"], ["search", "{a}", "<5>"], ["show", "{a}", "L0N1"],
                                  ["stats", "{a}"], ["compare", "{a}", "{good}"]])
def test_damaged_atlas_gives_one_line(case, argv, atlas, tmp_path, capsys):
    how, says = DAMAGE[case]
    bad = _damage(atlas, tmp_path, how)
    code = main([x.format(a=bad, good=atlas) for x in argv])
    err = _one_line_error(capsys, says, notice="building the atlas's token index")
    assert code == 2
    assert "permission" not in err.lower()
    # The fix it gives is one that would work: --overwrite only where the directory still says it is an atlas.
    assert ("--overwrite" in err) == ("meta is" not in case)


# ------------------------------------------------------------------ a small fuzz over meta.json


def _mutations(meta: dict, rng: random.Random):
    """Yield (description, mutated meta.json text): deleted keys, swapped types, odd numbers, truncations."""
    paths = [(k,) for k in meta] + [("decode", k) for k in meta["decode"]] + [("source", k) for k in meta["source"]]
    odd = [None, True, -1, 0, 2**40, 1.5, "x", "", [], {}, [0], ["up"], float("nan")]
    for _ in range(300):
        m = copy.deepcopy(meta)
        path = rng.choice(paths)
        parent = m if len(path) == 1 else m[path[0]]
        op = rng.random()
        if op < 0.3:
            parent.pop(path[-1], None)
            yield f"del {path}", json.dumps(m)
        elif op < 0.85:
            parent[path[-1]] = rng.choice(odd)
            yield f"{path}={parent[path[-1]]!r}", json.dumps(m)
        else:
            text = json.dumps(m)
            yield "truncated", text[:rng.randrange(len(text))]


def test_meta_json_fuzz(atlas, tmp_path):
    meta = read_meta(atlas)
    bad = tmp_path / "fz"
    shutil.copytree(atlas, bad)
    good_stats = stats(open_files(atlas)).layers.to_dict("records")
    refused = 0
    for what, text in _mutations(meta, random.Random(1234)):
        (bad / "meta.json").write_text(text)
        try:
            files = open_files(bad)
        except NeuronmapError as e:
            assert "\n" not in str(e), what
            refused += 1
            continue
        # Accepted: then it reads like the undamaged atlas (no wrong result passed off as right).
        assert stats(files).layers.to_dict("records") == good_stats, what
    assert refused > 100


# ------------------------------------------------------------------ sha256 of the data files, recorded at write, checked on read


def test_map_records_the_sha256_of_its_data_files(atlas):
    meta = read_meta(atlas)
    assert meta["sha256"] == {n: hashlib.sha256((atlas / n).read_bytes()).hexdigest()
                              for n in ("neurons.parquet", "vocab.parquet")}


@pytest.mark.parametrize("argv", [["search", "{a}", "<5>", "--stored"], ["show", "{a}", "L0N1", "--stored"],
                                  ["show", "{a}", "L0N1"], ["stats", "{a}"], ["compare", "{good}", "{a}"]])
def test_two_flipped_bytes_in_neurons_are_refused_in_one_line(argv, atlas, tmp_path, capsys):
    bad = _damage(atlas, tmp_path, lambda a: _flip_two_bytes(a / "neurons.parquet"))
    assert main([x.format(a=bad, good=atlas) for x in argv]) == 2
    _one_line_error(capsys, f"error: {bad}/neurons.parquet is damaged or was changed after it was written (its sha256 is ",
                    f"meta.json records {read_meta(atlas)['sha256']['neurons.parquet'][:12]}...): rebuild it with "
                    f"`neuronmap map {read_meta(atlas)['source']['spec']} -o {bad} --overwrite`",
                    notice="building the atlas's token index")


def test_a_flip_after_the_token_index_was_built_is_still_refused(atlas, tmp_path, capsys):
    bad = _damage(atlas, tmp_path, lambda a: None)
    assert main(["search", str(bad), "<5>", "--stored"]) == 0 and (bad / "token_index.parquet").is_file()
    capsys.readouterr()
    _flip_two_bytes(bad / "neurons.parquet")
    assert main(["search", str(bad), "<5>", "--stored"]) == 2
    _one_line_error(capsys, "neurons.parquet is damaged or was changed after it was written")


def test_an_atlas_without_sha256_still_opens_unchecked(atlas, tmp_path):
    """Atlases written before neuronmap recorded sha256 open as before (docs/atlas-format.md says they are unchecked)."""
    old = _damage(atlas, tmp_path, lambda a: _edit_meta(a, lambda m: m.pop("sha256")))
    assert stats(open_files(old)).layers.to_dict("records") == stats(open_files(atlas)).layers.to_dict("records")
    _edit_meta(old, lambda m: m.update(sha256={"neurons.parquet": "0" * 64}))
    with pytest.raises(NeuronmapError, match=r"neurons.parquet is damaged or was changed .*meta.json records 000000000000"):
        open_files(old)
    _edit_meta(old, lambda m: m.update(sha256={"neurons.parquet": "oops"}))
    with pytest.raises(NeuronmapError, match=r"meta.json is damaged: sha256 is malformed"):
        open_files(old)


@pytest.mark.parametrize("damage", [_scramble, _flip_two_bytes], ids=["scrambled", "two bytes flipped"])
def test_a_damaged_token_index_is_rebuilt_not_read(atlas, tmp_path, capsys, damage):
    # The index is derived from neurons.parquet: a changed one (even two bytes that still decode) is made anew.
    bad = _damage(atlas, tmp_path, lambda a: None)
    assert main(["search", str(bad), "<5>", "--stored", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    index = bad / "token_index.parquet"
    assert (bad / "token_index.parquet.sha256").read_text().strip() == hashlib.sha256(index.read_bytes()).hexdigest()
    damage(index)
    assert main(["search", str(bad), "<5>", "--stored", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["results"] == before["results"] and after["results"]
    assert (bad / "token_index.parquet.sha256").read_text().strip() == hashlib.sha256(index.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def with_evidence(worded, tmp_path_factory) -> Path:
    """The worded tiny atlas with evidence recorded over a few sentences."""
    from neuronmap.atlas.handle import Atlas
    from neuronmap.evidence.record import RecordOptions, record

    root = tmp_path_factory.mktemp("ev")
    shutil.copytree(worded.parent, root / "w")
    corpus = root / "c.txt"
    corpus.write_text("The dog drank coffee about Paris.\n\nA river ran by the castle, which held tea.\n" * 4)
    record(Atlas.open(root / "w" / worded.name), corpus, RecordOptions(context=16, examples=3))
    return root / "w" / worded.name


@pytest.mark.parametrize("name", ["evidence.parquet", "examples.parquet", "contexts.parquet", "agreement.parquet"])
def test_a_changed_evidence_file_names_itself_and_says_to_record_again(name, with_evidence, tmp_path, capsys):
    meta = read_meta(with_evidence)
    assert set(meta["sha256"]) == {"neurons.parquet", "vocab.parquet", "evidence.parquet", "examples.parquet",
                                   "contexts.parquet", "agreement.parquet"}
    bad = _damage(with_evidence, tmp_path, lambda a: _flip_two_bytes(a / name))
    assert main(["examples", str(bad), "L0N1"]) == 2
    err = _one_line_error(capsys, f"error: {bad}/{name} is damaged or was changed after it was written",
                          f"record it again with `neuronmap record {bad} --corpus {meta['evidence']['corpus']['path']} "
                          "--overwrite`")
    assert "neuronmap map" not in err


def test_damaged_evidence_without_sha256_is_named_not_blamed_on_the_map(with_evidence, tmp_path, capsys):
    def damage(a: Path) -> None:
        _edit_meta(a, lambda m: m.pop("sha256"))
        _scramble(a / "examples.parquet")

    bad = _damage(with_evidence, tmp_path, damage)
    assert main(["examples", str(bad), "L0N1"]) == 2
    err = _one_line_error(capsys, f"error: {bad}/examples.parquet cannot be read (", "the file is damaged; record it again "
                          f"with `neuronmap record {bad} --corpus ")
    assert "neuronmap map" not in err


# ------------------------------------------------------------------ the Atlas handle (issue 21)


@pytest.mark.parametrize("method", sorted(__import__("neuronmap.atlas.handle", fromlist=["MIRRORS"]).MIRRORS))
def test_each_atlas_method_takes_what_its_function_takes(method):
    import inspect

    from neuronmap.atlas.handle import MIRRORS, Atlas

    mine = list(inspect.signature(getattr(Atlas, method)).parameters.values())
    theirs = list(inspect.signature(MIRRORS[method]).parameters.values())
    assert mine[0].name == "self" and theirs[0].name == "atlas"
    assert [(p.name, p.kind, p.default, p.annotation) for p in mine[1:]] == \
        [(p.name, p.kind, p.default, p.annotation) for p in theirs[1:]]
    assert inspect.signature(getattr(Atlas, method)).return_annotation == inspect.signature(MIRRORS[method]).return_annotation


def test_every_command_that_reads_one_atlas_has_its_method():
    from neuronmap.atlas.handle import MIRRORS
    from neuronmap.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    first = {name: next((a.dest for a in p._actions if not a.option_strings and a.dest != "help"), None)
             for name, p in sub.choices.items()}
    # record writes evidence into the atlas and verify runs the model: they take an Atlas but are no query of it.
    readers = {name for name, dest in first.items() if dest == "atlas"} - {"record", "verify"}
    assert readers == set(MIRRORS), f"commands that read one atlas without an Atlas method (or stale ones): {readers ^ set(MIRRORS)}"
