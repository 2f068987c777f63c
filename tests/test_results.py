"""Results serialize themselves: map, search, show and stats ``to_dict()`` is valid JSON, matches the result, and is what ``--json`` prints.

The atlas is mapped from a tiny checkpoint, then one neuron's up rows get nan entropies and
weight norms (as an atlas written by another tool may hold; neuronmap itself refuses
non-finite weights): each must come out as None.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pandas as pd
import pytest

from conftest import make_tiny, reseal
from neuronmap.atlas.handle import Atlas
from neuronmap.cli import main
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import highlights, track_best
from neuronmap.mapping.part import MapOptions
from neuronmap.atlas.search import records, search, show
from neuronmap.atlas.stats import stats

NAN_LAYER, NAN_NEURON = 1, 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama checkpoint of its own (a fresh model, not the shared one)."""
    d = tmp_path_factory.mktemp("ckpt")
    make_tiny("llama", d)
    return d


@pytest.fixture(scope="module")
def mapped(checkpoint, tmp_path_factory):
    r = map_model(str(checkpoint), tmp_path_factory.mktemp("results") / "atlas", MapOptions(top_k=5))
    t = pq.read_table(r.path / "neurons.parquet")
    hit = pc.and_(pc.and_(pc.equal(t["matrix"], "up"), pc.equal(t["layer"], NAN_LAYER)), pc.equal(t["neuron"], NAN_NEURON))
    for col in ("entropy", "weight_norm"):
        t = t.set_column(t.schema.get_field_index(col), col,
                         pc.if_else(hit, pa.scalar(float("nan"), pa.float32()), t[col]))
    pq.write_table(t, r.path / "neurons.parquet")
    reseal(r.path, "neurons.parquet")
    return r


def round_trip(d: dict) -> dict:
    """What a client reads back: fails on nan, inf or any non-JSON type."""
    return json.loads(json.dumps(d, allow_nan=False))


def cli_json(capsys, *argv) -> dict:
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def same(got, want) -> bool:
    """A JSON value against the Python value it came from: nan is None, a float32 reads back as the same float32,
    arrays and tuples are lists, the rest is equal with the same Python type."""
    if isinstance(want, (list, tuple, np.ndarray)):
        return isinstance(got, list) and len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(want, (float, np.floating)) and math.isnan(want):
        return got is None
    if isinstance(want, np.floating):
        return isinstance(got, float) and type(want)(got) == want
    return got == want and type(got) is type(want.item() if isinstance(want, np.generic) else want)


def assert_records(rows: list[dict], table: pd.DataFrame) -> None:
    assert len(rows) == len(table) and all(list(r) == list(table.columns) for r in rows)
    for col in table.columns:
        for r, want in zip(rows, table[col].to_numpy()):  # by column: a row (iterrows) would widen float32 to float64
            assert same(r[col], want), (col, r[col], want)


# ------------------------------------------------------------------ map


def test_map_to_dict(mapped, capsys, checkpoint, tmp_path):
    d = round_trip(mapped.to_dict())
    assert list(d) == ["path", "n_vectors", "n_rows", "seconds", "vectors_per_s", "family", "dtype", "device", "highlights",
                       "notes"]
    m = mapped.meta
    assert d["path"] == str(mapped.path) and d["n_vectors"] == mapped.n_vectors == 2 * 3 * 24
    assert d["n_rows"] == m["n_rows"] == 2 * mapped.n_vectors and d["seconds"] == round(mapped.seconds, 3)
    assert (d["family"], d["dtype"], d["device"]) == ("llama", m["dtype"], m["device"])
    assert d["vectors_per_s"] == m["timings"]["vectors_per_s"] and d["highlights"] == mapped.highlights and d["notes"] == []
    out = tmp_path / "cli"
    c = cli_json(capsys, "map", checkpoint, "-o", out, "--json")
    again = map_model(str(checkpoint), out, MapOptions(), overwrite=True).to_dict()
    timing = {"seconds", "vectors_per_s"}  # two runs never take the same time
    assert {k: v for k, v in c.items() if k not in timing} == {k: v for k, v in again.items() if k not in timing}
    assert all(isinstance(c[k], float) and c[k] > 0 for k in timing)


def test_highlights_name_neurons_by_id_and_skip_nan():
    tokens = [" coffee", " water", " the", "ing", " tea"]
    ids = np.array([[0], [1], [2], [3], [4], [0]])  # [rows, k]
    lse = np.zeros(6)
    lg = np.log(np.array([[0.9], [np.nan], [0.99], [0.95], [0.2], [0.5]]))  # p = exp(logit - lse)
    best: dict = {}
    track_best(best, tokens, "up", 29, "-", np.arange(100, 106), ids, lg, lse)
    # ' water' is nan, ' the' a stopword, 'ing' no word, ' tea' under 0.3; ' coffee' keeps its best row.
    assert highlights(best) == [{"id": "L29N100", "matrix": "up", "pole": "-", "token": " coffee", "prob": pytest.approx(0.9)}]


# ------------------------------------------------------------------ search


@pytest.mark.parametrize("stored", [False, True])
def test_search_to_dict(mapped, capsys, stored):
    files = Atlas.open(mapped.path)
    r = search(files, ["<7>", "<9>xyz"], top=3, stored=stored)
    d = round_trip(r.to_dict())
    assert list(d) == ["atlas", "method", "n_scored", "top_k", "seconds", "concepts", "results"]
    assert d["atlas"] == str(mapped.path) and d["method"] == r.method == ("stored" if stored else "exact")
    assert d["n_scored"] == r.n_scored == 288 and d["top_k"] == r.top_k == 5 and d["seconds"] == round(r.seconds, 3)
    assert [c["concept"] for c in d["concepts"]] == ["<7>", "<9>xyz"]
    for got, c in zip(d["concepts"], r.concepts):
        assert got == {"concept": c.text, "tokens": [{"id": i, "token": t} for i, t in zip(c.token_ids, c.tokens)],
                       "missing": list(c.missing), "approximate": c.approximate}
    assert d["concepts"][1]["approximate"] and d["concepts"][1]["tokens"] == [{"id": 9, "token": "<9>"}]
    assert len(d["results"]) == 6
    assert_records(d["results"], r.table)
    c = cli_json(capsys, "search", mapped.path, "<7>", "<9>xyz", "--top", "3", *(["--stored"] if stored else []), "--json")
    assert {**c, "seconds": d["seconds"]} == d


def test_records_turn_nan_and_inf_into_none_and_float32_into_its_shortest_decimal():
    t = pd.DataFrame({"p": [0.25, np.nan, np.inf, -np.inf], "probs": [np.array([0.1, np.nan], np.float32)] * 4})
    assert records(t) == [{"p": 0.25, "probs": [0.1, None]}, *[{"p": None, "probs": [0.1, None]}] * 3]


# ------------------------------------------------------------------ show


@pytest.mark.parametrize("neuron, stored", [(f"L{NAN_LAYER}N{NAN_NEURON}", False), ("L0N3", True)])
def test_show_to_dict(mapped, capsys, neuron, stored):
    n = show(Atlas.open(mapped.path), neuron, stored=stored)
    layer, idx = (int(x) for x in neuron[1:].split("N"))
    assert (n.id, n.layer, n.neuron, n.rank_method) == (neuron, layer, idx, "stored" if stored else "exact")
    d = round_trip(n.to_dict())
    assert list(d) == ["atlas", "id", "layer", "neuron", "rank_method", "rows", "evidence"]
    assert d["evidence"] is None  # this atlas has no `record` run; tests/test_record.py covers the filled form
    assert (d["atlas"], d["id"], d["layer"], d["neuron"], d["rank_method"]) == (str(mapped.path), n.id, n.layer, n.neuron,
                                                                                 n.rank_method)
    assert_records(d["rows"], n.rows)
    assert [(r["matrix"], r["pole"]) for r in d["rows"]] == [(m, p) for m in ("gate", "up", "down") for p in "+-"]
    assert cli_json(capsys, "show", mapped.path, neuron, *(["--stored"] if stored else []), "--json") == d


def test_show_of_a_nan_vector_gives_none(mapped):
    d = round_trip(show(Atlas.open(mapped.path), f"L{NAN_LAYER}N{NAN_NEURON}").to_dict())
    up = [r for r in d["rows"] if r["matrix"] == "up"]
    assert [(r["weight_norm"], r["entropy"]) for r in up] == [(None, None), (None, None)]
    assert all(r["weight_norm"] is not None for r in d["rows"] if r["matrix"] != "up")


# ------------------------------------------------------------------ stats


def test_stats_to_dict(mapped, capsys):
    s = stats(Atlas.open(mapped.path))
    d = round_trip(s.to_dict())
    assert list(d) == ["atlas", "n_rows", "layers", "top_tokens", "agreement"]
    assert d["agreement"] is None  # no evidence recorded here; tests/test_record.py covers the filled form
    assert d["atlas"] == str(mapped.path) and d["n_rows"] == s.n_rows == 288
    assert_records(d["layers"], s.layers)
    assert_records(d["top_tokens"], s.top_tokens)
    assert {"class", "token", "token_id", "rows", "share"} <= set(d["top_tokens"][0])
    # The nan up vector makes its layer's mean entropy nan: None in JSON, a number elsewhere.
    means = {(r["layer"], r["matrix"]): r["entropy_mean"] for r in d["layers"]}
    assert means.pop((NAN_LAYER, "up")) is None and all(isinstance(v, float) for v in means.values())
    assert cli_json(capsys, "stats", mapped.path, "--json") == d
    assert cli_json(capsys, "stats", mapped.path, "--layers", "0", "--pole", "+", "--json") == round_trip(
        stats(Atlas.open(mapped.path), layers="0", pole="+").to_dict())


def test_stats_table_names_the_class_of_each_top_token(mapped, capsys):
    assert main(["stats", str(mapped.path)]) == 0
    out = capsys.readouterr().out
    top = out[out.index("most frequent top tokens, all rows"):]
    assert "│ other" in top and out.count("'<") >= 10
