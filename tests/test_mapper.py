"""map end to end: the atlas contract, readers, options and refusals."""

import json

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


