"""map-many and trajectory: a series of checkpoints mapped into one directory, then compared along the run."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from conftest import SERIES_STEPS
from neuronmap.cli import main
from neuronmap.compare.series import SERIES, atlas_names


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv + ["--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_map_many_then_trajectory_on_a_tiny_series(tiny_models, tmp_path, capsys):
    # A "run" whose middle checkpoint is the last one's weights under another name, so it must agree 100%.
    mid = tmp_path / "mid"
    shutil.copytree(tiny_models("llama", seed=0), mid)
    run = [str(tiny_models("llama", seed=1)), str(mid), str(tiny_models("llama", seed=0))]
    r = run_json(capsys, ["map-many", *run, "-o", str(tmp_path / "run")])
    names = atlas_names(run)
    assert [a["name"] for a in r["atlases"]] == names and names[1] == "001-mid"
    assert json.loads((tmp_path / "run" / SERIES).read_text())["atlases"][1] == {"name": "001-mid", "spec": str(mid)}
    t = run_json(capsys, ["trajectory", str(tmp_path / "run")])
    same = [o["same_top1"] for o in t["overall"]]
    assert same[1] == same[2] == 1.0 and same[0] < 0.5  # random seeds agree only by chance
    assert {(x["matrix"], x["layer"]) for x in t["layers"]} == {(m, i) for m in ("gate", "up", "down") for i in (0, 1)}
    assert all(x["same_top1"] == 1.0 and x["js"] == 0.0 for x in t["layers"] if x["checkpoint"] > 0)
    first = t["steps"][0]
    assert (first["from"], first["to"]) == (names[0], names[1])
    assert t["steps"][1]["n_gained"] == t["steps"][1]["n_lost"] == 0  # the same weights: nothing appears or vanishes


def test_map_many_resume_keeps_finished_atlases(tiny_models, tmp_path, capsys):
    run = [str(tiny_models("llama", seed=1)), str(tiny_models("llama", seed=0))]
    run_json(capsys, ["map-many", *run, "-o", str(tmp_path / "run"), "--layers", "1"])
    name = atlas_names(run)[0]
    stamp = (tmp_path / "run" / name / "meta.json").read_text()
    r = run_json(capsys, ["map-many", *run, "-o", str(tmp_path / "run"), "--layers", "1", "--resume"])
    assert [a["reused"] for a in r["atlases"]] == [True, True]
    assert r["notes"] == [f"{n}: already mapped, kept (--resume)" for n in atlas_names(run)]
    assert (tmp_path / "run" / name / "meta.json").read_text() == stamp


def test_a_missing_source_is_found_before_anything_is_mapped(tiny_models, tmp_path, capsys):
    listing = tmp_path / "run.txt"
    listing.write_text(f"# a training run\n{tiny_models('llama')}\n\n{tmp_path / 'step-20'}\n")
    assert main(["map-many", "--from", str(listing), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: line 4 of {listing}: {tmp_path / 'step-20'} does not exist: pass a checkpoint")
    assert main(["map-many", str(tiny_models("llama")), "nope/nope/x", "-o", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: source 2 of 2 (nope/nope/x): nope/nope/x does not exist")
    assert main(["map-many", "-o", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == ("error: map-many needs at least one SOURCE, or --from FILE with one "
                                               "source a line")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.txt"]


def test_trajectory_refuses_what_is_no_run(tiny_models, tmp_path, capsys):
    run_json(capsys, ["map-many", str(tiny_models("llama")), "-o", str(tmp_path / "one")])
    assert main(["trajectory", str(tmp_path / "one")]) == 2
    assert "holds 1 atlas(es): a trajectory needs two or more" in capsys.readouterr().err
    run_json(capsys, ["map-many", str(tiny_models("llama")), str(tiny_models("gpt2")), "-o", str(tmp_path / "mixed")])
    assert main(["trajectory", str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err.strip()
    assert "a trajectory compares checkpoints of one model" in err and "\n" not in err


def test_a_real_fine_tuning_run(demo_series, tmp_path, capsys):
    """The demo model and its fine-tune after 10, 20 and 30 steps (layers 20-29 train): layer 19 is frozen."""
    run = [str(p) for p in demo_series]
    run_json(capsys, ["map-many", *run, "-o", str(tmp_path / "run"), "--layers", "19-20,29", "--matrices", "up"])
    t = run_json(capsys, ["trajectory", str(tmp_path / "run"), "--plot", str(tmp_path / "t.png")])
    assert [c["name"] for c in t["checkpoints"]] == atlas_names(run)
    same = {(x["layer"], x["checkpoint"]): x["same_top1"] for x in t["layers"]}
    assert all(same[(19, i)] == 1.0 for i in range(len(run)))  # frozen: decodes exactly as the last
    for layer in (20, 29):
        along = [same[(layer, i)] for i in range(len(run))]
        assert along == sorted(along) and along[0] < along[-2] < along[-1] == 1.0, along
    overall = [o["same_top1"] for o in t["overall"]]
    assert overall == sorted(overall) and overall[0] < 1.0
    assert sum(s["n_gained"] + s["n_lost"] for s in t["steps"]) > 0
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(run) == len(SERIES_STEPS) + 2
    assert pq.read_table(tmp_path / "run" / t["checkpoints"][-1]["name"] / "neurons.parquet").num_rows == 2 * 3 * 1536


# ------------------------------------------------------------------ what map-many may replace, and when it writes


def test_map_many_never_replaces_a_series_json_it_did_not_write(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / SERIES).write_text('{"my": "own notes"}\n')
    (run / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for extra in ([], ["--overwrite"]):
        assert main(["map-many", str(tiny_models("llama")), "-o", str(run), "--layers", "1", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {run / SERIES} was not written by neuronmap (no \"format\": \"neuronmap-series\"), and "
                       "map-many would replace it: move it out of the way or choose another -o")
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing mapped, nothing replaced


def test_map_many_into_a_directory_of_other_files_needs_overwrite(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    src = [str(tiny_models("llama", seed=1)), str(tiny_models("llama"))]
    assert main(["map-many", *src, "-o", str(run), "--layers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: -o {run} is not empty and map-many did not write it (it holds notes.txt): choose a new or "
                   "empty directory, or pass --overwrite to add the atlases beside those files (none is replaced)")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    run_json(capsys, ["map-many", *src, "-o", str(run), "--layers", "1", "--overwrite"])
    assert (run / "notes.txt").read_text() == "mine\n"
    listing = json.loads((run / SERIES).read_text())
    assert listing["format"] == "neuronmap-series" and [a["name"] for a in listing["atlases"]] == atlas_names(src)


def test_a_failed_run_leaves_the_earlier_series_as_it_was(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    first = [str(tiny_models("llama", seed=1)), str(tiny_models("llama"))]
    other = [str(tiny_models("llama", seed=1)), str(tiny_models("llama", seed=2))]
    gpt2 = str(tiny_models("gpt2"))
    run_json(capsys, ["map-many", *first, "-o", str(run), "--layers", "1", "--matrices", "gate"])
    listing = (run / SERIES).read_bytes()
    # The same names again without --overwrite: refused before anything is mapped (it used to rewrite series.json).
    assert main(["map-many", *other, "-o", str(run), "--layers", "1", "--matrices", "gate"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {run / atlas_names(other)[0]} already exists (an atlas): pass "
                                               "--overwrite to replace it, or choose another -o")
    assert (run / SERIES).read_bytes() == listing and not (run / atlas_names(other)[1]).exists()
    # A run that fails on its second source, after its first atlas is in place: series.json still lists the first run.
    mid = tmp_path / "mid"
    shutil.copytree(tiny_models("llama", seed=2), mid)
    failing = [str(mid), gpt2]  # GPT-2 has no gate matrix
    assert main(["map-many", *failing, "-o", str(run), "--layers", "1", "--matrices", "gate"]) == 2
    assert "has no 'gate' matrix" in capsys.readouterr().err
    assert (run / atlas_names(failing)[0] / "meta.json").is_file()
    assert (run / SERIES).read_bytes() == listing
    t = run_json(capsys, ["trajectory", str(run)])
    assert [c["name"] for c in t["checkpoints"]] == atlas_names(first)


def test_a_series_json_from_before_the_format_marker_is_still_ours(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    src = [str(tiny_models("llama", seed=1)), str(tiny_models("llama"))]
    run_json(capsys, ["map-many", *src, "-o", str(run), "--layers", "1"])
    old = {"atlases": [{"name": n, "spec": s} for n, s in zip(atlas_names(src), src)]}
    (run / SERIES).write_text(json.dumps(old))
    r = run_json(capsys, ["map-many", *src, "-o", str(run), "--layers", "1", "--resume"])
    assert [a["reused"] for a in r["atlases"]] == [True, True]
    assert json.loads((run / SERIES).read_text()) == {"format": "neuronmap-series", **old}


def test_map_many_from_a_binary_file(tmp_path, capsys):
    listing = tmp_path / "run.bin"
    listing.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert main(["map-many", "--from", str(listing), "-o", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --from {listing} is not UTF-8 text (byte 0x89 at offset 0): "
                                               "give a text file with one source a line")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../B", "{tmp}/B", "..", "", 3])
def test_trajectory_reads_only_atlases_inside_its_directory(name, tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    src = [str(tiny_models("llama", seed=1)), str(tiny_models("llama"))]
    run_json(capsys, ["map-many", *src, "-o", str(run), "--layers", "1", "--matrices", "up"])
    shutil.copytree(run / atlas_names(src)[0], tmp_path / "B")
    name = name.format(tmp=tmp_path) if isinstance(name, str) else name
    listing = {"format": "neuronmap-series", "atlases": [{"name": name, "spec": "b"},
                                                         {"name": atlas_names(src)[1], "spec": src[1]}]}
    (run / SERIES).write_text(json.dumps(listing))
    assert main(["trajectory", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run / SERIES} lists atlas {name!r}, not a directory inside {run}: a trajectory reads only "
                   "the atlases in its directory; list each by its name there (e.g. 000-step-10)")


def test_trajectory_refuses_a_damaged_series_json(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    src = [str(tiny_models("llama", seed=1)), str(tiny_models("llama"))]
    run_json(capsys, ["map-many", *src, "-o", str(run), "--layers", "1", "--matrices", "up"])
    (run / SERIES).write_text('{"atlases": [')
    assert main(["trajectory", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: cannot read {run / SERIES} (not a map-many listing): run "
                                               f"map-many again, or remove it to compare the atlases in {run} by name")
    (run / SERIES).unlink()  # without it, the atlases by name
    assert [c["name"] for c in run_json(capsys, ["trajectory", str(run)])["checkpoints"]] == atlas_names(src)


def test_paths_are_printed_as_typed(tiny_models, tmp_path, capsys):
    """A checkpoint path with ':dog:' and '[bold]' in it shows literally in the tables, not as an emoji or style."""
    odd = tmp_path / ":dog: [bold]x"
    shutil.copytree(tiny_models("llama", seed=1), odd)
    src = [str(odd), str(tiny_models("llama"))]
    capsys.readouterr()
    assert main(["map-many", *src, "-o", str(tmp_path / "run"), "--layers", "1", "--matrices", "up"]) == 0
    printed = capsys.readouterr().out
    assert str(odd) in printed and "\U0001f436" not in printed
    assert main(["trajectory", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert str(odd) in printed and "\U0001f436" not in printed


def test_resume_after_a_first_run_that_failed_part_way(tiny_models, tmp_path, capsys):
    """What a failed first run leaves (atlases, no series.json) is map-many's own: --resume continues it."""
    run = tmp_path / "run"
    good, gpt2 = str(tiny_models("llama", seed=1)), str(tiny_models("gpt2"))
    assert main(["map-many", good, gpt2, "-o", str(run), "--layers", "1", "--matrices", "gate"]) == 2
    assert sorted(p.name for p in run.iterdir()) == [atlas_names([good])[0]]  # no series.json listing a missing atlas
    src = [good, str(tiny_models("llama"))]
    r = run_json(capsys, ["map-many", *src, "-o", str(run), "--layers", "1", "--matrices", "gate", "--resume"])
    assert [a["reused"] for a in r["atlases"]] == [True, False]
    assert [a["name"] for a in json.loads((run / SERIES).read_text())["atlases"]] == atlas_names(src)
