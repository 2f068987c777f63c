"""map end to end: the atlas contract, readers, options and refusals."""

import hashlib
import json
import re
import shutil

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from neuronmap.atlas.format import read_meta
from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions

COLUMNS = ["matrix", "layer", "neuron", "id", "pole", "token_ids", "tokens", "probs", "logits", "logsumexp", "entropy", "weight_norm"]


def test_demo_atlas_is_complete_and_readable(demo_atlas):
    meta = read_meta(demo_atlas)
    assert meta["n_vectors"] == 30 * 1536 * 3
    assert meta["n_rows"] == 30 * 1536 * 3 * 2
    assert meta["source"]["files"][0]["sha256"] and len(meta["source"]["files"][0]["sha256"]) == 64
    assert meta["decode"]["matrices"] == ["gate", "up", "down"] and meta["decode"]["poles"] == ["+", "-"]
    path = str(demo_atlas / "neurons.parquet")
    counts = duckdb.sql(f"select matrix, pole, count(*) n from '{path}' group by all").fetchall()
    assert sorted(counts) == sorted((m, p, 30 * 1536) for m in ("gate", "up", "down") for p in ("+", "-"))
    assert list(pq.read_schema(path).names) == COLUMNS
    assert len(pd.read_parquet(path, columns=["id"])) == meta["n_rows"]
    df = pl.read_parquet(path).filter((pl.col("id") == "L29N750") & (pl.col("matrix") == "up") & (pl.col("pole") == "+"))
    row = df.row(0, named=True)
    assert row["tokens"][0] == " coffee" and row["probs"][0] > 0.9
    # probs are exp(logits - logsumexp), sorted, and sum to at most 1.
    assert abs(row["probs"][0] - float(torch.exp(torch.tensor(row["logits"][0] - row["logsumexp"])))) < 1e-5
    assert row["probs"] == sorted(row["probs"], reverse=True) and sum(row["probs"]) <= 1.0 + 1e-5


def test_layers_matrices_and_topk_options(tiny_models, tmp_path):
    path = tiny_models("llama")
    r = map_model(str(path), tmp_path / "a", MapOptions(layers="1", matrices="down,up", top_k=3))
    t = pq.read_table(r.path / "neurons.parquet").to_pandas()
    assert set(t.layer) == {1} and set(t.matrix) == {"up", "down"} and set(t.pole) == {"+", "-"}
    assert t.token_ids.map(len).eq(3).all()
    assert len(t) == 24 * 2 * 2 and r.n_vectors == 48


@pytest.mark.slow  # maps a layer of the real demo model, and a cold torch.compile
def test_compiled_kernel_maps_like_the_eager_one(tmp_path):
    opts = dict(layers="29", matrices="up", dtype="float32")  # real weights, 49,152-token vocabulary; --kernel: fp32
    a = map_model(None, tmp_path / "eager", MapOptions(kernel="eager", **opts))
    b = map_model(None, tmp_path / "compiled", MapOptions(kernel="compiled", **opts))
    assert a.meta["kernel"] == "eager" and b.meta["kernel"] == "compiled"
    ta, tb = (pq.read_table(r.path / "neurons.parquet").to_pandas() for r in (a, b))
    assert ta.token_ids.map(list).tolist() == tb.token_ids.map(list).tolist()
    assert (ta.logsumexp - tb.logsumexp).abs().max() < 1e-4 and (ta.entropy - tb.entropy).abs().max() < 1e-4


def test_existing_output_is_refused_then_overwritten(tiny_models, tmp_path, capsys):
    path = tiny_models("llama")
    out = tmp_path / "atlas"
    assert main(["map", str(path), "-o", str(out), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["n_vectors"] == 2 * 3 * 24
    before = (out / "meta.json").read_text()
    assert main(["map", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} already exists (an atlas): pass --overwrite to replace it" in err
    assert (out / "meta.json").read_text() == before
    assert main(["map", str(path), "-o", str(out), "--overwrite", "--layers", "0"]) == 0
    assert read_meta(out)["decode"]["layers"] == [0]
    assert [p.name for p in tmp_path.iterdir()] == ["atlas"]


@pytest.mark.parametrize("argv, message", [
    (["--layers", "0-5"], "--layers '0-5' is out of range: the model has 2 layers, 0-1"),
    (["--layers", "x"], "malformed --layers 'x'"),
    (["--top-k", "0"], "argument --top-k: 0 is out of range: expected a whole number >= 1"),
    (["--top-k", "65"], "--top-k 65 is out of range: expected 1 to 64"),
    (["--matrices", "gate,proj"], "unknown matrix 'proj'"),
    (["--norm", "layer"], "unknown --norm 'layer'"),
    (["--kernel", "fast"], "unknown --kernel 'fast': expected one of auto, eager, compiled"),
])
def test_bad_options(argv, message, tiny_models, tmp_path, capsys):
    path = tiny_models("llama")
    assert main(["map", str(path), "-o", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err  # one line, the CLI's form
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_gate_on_an_ungated_model(tiny_models, tmp_path):
    path = tiny_models("gpt2")
    with pytest.raises(NeuronmapError, match="this model has no 'gate' matrix"):
        map_model(str(path), tmp_path / "o", MapOptions(matrices="gate"))


def test_cuda_device(tiny_models, tmp_path, capsys):
    path = tiny_models("llama")
    code = main(["map", str(path), "-o", str(tmp_path / "out"), "--device", "cuda"])
    if torch.cuda.is_available():
        assert code == 0 and read_meta(tmp_path / "out")["device"].startswith("cuda")
    else:
        assert code == 2 and "no CUDA GPU is available to torch: use --device cpu or auto" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []


def test_interrupted_run_leaves_no_atlas_only_its_finished_parts(tiny_models, tmp_path):
    path = tiny_models("llama")
    calls = []

    def boom(done, total, vectors):
        calls.append(done)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        map_model(str(path), tmp_path / "out", MapOptions(), progress=boom)
    assert calls == [0, 1, 2]  # first the parts already done (none), then one call per finished part
    assert [p.name for p in tmp_path.iterdir()] == [".out.parts"]  # no atlas, nothing half-written
    assert sorted(p.name for p in (tmp_path / ".out.parts").iterdir()) == ["gate-L0.parquet", "manifest.json", "up-L0.parquet"]




# ------------------------------------------------------------------ resume: each part checked against its manifest entry


@pytest.fixture(scope="module")
def tiny_ref(tiny_models, tmp_path_factory):
    """A tiny llama and its uninterrupted atlas (6 parts: gate, up, down of layers 0 and 1)."""
    ck = tiny_models("llama")
    return ck, map_model(str(ck), tmp_path_factory.mktemp("ref") / "atlas").path


def _interrupted(ck, out, after: int, **options):
    """Map into ``out`` and stop it (Ctrl-C) once ``after`` parts are written; return its parts directory."""
    def stop(done, total, vectors):
        if done == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        map_model(str(ck), out, MapOptions(**options), progress=stop)
    return out.parent / f".{out.name}.parts"


def _same_rows(a, b) -> None:
    ta, tb = pq.read_table(a / "neurons.parquet"), pq.read_table(b / "neurons.parquet")
    for col in ("matrix", "layer", "neuron", "pole", "token_ids"):
        assert ta[col].equals(tb[col]), col
    pa_, pb = ta["probs"].combine_chunks().flatten().to_numpy(), tb["probs"].combine_chunks().flatten().to_numpy()
    assert abs(pa_ - pb).max() < 1e-5  # another exact kernel: the same atlas to ~1e-6


def _manifest(parts) -> dict:
    return json.loads((parts / "manifest.json").read_text())


def test_resume_compares_resolved_layers_and_precision_not_option_text_or_kernel(tiny_ref, tmp_path, capsys):
    from neuronmap.decode import fused

    ck, ref = tiny_ref
    first = "split" if fused.available(torch.device("cpu")) else "float32"  # split: the AVX512-BF16 kernel
    out = tmp_path / "atlas"
    parts = _interrupted(ck, out, 3, layers="0-1", dtype=first)
    m = _manifest(parts)
    assert m["layers"] == [0, 1] and m["precision"] == "exact" and "kernel" not in m and "options" not in m
    assert {e["sha256"] for e in m["parts"].values()} == {hashlib.sha256((parts / n).read_bytes()).hexdigest()
                                                         for n in m["parts"]}
    # Another exact dtype, and layers spelled otherwise: both give the same atlas, so the parts are reused.
    assert main(["map", str(ck), "-o", str(out), "--layers", "0,1", "--dtype", "float32", "--resume"]) == 0
    assert f"resuming: reusing 3 of 6 parts from {parts}" in capsys.readouterr().err
    _same_rows(out, ref)
    assert read_meta(out)["resumed_parts"] == 3


@pytest.mark.parametrize("options, says", [
    ({"dtype": "bfloat16"}, "precision was 'exact', now 'bfloat16 screening, 16 candidates'"),
    ({"layers": "0"}, "layers was [0, 1], now [0]"),
    ({"top_k": 5}, "top_k was 10, now 5"),
])
def test_resume_refuses_what_changes_results(options, says, tiny_ref, tmp_path):
    ck, _ = tiny_ref
    out = tmp_path / "atlas"
    parts = _interrupted(ck, out, 2)
    with pytest.raises(NeuronmapError, match=re.escape(f"cannot resume the map into {out}: the parts in {parts} were "
                                                       f"made from other weights or options ({says}")):
        map_model(str(ck), out, MapOptions(**options), resume=True)
    assert len(list(parts.glob("*.parquet"))) == 2  # kept for the right command


def test_resume_decodes_again_a_part_replaced_by_another_layers_part(tiny_ref, tmp_path, capsys):
    ck, ref = tiny_ref
    out = tmp_path / "atlas"
    parts = _interrupted(ck, out, 4)  # gate, up, down of layer 0, gate of layer 1
    shutil.copy(parts / "gate-L0.parquet", parts / "gate-L1.parquet")
    r = map_model(str(ck), out, resume=True)
    assert r.notes == [f"resuming: reusing 3 of 6 parts from {parts}",
                       (f"decoding again 1 part of {parts} that failed their check: gate-L1.parquet (its sha256 "
                        "differs from the one recorded when it was written)")]
    _same_rows(out, ref)
    # What stats, show --stored and compare read is the right atlas, not layer 0 twice.
    capsys.readouterr()
    assert main(["stats", str(out), "--json"]) == 0 and main(["stats", str(ref), "--json"]) == 0
    got, want = capsys.readouterr().out.strip().split("\n{")
    assert json.loads(got)["layers"] == json.loads("{" + want)["layers"]
    assert main(["show", str(out), "L1N3", "--stored"]) == 0 and main(["compare", str(ref), str(out)]) == 0


def test_resume_decodes_again_a_part_from_a_top_k_5_run(tiny_ref, tmp_path):
    ck, ref = tiny_ref
    out, other = tmp_path / "atlas", tmp_path / "k5"
    parts, parts5 = _interrupted(ck, out, 4), _interrupted(ck, other, 4, top_k=5)
    shutil.copy(parts5 / "gate-L1.parquet", parts / "gate-L1.parquet")
    r = map_model(str(ck), out, resume=True)
    assert "gate-L1.parquet (its sha256 differs from the one recorded when it was written)" in r.notes[1]
    # The same with its manifest entry copied too: the entry's own top_k gives it away.
    parts = _interrupted(ck, tmp_path / "again", 4)
    shutil.copy(parts5 / "gate-L1.parquet", parts / "gate-L1.parquet")
    m = _manifest(parts)
    m["parts"]["gate-L1.parquet"] = _manifest(parts5)["parts"]["gate-L1.parquet"]
    (parts / "manifest.json").write_text(json.dumps(m))
    r = map_model(str(ck), tmp_path / "again", resume=True)
    assert r.notes[1].endswith("gate-L1.parquet (it was decoded with top_k 5, this map uses 10)")
    for a in (out, tmp_path / "again"):
        _same_rows(a, ref)
        assert set(pq.read_table(a / "neurons.parquet")["token_ids"].combine_chunks().value_lengths().to_pylist()) == {10}


def test_a_part_the_manifest_does_not_list_is_decoded_again(tiny_ref, tmp_path):
    """A part file the manifest does not list (copied in by hand, or its entry lost)."""
    ck, ref = tiny_ref
    out = tmp_path / "atlas"
    parts = _interrupted(ck, out, 3)
    m = _manifest(parts)
    del m["parts"]["down-L0.parquet"]
    (parts / "manifest.json").write_text(json.dumps(m))
    r = map_model(str(ck), out, resume=True)
    assert r.notes == [f"resuming: reusing 2 of 6 parts from {parts}",
                       (f"decoding again 1 part of {parts} that failed their check: down-L0.parquet (the manifest "
                        "does not list it)")]
    _same_rows(out, ref)


def test_a_forged_manifest_entry_is_caught_when_the_parts_are_joined(tiny_ref, tmp_path, capsys):
    """A part and its manifest entry both replaced: the rows themselves are checked before they enter the atlas."""
    ck, ref = tiny_ref
    out = tmp_path / "atlas"
    parts = _interrupted(ck, out, 4)
    shutil.copy(parts / "gate-L0.parquet", parts / "gate-L1.parquet")
    m = _manifest(parts)
    m["parts"]["gate-L1.parquet"]["sha256"] = hashlib.sha256((parts / "gate-L1.parquet").read_bytes()).hexdigest()
    (parts / "manifest.json").write_text(json.dumps(m))
    assert main(["map", str(ck), "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {parts}/gate-L1.parquet holds layer [0], expected [1]: it is not the part it should be; "
                   "run the same command again with --resume (the part is decoded again)")
    assert not out.exists()
    r = map_model(str(ck), out, resume=True)
    assert "gate-L1.parquet (the manifest does not list it)" in r.notes[1]
    _same_rows(out, ref)


@pytest.mark.parametrize("damage, says", [
    (lambda p: (p / "manifest.json").write_text("{oops"), "manifest.json is not readable JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)),"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing,"),
    (lambda p: (p / "manifest.json").write_text(json.dumps({k: v for k, v in _manifest(p).items() if k != "manifest"})),
     "manifest.json was written by an earlier neuronmap, which kept no sha256 of the parts,"),
])
def test_resume_refuses_a_manifest_it_cannot_check_the_parts_with(damage, says, tiny_ref, tmp_path, capsys):
    ck, ref = tiny_ref
    out = tmp_path / "atlas"
    parts = _interrupted(ck, out, 3)
    damage(parts)
    assert main(["map", str(ck), "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot resume the map into {out}: {parts}/{says} so the 3 parts in {parts} cannot be "
                   "checked; run the command without --resume to remove them and start over")
    assert len(list(parts.glob("*.parquet"))) == 3 and not out.exists()
    r = map_model(str(ck), out)
    assert r.notes == [f"removed 3 parts of an earlier interrupted map into {out} (--resume continues one instead)"]
    _same_rows(out, ref)
