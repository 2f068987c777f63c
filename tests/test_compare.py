"""compare: neuron-level agreement against brute force, planted changes, the concept level, bad input."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import reseal
from neuronmap.cli import main
from neuronmap.compare import compare, normalise, plot, row_stats
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.testing.synthetic import synthetic_atlas

# ------------------------------------------------------------------ brute force


def brute_js(ids_a, probs_a, ids_b, probs_b) -> float:
    """JS (bits) of one row pair, straight from the documented definition: top-k plus one shared rest bucket."""
    P = dict(zip(map(int, ids_a), map(float, probs_a)))
    Q = dict(zip(map(int, ids_b), map(float, probs_b)))
    P["rest"], Q["rest"] = max(0.0, 1 - sum(probs_a)), max(0.0, 1 - sum(probs_b))
    js = 0.0
    for t in set(P) | set(Q):
        p, q = P.get(t, 0.0), Q.get(t, 0.0)
        m = (p + q) / 2
        js += 0.5 * (p * math.log2(p / m) if p else 0) + 0.5 * (q * math.log2(q / m) if q else 0)
    return js


def brute_layers(a: Path, b: Path, min_prob: float = 0.5) -> pd.DataFrame:
    """Per (matrix, layer, pole): same top-1 share, top-k overlap, JS and confident changes, one row at a time."""
    cols = ["matrix", "layer", "neuron", "pole", "token_ids", "probs"]
    da = pq.read_table(a / "neurons.parquet", columns=cols).to_pandas()
    db = pq.read_table(b / "neurons.parquet", columns=cols).to_pandas()
    m = da.merge(db, on=["matrix", "layer", "neuron", "pole"], suffixes=("_a", "_b"))
    out = []
    for r in m.itertuples():
        k = len(r.token_ids_a)
        out.append({"matrix": r.matrix, "layer": r.layer, "pole": r.pole,
                    "same": r.token_ids_a[0] == r.token_ids_b[0],
                    "overlap": len(set(r.token_ids_a) & set(r.token_ids_b)) / k,
                    "js": brute_js(r.token_ids_a, r.probs_a, r.token_ids_b, r.probs_b),
                    "changed": r.probs_a[0] > min_prob and r.probs_b[0] > min_prob and r.token_ids_a[0] != r.token_ids_b[0]})
    return pd.DataFrame(out).groupby(["matrix", "layer", "pole"]).agg(
        n=("same", "size"), same=("same", "mean"), overlap=("overlap", "mean"), js=("js", "mean"), changed=("changed", "sum"))


def assert_layers_match(c, brute: pd.DataFrame) -> None:
    got = pd.DataFrame(c.neuron.layers).set_index(["matrix", "layer", "pole"]).sort_index()
    brute = brute.sort_index()
    assert list(got.index) == list(brute.index)
    assert (got["n"] == brute["n"]).all()
    np.testing.assert_allclose(got["same_top1"], brute["same"], atol=1e-12)
    np.testing.assert_allclose(got["topk_overlap"], brute["overlap"], atol=1e-6)
    np.testing.assert_allclose(got["js"], brute["js"], atol=1e-5)
    assert (got["changed"] == brute["changed"]).all()


# ------------------------------------------------------------------ row_stats


def test_row_stats_matches_brute_force_js_on_random_rows():
    rng = np.random.default_rng(0)
    n, k = 300, 6
    ia = np.stack([rng.choice(12, k, replace=False) for _ in range(n)])  # small id range: many partial overlaps
    ib = np.stack([rng.choice(12, k, replace=False) for _ in range(n)])
    pa = -np.sort(-rng.dirichlet(np.ones(k + 1), n)[:, :k], axis=1).astype(np.float32)
    pb = -np.sort(-rng.dirichlet(np.ones(k + 1), n)[:, :k], axis=1).astype(np.float32)
    same, overlap, js = row_stats(ia, pa, ib, pb)
    assert (same == (ia[:, 0] == ib[:, 0])).all()
    np.testing.assert_allclose(overlap, [len(set(a) & set(b)) / k for a, b in zip(ia, ib)], atol=1e-6)
    np.testing.assert_allclose(js, [brute_js(*r) for r in zip(ia, pa, ib, pb)], atol=2e-6)
    assert 0.05 < js.mean() < 0.9  # the rows really differ, and by less than the maximum


def test_row_stats_extremes():
    ia, ib = np.array([[1, 2]]), np.array([[3, 4]])
    p = np.array([[0.6, 0.4]], np.float32)  # no rest mass: disjoint supports give the maximum, 1 bit
    assert [float(x[0]) for x in row_stats(ia, p, ia, p)] == [1.0, 1.0, 0.0]
    assert float(row_stats(ia, p, ib, p)[2][0]) == pytest.approx(1.0)


# ------------------------------------------------------------------ synthetic atlases


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    return synthetic_atlas(d / "a", n_layers=4, d_mlp=40, d_vocab=400, k=6, seed=3)


def test_identical_atlases_agree_fully(syn, tmp_path):
    twin = synthetic_atlas(tmp_path / "twin", n_layers=4, d_mlp=40, d_vocab=400, k=6, seed=3)
    c = compare(str(syn), str(twin), top=0)
    assert c.level == "neuron" and c.warnings == []
    assert len(c.neuron.layers) == 4 * 3 * 2
    for r in c.neuron.layers + c.neuron.overall:
        assert (r["same_top1"], r["topk_overlap"], r["js"], r["changed"]) == (1.0, 1.0, 0.0, 0)
    assert c.neuron.changed == [] and c.neuron.n_gained == 0 and c.neuron.n_lost == 0


def test_rows_in_another_order_still_pair_up(syn, tmp_path):
    shuffled = tmp_path / "shuffled"
    shutil.copytree(syn, shuffled)
    t = pq.read_table(syn / "neurons.parquet")
    pq.write_table(t.take(np.random.default_rng(0).permutation(len(t))), shuffled / "neurons.parquet")
    reseal(shuffled, "neurons.parquet")
    c = compare(str(syn), str(shuffled))
    assert c.neuron.overall[-1]["same_top1"] == 1.0 and c.neuron.overall[-1]["js"] == 0.0


def test_planted_changes_are_found_exactly(syn, tmp_path):
    t = pq.read_table(syn / "neurons.parquet", columns=["matrix", "id", "layer", "pole", "probs"]).to_pandas()
    t["p1"] = t["probs"].map(lambda p: p[0])
    confident = t[t["p1"] > 0.6].sample(7, random_state=1)
    unsure = t[t["p1"] < 0.4].sample(3, random_state=1)
    planted = {(r.matrix, r.id, r.pole): 300 + i for i, r in enumerate(confident.itertuples())}
    planted |= {(r.matrix, r.id, r.pole): 350 + i for i, r in enumerate(unsure.itertuples())}
    b = synthetic_atlas(tmp_path / "b", n_layers=4, d_mlp=40, d_vocab=400, k=6, seed=3, changes=planted)
    c = compare(str(syn), str(b), top=0)

    assert {(r["matrix"], r["id"], r["pole"]) for r in c.neuron.changed} == {(r.matrix, r.id, r.pole) for r in confident.itertuples()}
    assert c.neuron.n_changed == 7
    assert {r["token_id"] for r in c.neuron.gained} == set(range(300, 307))  # the unsure rows are no confident concept
    for r in c.neuron.layers:
        hits = sum(1 for (m, nid, p) in planted if m == r["matrix"] and p == r["pole"] and nid.startswith(f"L{r['layer']}N"))
        assert r["same_top1"] == pytest.approx(1 - hits / 40)
        assert r["topk_overlap"] == pytest.approx(1 - hits / (40 * 6))  # only the top token moved, to one not in the row
    # Lost: A's confident tokens that no confident row of B has, counted by hand.
    tb = pq.read_table(b / "neurons.parquet", columns=["token_ids", "probs"]).to_pandas()
    ta = pq.read_table(syn / "neurons.parquet", columns=["token_ids", "probs"]).to_pandas()
    conf = lambda d: {int(i[0]) for i, p in zip(d["token_ids"], d["probs"]) if p[0] > 0.5}  # noqa: E731
    assert {r["token_id"] for r in c.neuron.lost} == conf(ta) - conf(tb)
    assert c.neuron.n_lost == len(conf(ta) - conf(tb))
    assert_layers_match(c, brute_layers(syn, b))


def test_plot_writes_a_png_and_nothing_else(syn, tmp_path):
    b = synthetic_atlas(tmp_path / "b", n_layers=4, d_mlp=40, d_vocab=400, k=6, seed=3, change_rate=0.3)
    png = tmp_path / "plots" / "cmp.png"
    png.parent.mkdir()
    plot(compare(str(syn), str(b)), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_mode & 0o044 == 0o044  # readable by others, like any file the user writes
    assert [p.name for p in png.parent.iterdir()] == ["cmp.png"]
    with pytest.raises(NeuronmapError, match=r"give a file name ending in \.png"):
        plot(compare(str(syn), str(b)), tmp_path / "cmp.jpg")


def test_comparisons_serialize_and_are_what_the_cli_prints(syn, tmp_path, capsys):
    b = synthetic_atlas(tmp_path / "b", n_layers=4, d_mlp=40, d_vocab=400, k=6, seed=3, change_rate=0.3)
    for level in ("neuron", "concept"):
        c = compare(str(syn), str(b), level=level, top=3)
        d = c.to_dict()
        assert json.loads(json.dumps(d, allow_nan=False)) == d
        assert d["level"] == level and d["a"]["n_layers"] == 4 and (level in d) and len(d) == 8
        assert main(["compare", str(syn), str(b), "--level", level, "--top", "3", "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed.pop("seconds") >= 0 and d.pop("seconds") >= 0  # wall time: the one field that differs
        assert printed == d


def test_cli_defaults_are_the_api_defaults():
    from neuronmap.cli import build_parser

    args = build_parser().parse_args(["compare", "a", "b"])
    defaults = inspect.signature(compare).parameters
    assert (args.top, args.min_prob, args.level) == (defaults["top"].default, defaults["min_prob"].default,
                                                     defaults["level"].default)
    assert (args.top_k, args.device, args.dtype) == (MapOptions().top_k, MapOptions().device, MapOptions().dtype)


# ------------------------------------------------------------------ bad input


def test_different_shapes_refuse_neuron_level_and_offer_concept(syn, tmp_path):
    other = synthetic_atlas(tmp_path / "other", n_layers=3, d_mlp=40, d_vocab=400, k=6, seed=3)
    with pytest.raises(NeuronmapError) as e:
        compare(str(syn), str(other), level="neuron")
    assert "cannot compare neuron by neuron" in str(e.value) and "n_layers 4 vs 3" in str(e.value)
    assert "use level=concept" in str(e.value) and "\n" not in str(e.value)
    c = compare(str(syn), str(other))  # auto falls back to concepts and says why
    assert c.level == "concept" and "n_layers 4 vs 3" in c.reason


def test_different_tokenizer_of_same_size_is_caught(syn, tmp_path):
    other = tmp_path / "renamed"
    shutil.copytree(syn, other)
    v = pq.read_table(other / "vocab.parquet").to_pandas()
    v.loc[5, "token"] = " something else"
    pq.write_table(pq.read_table(other / "vocab.parquet").from_pandas(v, preserve_index=False), other / "vocab.parquet")
    reseal(other, "vocab.parquet")
    with pytest.raises(NeuronmapError, match="token strings differ"):
        compare(str(syn), str(other), level="neuron")


def test_different_decode_options_warn_and_proceed(syn, tmp_path, capsys):
    k8 = synthetic_atlas(tmp_path / "k8", n_layers=4, d_mlp=40, d_vocab=400, k=8, seed=3)
    c = compare(str(syn), str(k8))
    assert c.level == "neuron" and c.neuron.k == 6
    assert c.warnings == ["decode options differ between A and B: top_k 6 vs 8 (A vs B); comparing anyway, "
                          "top-k overlap over the first 6 tokens"]
    assert main(["compare", str(syn), str(k8)]) == 0
    assert "warning: decode options differ between A and B: top_k 6 vs 8" in capsys.readouterr().err


def test_unknown_paths_say_so_in_one_line(syn, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope"), str(syn)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nope'} does not exist: pass an atlas directory") and err.count("\n") == 1
    with pytest.raises(NeuronmapError, match=r"^runs/tuned is not an atlas directory \(no such path\), nor a usable model source: "):
        compare(str(syn), "runs/tuned")  # looks like a hub id, which is not cached
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeuronmapError, match="is neither an atlas .no meta.json. nor a checkpoint directory"):
        compare(str(tmp_path / "empty"), str(syn))
    with pytest.raises(NeuronmapError, match="is out of range: the model has 4 layers"):
        compare(str(syn), str(syn), layers="-1,7")


# ------------------------------------------------------------------ tiny real models


def test_per_layer_agreement_matches_brute_force_on_tiny_models(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path / "cache"))
    base = tiny_models("llama")
    model = AutoModelForCausalLM.from_pretrained(base)  # a fresh copy to perturb; the checkpoint stays as it is
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)  # a perturbed copy: some top tokens move, most stay
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    notes = []
    c = compare(str(base), str(tuned), options=MapOptions(top_k=5, dtype="float32", device="cpu"), progress=notes.append)
    assert len(notes) == 2 and all("mapping" in n for n in notes)
    assert 0.1 < c.neuron.overall[-1]["same_top1"] < 0.95
    assert_layers_match(c, brute_layers(c.a.path, c.b.path))
    part = map_model(str(base), tmp_path / "part", MapOptions(layers="1", matrices="up", top_k=5, dtype="float32", device="cpu")).path
    with pytest.raises(NeuronmapError, match=r"^A \(.*part\): the atlas has no layer 0 \(it was mapped with layers 1\): choose among those, or re-map with more layers=\.\.\.$"):
        compare(str(part), str(c.b.path), layers="0")
    with pytest.raises(NeuronmapError, match=r"^A \(.*part\): the atlas has no 'gate' vectors \(it was mapped with up\): choose among those, or re-map with more matrices=\.\.\.$"):
        compare(str(part), str(c.b.path), matrices="gate")
    again = compare(str(base), str(tuned), options=MapOptions(top_k=5, dtype="float32", device="cpu"), progress=notes.append)
    assert len(notes) == 2 and again.a.path == c.a.path  # cached: mapped once
    sub = compare(str(base), str(tuned), matrices="up", layers="1", options=MapOptions(top_k=5, dtype="float32", device="cpu"),
                  progress=notes.append)
    assert len(notes) == 2 and sub.b.path == c.b.path and sub.matrices == ["up"]  # the full cached atlas serves a subset
    assert [(r["layer"], r["matrix"]) for r in sub.neuron.layers] == [(1, "up"), (1, "up")]


# ------------------------------------------------------------------ real models


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compare-cache")


def test_finetuned_demo_pair(demo_checkpoint, demo_finetuned, real_cache, monkeypatch, tmp_path):
    # The fine-tune trains the MLPs of layers 20-29 only (embedding and head frozen): layers 0 and 19 must decode
    # exactly as before, layers 20 and 29 must have moved.
    monkeypatch.setenv("NEURONMAP_CACHE", str(real_cache))
    c = compare(str(demo_checkpoint), str(demo_finetuned), matrices="up", layers="0,19,20,29", top=0)
    assert c.level == "neuron" and c.matrices == ["up"] and c.warnings == []
    assert c.neuron.overall[-1]["n"] == 4 * 1536 * 2
    for r in c.neuron.layers:
        if r["layer"] in (0, 19):
            assert (r["same_top1"], r["topk_overlap"], r["js"]) == (1.0, 1.0, 0.0)
        else:
            assert 0.5 < r["same_top1"] < 1.0 and r["js"] > 0
    assert c.neuron.n_changed > 0 and len(c.neuron.changed) == c.neuron.n_changed
    assert {r["layer"] for r in c.neuron.changed} <= {20, 29}
    assert_layers_match(c, brute_layers(c.a.path, c.b.path))
    png = tmp_path / "ft.png"
    assert main(["compare", str(demo_checkpoint), str(demo_finetuned), "--matrices", "up", "--layers", "0,19,20,29",
                 "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_cross_family_concepts(demo_gguf, gemma_gguf, real_cache, monkeypatch):
    monkeypatch.setenv("NEURONMAP_CACHE", str(real_cache))
    c = compare(str(demo_gguf), str(gemma_gguf), matrices="up", layers="-1", top=0)
    assert c.level == "concept" and "d_vocab 49152 vs 262144" in c.reason
    with pytest.raises(NeuronmapError, match="cannot compare neuron by neuron.*n_layers 30 vs 18"):
        compare(str(demo_gguf), str(gemma_gguf), matrices="up", layers="-1", level="neuron")
    # Brute force: the concept sets straight from the atlases.
    sets = []
    for side in (c.a, c.b):
        t = pq.read_table(side.path / "neurons.parquet", columns=["matrix", "layer", "tokens", "probs"]).to_pylist()
        sets.append({normalise(r["tokens"][0]) for r in t if r["matrix"] == "up" and r["probs"][0] > 0.5} - {""})
    a, b = sets
    k = c.concept
    assert (k.n_a, k.n_b, k.n_shared) == (len(a), len(b), len(a & b))
    assert k.n_shared > 10  # the two families share real concepts
    assert k.jaccard == pytest.approx(len(a & b) / len(a | b))
    assert k.coverage_a == pytest.approx(len(a & b) / len(a)) and k.coverage_b == pytest.approx(len(a & b) / len(b))
    assert {r["concept"] for r in k.shared} == a & b
    assert {r["concept"] for r in k.only_a} == a - b and {r["concept"] for r in k.only_b} == b - a
    for r in k.shared:
        assert r["a"]["depth"] == r["b"]["depth"] == 1.0  # both sides' last layer
        assert normalise(r["a"]["token"]) == normalise(r["b"]["token"]) == r["concept"]
