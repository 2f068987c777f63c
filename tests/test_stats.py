"""stats: token classes, per-layer summaries against a plain recomputation, the plot, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from neuronmap.atlas.handle import Atlas
from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.atlas.stats import TOKEN_CLASSES, plot, stats, token_class


@pytest.fixture(scope="module")
def tiny_atlas(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("stats") / "llama"
    map_model(str(tiny_models("llama")), d, MapOptions(top_k=5))
    return d


@pytest.mark.parametrize("token, cls", [
    (" dog", "word"), (" été", "word"), ("ing", "subword"), ("Dog", "subword"), (" 1999", "number"), ("7", "number"),
    (".", "punctuation"), (" (", "punctuation"), (".\n", "punctuation"), (" ", "whitespace"), ("\n\n", "whitespace"),
    ("", "whitespace"), ("<|im_end|>", "other"), ("\\xe2", "other"), (" x2", "other"), ("  dog", "other"),
])
def test_token_class(token, cls):
    assert token_class(token) == cls


def test_stats_match_a_plain_recomputation(tiny_atlas):
    s = stats(Atlas.open(tiny_atlas))
    rows = pq.read_table(tiny_atlas / "neurons.parquet").to_pandas()
    assert s.n_rows == len(rows) == 2 * 3 * 24 * 2
    assert [(r.layer, r.matrix) for r in s.layers.itertuples()] == [(l, m) for l in (0, 1) for m in ("gate", "up", "down")]
    for r in s.layers.itertuples():
        g = rows[(rows["layer"] == r.layer) & (rows["matrix"] == r.matrix)]
        top1 = np.array([p[0] for p in g["probs"]])
        assert r.rows == len(g) == 48
        assert r.confident == pytest.approx(float((top1 > 0.5).mean()))
        assert r.entropy_p50 == pytest.approx(float(np.quantile(g["entropy"], 0.5)), rel=1e-5)
        assert r.entropy_p10 == pytest.approx(float(np.quantile(g["entropy"], 0.1)), rel=1e-5)
        classes = [token_class(t[0]) for t in g["tokens"]]
        for k in TOKEN_CLASSES:
            assert getattr(r, k) == pytest.approx(classes.count(k) / len(g))
        counts = g["tokens"].map(lambda t: t[0]).value_counts()
        assert r.top_tokens[0][1] == counts.iloc[0] and len(r.top_tokens) <= 3
    counts = rows["tokens"].map(lambda t: t[0]).value_counts()
    assert list(s.top_tokens["rows"]) == list(counts.iloc[:len(s.top_tokens)])
    assert s.top_tokens["share"].iloc[0] == pytest.approx(counts.iloc[0] / len(rows))


def test_stats_filters(tiny_atlas):
    s = Atlas.open(tiny_atlas).stats(matrices="down", layers="1", pole="+")
    assert list(s.layers["matrix"]) == ["down"] and list(s.layers["layer"]) == [1] and s.n_rows == 24


def test_plot_writes_a_png_and_no_temp_file(tiny_atlas, tmp_path):
    out = plot(stats(Atlas.open(tiny_atlas)), tmp_path / "s.png", "tiny")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]
    with pytest.raises(NeuronmapError, match="the plot is a PNG; give a file name ending in .png"):
        plot(stats(Atlas.open(tiny_atlas)), tmp_path / "s.jpg")
    with pytest.raises(NeuronmapError, match="does not exist"):
        plot(stats(Atlas.open(tiny_atlas)), tmp_path / "nope" / "s.png")


def test_cli_stats(tiny_atlas, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["stats", str(tiny_atlas), "--plot", str(png), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_rows"] == 288 and len(data["layers"]) == 6 and png.is_file()
    assert {"confident", "entropy_p50", "word", "punctuation", "top_tokens"} <= set(data["layers"][0])
    assert main(["stats", str(tiny_atlas), "--layers", "0"]) == 0
    out = capsys.readouterr().out
    assert "confident" in out and "most frequent top tokens" in out
    assert main(["stats", str(tmp_path)]) == 2
    assert "is not a neuronmap atlas" in capsys.readouterr().err
