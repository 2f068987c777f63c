"""browse (layer rows, confident words) and similar (cosine over the weights), against independent computations."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from neuronmap.atlas.handle import Atlas
from neuronmap.atlas.browse import confident_words, layer_rows
from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.similar import similar
from neuronmap.atlas.stats import token_class
from tests.conftest import WORDS


def _all_rows(atlas) -> list[dict]:
    return pq.read_table(Atlas.open(atlas).neurons).to_pylist()


def test_layer_rows_sorts_filters_and_pages_as_the_rows_say(atlas):
    rows = [r for r in _all_rows(atlas) if r["layer"] == 1 and r["matrix"] == "up"]
    want = sorted(rows, key=lambda r: (-r["probs"][0], r["neuron"], r["pole"] == "-"))
    got = layer_rows(Atlas.open(atlas), 1, "up", limit=1000)
    assert got.n_matching == len(rows) == 48
    assert got.rows["id"].tolist() == [r["id"] for r in want]
    assert got.rows["top_token"].tolist() == [r["tokens"][0] for r in want]
    # entropy: lowest first by default; asc/desc flips it.
    ent = layer_rows(Atlas.open(atlas), 1, "up", sort="entropy", limit=1000).rows["entropy"].to_numpy()
    assert (np.diff(ent) >= 0).all()
    ent_desc = layer_rows(Atlas.open(atlas), 1, "up", sort="entropy", descending=True, limit=1000).rows["entropy"].to_numpy()
    assert (np.diff(ent_desc) <= 0).all()
    # pages tile the whole ordering
    pages = [layer_rows(Atlas.open(atlas), 1, "up", offset=o, limit=10).rows["id"].tolist() for o in range(0, 50, 10)]
    assert sum(pages, []) == got.rows["id"].tolist()
    minus = layer_rows(Atlas.open(atlas), 1, "up", pole="-", limit=1000)
    assert set(minus.rows["pole"]) == {"-"} and minus.n_matching == 24


def test_layer_rows_token_class_filter_matches_token_class(atlas):
    rows = [r for r in _all_rows(atlas) if r["layer"] == 0 and r["matrix"] == "down"]
    classes = {token_class(r["tokens"][0]) for r in rows}
    for cls in classes:
        got = layer_rows(Atlas.open(atlas), 0, "down", token_class=cls, limit=1000)
        assert got.n_matching == sum(token_class(r["tokens"][0]) == cls for r in rows) > 0
        assert set(got.rows["token_class"]) == {cls}


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer=7), "layers='7' is out of range: the model has 2 layers, 0-1"),
    (dict(matrix="mlp"), "unknown matrix 'mlp'"),
    (dict(sort="size"), "unknown sort 'size': expected one of confidence, entropy, norm, neuron"),
    (dict(token_class="noun"), "unknown token class 'noun': expected one of word, subword"),
    (dict(limit=0), "page offset 0 and limit 0 out of range"),
])
def test_layer_rows_bad_input(atlas, kwargs, message):
    args = dict(layer=0, matrix="up") | kwargs
    with pytest.raises(NeuronmapError, match=re.escape(message)):
        layer_rows(Atlas.open(atlas), **args)


def test_confident_words_are_the_best_row_per_word(worded):
    rows = _all_rows(worded)
    assert {r["tokens"][0] for r in rows} & set(WORDS)  # the test has words to find
    best: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (-r["probs"][0], r["layer"], r["neuron"], r["matrix"], r["pole"])):
        t = r["tokens"][0]
        if r["probs"][0] >= 0.3 and t in (" coffee", " Paris", " dogs", " castle", " river"):  # words of 4+ letters
            best.setdefault(t.strip().lower(), r)
    want = sorted(best.values(), key=lambda r: -r["probs"][0])[:12]
    got = confident_words(Atlas.open(worded))
    assert got["id"].tolist() == [r["id"] for r in want] and len(want) > 0
    assert got["token"].tolist() == [r["tokens"][0] for r in want]
    assert not set(got["token"]) & {" about", " which", " 42", "ing", ".", " dog", " tea"}


def test_confident_words_of_an_atlas_without_words_is_empty(tmp_path):
    from neuronmap.testing.synthetic import synthetic_atlas

    assert confident_words(Atlas.open(synthetic_atlas(tmp_path / "syn", 2, 8, 100, k=3))).empty  # " tok12": no words


def test_similar_matches_cosines_from_the_checkpoint(tiny_pair):
    ck, atlas = tiny_pair
    sd = load_file(str(ck / "model.safetensors"))
    got = similar(Atlas.open(atlas), "L1N5", top=4)
    for matrix in ("gate", "up", "down"):
        def vec(layer: int) -> torch.Tensor:
            w = sd[f"model.layers.{layer}.mlp.{matrix}_proj.weight"].float()
            return w.T if matrix == "down" else w  # [d_mlp, d_model]
        allv = torch.cat([vec(0), vec(1)])  # [2 * d_mlp, d_model]
        me = vec(1)[5]
        cos = torch.nn.functional.cosine_similarity(allv, me[None], dim=1).double()
        cos[24 + 5] = 0
        want = torch.topk(cos.abs(), 4).indices.tolist()
        rows = got.rows[got.rows["matrix"] == matrix]
        assert rows["id"].tolist() == [f"L{i // 24}N{i % 24}" for i in want]
        np.testing.assert_allclose(rows["cosine"].to_numpy(), cos[want].numpy(), atol=1e-5)
        assert (rows["pole"] == np.where(rows["cosine"] < 0, "-", "+")).all()
    assert "L1N5" not in got.rows["id"].tolist()


def test_similar_refuses_changed_weights_and_bad_ids(tiny_pair, tmp_path):
    import shutil

    ck, atlas = tiny_pair
    with pytest.raises(NeuronmapError, match=r"neuron id 'L1X5'"):
        similar(Atlas.open(atlas), "L1X5")
    moved = tmp_path / "atlas"
    shutil.copytree(atlas, moved)
    meta = json.loads((moved / "meta.json").read_text())
    meta["source"]["files"][0]["sha256"] = "0" * 64
    (moved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(NeuronmapError, match="the weights changed since mapping"):
        similar(Atlas.open(moved), "L1N5")


def test_layer_and_similar_cli_json_is_the_api(atlas, capsys):
    assert main(["layer", str(atlas), "1", "--matrix", "gate", "--sort", "norm", "--limit", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(layer_rows(Atlas.open(atlas), 1, "gate", sort="norm", limit=5).to_dict()))
    assert main(["similar", str(atlas), "L0N3", "--top", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = similar(Atlas.open(atlas), "L0N3", top=2).to_dict()
    assert got["rows"] == json.loads(json.dumps(want["rows"]))
    assert main(["layer", str(atlas), "1", "--class", "noun"]) == 2
    assert "invalid choice: 'noun'" in capsys.readouterr().err
