"""map-many and trajectory: a series of checkpoints mapped into one directory, then compared along the run."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from conftest import SERIES_STEPS
from neuronmap.cli import main
from neuronmap.compare.trajectory import SERIES, atlas_names


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
