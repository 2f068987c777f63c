"""search and show: variants on the demo tokenizer, exact search against brute force, bad input, the demo's concepts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from neuronmap.atlas.handle import Atlas
from neuronmap.atlas.store import token_index_file
from neuronmap.cli import main
from neuronmap.decode.engine import build_head
from neuronmap.decode.head import logits
from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.concepts import expand_concept, variant_strings, vocab_index
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.atlas.scoring import exact_token_probs
from neuronmap.atlas.search import search, show
from neuronmap.sources.resolve import open_weights


# ------------------------------------------------------------------ helpers


def brute_probs(atlas_dir, token_ids: list[int]) -> dict[tuple, np.ndarray]:
    """p(tokens | row) for every row, from the full softmax over the vocabulary: {(matrix, layer, neuron, pole): [n_tokens]}."""
    meta = Atlas.open(atlas_dir).meta
    w = open_weights(meta["source"]["path"])
    head = build_head(w, meta["decode"]["norm"])
    out = {}
    for layer in meta["decode"]["layers"]:
        for matrix in meta["decode"]["matrices"]:
            v = w.vectors(matrix, layer)
            if meta["decode"]["fold_input_norm"] and matrix != "down":
                v = v * w.mlp_norm_gain(layer)
            for pole, x in (("+", v), ("-", -v)):
                p = torch.softmax(logits(head, x).double(), -1)[:, token_ids].numpy()  # [d_mlp, n_tokens]
                for n in range(w.d_mlp):
                    out[(matrix, layer, n, pole)] = p[n]
    return out


@pytest.fixture(scope="module")
def tiny_atlases(tiny_models, tmp_path_factory):
    """Tiny atlases: llama (gated, rms), gemma2 (1 + w norm, softcap, fold_input_norm), gpt2 (layer norm, not gated)."""
    out = {}
    for family, opts in (("llama", MapOptions(top_k=5)), ("gemma2", MapOptions(top_k=5, fold_input_norm=True)),
                         ("gpt2", MapOptions(top_k=5))):
        d = tmp_path_factory.mktemp("search") / family
        map_model(str(tiny_models(family)), d, opts)
        out[family] = d
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------ variants


def test_variant_strings_cases_plurals_spaces():
    v = variant_strings("coffee")
    assert v[:2] == [" coffee", "coffee"]
    assert {" Coffee", "Coffee", " COFFEE", " coffees", " Coffees", " COFFEES"} <= set(v)
    assert " boxes" in variant_strings("box") and " cities" in variant_strings("city") and " days" in variant_strings("day")
    assert variant_strings(" Coffee ") == variant_strings("Coffee")
    assert len(v) == len(set(v))


def test_expand_concept_on_demo_tokenizer(demo_gguf):
    tokens = list(open_weights(demo_gguf).tokens)
    index = vocab_index(tokens)
    for word in ("water", "coffee", "Paris", "dog"):
        c = expand_concept(word, index)
        tried = variant_strings(word)
        assert not c.approximate
        assert list(c.tokens) == [s for s in tried if s in tokens]  # exactly the variants that are single tokens
        assert [tokens[i] for i in c.token_ids] == list(c.tokens)
        assert set(c.missing) == {s for s in tried if s not in tokens}
    assert " coffee" in expand_concept("coffee", index).tokens and " water" in expand_concept("WATER", index).tokens
    assert expand_concept(" coffee", index, variants=False).tokens == (" coffee",)


def test_expand_concept_not_a_single_token_uses_first_token(demo_gguf):
    tokens = list(open_weights(demo_gguf).tokens)
    c = expand_concept("espresso", vocab_index(tokens))
    assert c.approximate
    for form, tok in zip([" espresso", "espresso"], c.tokens):
        longest = max((t for t in set(tokens) if t and form.startswith(t)), key=len)
        assert tok == longest and len(tok) < len(form)


def test_a_concept_is_never_matched_by_whitespace(demo_gguf):
    tokens = list(open_weights(demo_gguf).tokens)
    index = vocab_index(tokens)
    assert " " in index and "🐕" not in index and " 🐕" not in index  # the emoji is byte pieces; ' ' its only prefix token
    with pytest.raises(NeuronmapError) as e:
        expand_concept("🐕", index)
    assert str(e.value).startswith("concept '🐕' matches no token of this vocabulary: no variant is a single token and "
                                   "it starts with no token but whitespace") and "\n" not in str(e.value)
    c = expand_concept("dog🐕", index)  # a content token first: approximate, by it
    assert c.approximate and c.tokens == (" dog", "dog")
    with pytest.raises(NeuronmapError, match="empty concept"):
        expand_concept("  ", index)


def test_empty_concept_is_an_error(demo_gguf):
    index = vocab_index(list(open_weights(demo_gguf).tokens))
    for text in ("", "   "):
        with pytest.raises(NeuronmapError, match="empty concept"):
            expand_concept(text, index)


# ------------------------------------------------------------------ exact search vs brute force


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_exact_probs_match_brute_force_for_every_vector(tiny_atlases, family):
    d = tiny_atlases[family]
    files = Atlas.open(d)
    meta = files.meta
    ids = [3, 17, 40]
    tp = exact_token_probs(files, open_weights(meta["source"]["path"]), ids, meta["decode"]["matrices"],
                           meta["decode"]["layers"], ["+", "-"])
    ref = brute_probs(d, ids)
    assert len(tp.keys) == len(ref) and tp.probs.shape == (len(ref), 3)
    got = {tuple(k): p for k, p in zip(tp.keys.itertuples(index=False, name=None), tp.probs)}
    assert set(got) == set(ref)
    err = max(np.abs(got[k] - ref[k]).max() for k in ref)
    assert err < 1e-5, err


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_search_ranking_matches_brute_force(tiny_atlases, family):
    d = tiny_atlases[family]
    r = search(Atlas.open(d), ["<7>"], top=10_000)
    ref = brute_probs(d, [7])
    order = sorted(ref, key=lambda k: -ref[k][0])
    assert r.method == "exact" and r.concepts[0].tokens == ("<7>",)
    assert len(r.table) == len(ref)  # every vector, not only those with the token in their top-k
    got = list(r.table[["matrix", "layer", "neuron", "pole"]].itertuples(index=False, name=None))
    assert np.allclose(r.table["prob"], [ref[k][0] for k in got], atol=1e-5)
    assert np.all(np.diff(r.table["prob"].to_numpy()) <= 0)
    assert got[:5] == order[:5]
    assert list(r.table["rank"]) == list(range(1, len(ref) + 1))


def test_search_options_filter_rows(tiny_atlases):
    files = Atlas.open(tiny_atlases["llama"])
    r = search(files, ["<7>", "<9>"], matrices="up,down", layers="1", pole="-", top=4, min_prob=0.0)
    t = r.table
    assert set(t["matrix"]) <= {"up", "down"} and set(t["layer"]) == {1} and set(t["pole"]) == {"-"}
    assert list(t["concept"]) == ["<7>"] * 4 + ["<9>"] * 4
    assert r.n_scored == 2 * 24  # 2 matrices x 24 neurons x 1 pole
    floor = float(t["prob"].median())
    r2 = search(files, ["<7>", "<9>"], top=100, min_prob=floor)
    assert len(r2.table) > 0 and (r2.table["prob"] >= floor).all()


def test_stored_search_finds_the_rows_holding_the_token_with_their_exact_probs(tiny_atlases):
    files = Atlas.open(tiny_atlases["llama"])
    rows = pq.read_table(files.neurons).to_pylist()
    holding = {(r["matrix"], r["layer"], r["neuron"], r["pole"]): r["probs"][r["token_ids"].index(5)]
               for r in rows if 5 in r["token_ids"]}
    stored = search(files, ["<5>"], stored=True, top=10_000)
    exact = search(files, ["<5>"], top=10_000)
    key = ["matrix", "layer", "neuron", "pole"]
    got = {k: p for *k, p in stored.table[key + ["prob"]].itertuples(index=False, name=None) for k in [tuple(k)]}
    ex = {tuple(k): p for *k, p in exact.table[key + ["prob"]].itertuples(index=False, name=None)}
    assert stored.method == "stored" and stored.n_scored == exact.n_scored == len(rows)
    assert set(got) == set(holding) and len(holding) < len(ex)  # only rows with the token in their top-k
    assert all(abs(got[k] - holding[k]) < 1e-6 and abs(got[k] - ex[k]) < 1e-5 for k in got)
    assert np.all(np.diff(stored.table["prob"].to_numpy()) <= 0)
    assert list(stored.table["id"]) == [f"L{l}N{n}" for l, n in zip(stored.table["layer"], stored.table["neuron"])]
    few = search(files, ["<5>"], stored=True, top=3, min_prob=0.0, matrices="up", pole="+")
    assert len(few.table) <= 3 and set(few.table["matrix"]) <= {"up"} and set(few.table["pole"]) <= {"+"}


def test_token_index_is_every_top_k_entry_built_once_and_rebuilt_when_the_atlas_changes(tiny_models, tmp_path):
    d = tmp_path / "atlas"
    map_model(str(tiny_models("llama")), d, MapOptions(top_k=4))
    files = Atlas.open(d)
    path = token_index_file(files)
    assert path == d / "token_index.parquet"
    idx = pq.read_table(path).to_pandas()
    rows = pq.read_table(files.neurons).to_pandas()
    assert len(idx) == 4 * len(rows) and idx["token_id"].is_monotonic_increasing
    assert sorted(idx["prob"].round(6)) == sorted(np.concatenate(rows["probs"].to_numpy()).round(6))
    built = path.stat().st_mtime_ns
    assert token_index_file(files) == path and path.stat().st_mtime_ns == built  # reused
    pq.write_table(pq.read_table(files.neurons).slice(0, 10), files.neurons)  # neurons.parquet changes
    assert len(pq.read_table(token_index_file(files))) == 40
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no temp file left


# ------------------------------------------------------------------ show


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_show_every_matrix_and_pole_with_exact_rank(tiny_atlases, family):
    d = tiny_atlases[family]
    t = show(Atlas.open(d), "L1N5").rows
    meta = Atlas.open(d).meta
    assert [(m, p) for m, p in zip(t["matrix"], t["pole"])] == [(m, p) for m in meta["decode"]["matrices"] for p in "+-"]
    assert set(t["id"]) == {"L1N5"} and (t["rank_method"] == "exact").all()
    for r in t.itertuples():
        top = open_weights(meta["source"]["path"]).tokens.index(r.top_token)
        ref = brute_probs(d, [top])
        mine = ref[(r.matrix, 1, 5, r.pole)][0]
        assert abs(r.top_prob - mine) < 1e-5 and abs(r.probs[0] - mine) < 1e-5
        assert r.rank == 1 + sum(v[0] > mine + 1e-7 for v in ref.values())
        assert r.n_ranked == len(ref) and len(r.tokens) == 5


def test_show_stored_rank_counts_only_rows_holding_the_token(tiny_atlases):
    files = Atlas.open(tiny_atlases["llama"])
    t = show(files, "L0N3", stored=True).rows
    import pyarrow.parquet as pq

    rows = pq.read_table(files.neurons).to_pylist()
    for r in t.itertuples():
        tid = next(x["token_ids"][0] for x in rows if (x["matrix"], x["layer"], x["neuron"], x["pole"]) == (r.matrix, 0, 3, r.pole))
        ps = [x["probs"][x["token_ids"].index(tid)] for x in rows if tid in x["token_ids"]]
        assert r.rank_method == "stored" and r.n_ranked == len(ps)
        assert r.rank == 1 + sum(p > r.top_prob for p in ps)


# ------------------------------------------------------------------ CLI and Python API


def test_cli_search_json_csv_and_table(tiny_atlases, capsys):
    d = tiny_atlases["llama"]
    rc, out, _ = run_cli(capsys, "search", d, "<7>", "--top", "3", "--json")
    data = json.loads(out)
    assert rc == 0 and data["method"] == "exact" and len(data["results"]) == 3
    assert data["concepts"][0]["tokens"] == [{"id": 7, "token": "<7>"}]
    assert {"id", "layer", "neuron", "matrix", "pole", "prob"} <= set(data["results"][0])
    rc, out, _ = run_cli(capsys, "search", d, "<7>", "--top", "3", "--csv")
    lines = out.strip().splitlines()
    assert rc == 0 and lines[0].startswith("concept,rank,id,layer,neuron,matrix,pole,prob") and len(lines) == 4
    rc, out, _ = run_cli(capsys, "search", d, "<7>", "--stored")
    assert rc == 0 and "stored top-5, no weights read" in out and "p is a lower bound" in out
    rc, out, _ = run_cli(capsys, "search", d, "<7>", "--pole", "-", "--top", "2")
    assert rc == 0 and "exact: p over all 144 chosen rows" in out  # 3 matrices x 2 layers x 24 neurons x 1 pole


def test_cli_search_flags_an_approximate_concept(tiny_atlases, capsys):
    rc, out, _ = run_cli(capsys, "search", tiny_atlases["llama"], "<7>xyz", "--top", "1")
    assert rc == 0 and "APPROXIMATE" in out and "'<7>'" in out


def test_cli_show_and_api(tiny_atlases, capsys):
    d = tiny_atlases["gpt2"]
    rc, out, _ = run_cli(capsys, "show", d, "L0N2", "--json")
    data = json.loads(out)
    assert rc == 0 and data["id"] == "L0N2" and len(data["rows"]) == 4
    a = Atlas.open(d)
    r = a.search(["<7>", "<8>"], top=2)
    assert r.method == "exact" and list(r.table["concept"]) == ["<7>", "<7>", "<8>", "<8>"]
    assert r.to_dict() | {"seconds": 0} == search(Atlas.open(d), ["<7>", "<8>"], top=2).to_dict() | {"seconds": 0}
    assert a.show("L0N2").rows[["matrix", "pole", "rank"]].equals(
        show(Atlas.open(d), "L0N2").rows[["matrix", "pole", "rank"]])
    assert a.variants("<7>").token_ids == (7,)


# ------------------------------------------------------------------ bad input


def test_bad_atlas_paths(tmp_path, tiny_atlases, capsys):
    rc, _, err = run_cli(capsys, "search", tmp_path, "dog")
    assert rc == 2 and "is not a neuronmap atlas" in err and err.count("\n") == 1
    rc, _, err = run_cli(capsys, "show", tmp_path / "nope", "L0N0")
    assert rc == 2 and "does not exist" in err
    d = tmp_path / "v99"
    shutil.copytree(tiny_atlases["llama"], d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    for cmd in (["search", d, "<7>"], ["show", d, "L0N0"], ["stats", d]):
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 2 and "atlas format version 99" in err and err.count("\n") == 1


@pytest.mark.parametrize("neuron, message", [
    ("L1X3", "malformed neuron id"), ("29", "malformed neuron id"), ("L2N0", "layer 2 is out of range"),
    ("L0N24", "index 24 is out of range"),
])
def test_bad_neuron_ids(tiny_atlases, capsys, neuron, message):
    rc, _, err = run_cli(capsys, "show", tiny_atlases["llama"], neuron)
    assert rc == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1


def test_bad_search_options(tiny_atlases, tmp_path, tiny_models, capsys):
    d = tiny_atlases["llama"]
    for argv, message in ((["", "--top", "3"], "empty concept"), (["<7>", "--top", "0"], "argument --top: 0 is out of range"),
                          (["<7>", "--min-prob", "2"], "argument --min-prob: 2 is out of range: expected a number from 0 to 1"),
                          (["<7>", "--matrices", "gat"], "unknown matrix 'gat'"),
                          (["<7>", "--layers", "5"], "out of range")):
        rc, _, err = run_cli(capsys, "search", d, *argv)
        assert rc == 2 and message in err, (argv, err)
    part = tmp_path / "part"
    map_model(str(tiny_models("llama")), part, MapOptions(layers="1", matrices="up"))
    for argv, message in ((["<7>", "--layers", "0"], "the atlas has no layer 0"),
                          (["<7>", "--matrices", "gate"], "the atlas has no 'gate' vectors")):
        rc, _, err = run_cli(capsys, "search", part, *argv)
        assert rc == 2 and message in err, (argv, err)
    rc, _, err = run_cli(capsys, "show", part, "L0N1")
    assert rc == 2 and "the atlas has no layer 0" in err


def test_weights_changed_or_moved_since_mapping(tiny_models, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models("llama"), ckpt)
    d = tmp_path / "atlas"
    map_model(str(ckpt), d, MapOptions(top_k=5))
    rc, _, _ = run_cli(capsys, "search", d, "<7>")
    assert rc == 0
    moved = tmp_path / "moved"
    ckpt.rename(moved)
    for cmd in (["search", d, "<7>"], ["show", d, "L0N0"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 2 and "the weights moved or were deleted since mapping" in err and "--stored" in err
        assert "--weights PATH" in err and err.count("\n") == 1
    rc, out, _ = run_cli(capsys, "search", d, "<7>", "--weights", moved, "--json")
    assert rc == 0 and json.loads(out)["method"] == "exact"
    rc, out, err = run_cli(capsys, "search", d, "<7>", "--stored", "--json")  # no weights needed
    assert rc == 0 and json.loads(out)["method"] == "stored" and "building the atlas's token index" in err
    rc, out, err = run_cli(capsys, "show", d, "L1N3", "--stored", "--json")
    assert rc == 0 and json.loads(out)["rows"][0]["rank_method"] == "stored" and err == ""
    moved.rename(ckpt)
    shutil.rmtree(ckpt)
    from conftest import make_tiny

    make_tiny("llama", ckpt, seed=1)  # same shapes, other weights
    rc, _, err = run_cli(capsys, "search", d, "<7>")
    assert rc == 2 and "the weights changed since mapping" in err and "re-map with `neuronmap map" in err
    rc, _, err = run_cli(capsys, "search", d, "<7>", "--weights", ckpt)
    assert rc == 2 and "is not what this atlas was mapped from" in err


# ------------------------------------------------------------------ the real demo model


@pytest.fixture(scope="module")
def demo_hits(demo_atlas):
    return search(Atlas.open(demo_atlas), [" coffee", " water"], top=20)


@pytest.mark.parametrize("concept", [" coffee", " water"])
def test_demo_ranks_a_confident_vector_first(demo_hits, concept):
    r = demo_hits
    best = r.table[r.table["concept"] == concept].iloc[0]
    ids = next(c.token_ids for c in r.concepts if c.text == concept)
    assert r.method == "exact" and r.n_scored == 2 * 30 * 3 * 1536
    assert best["rank"] == 1 and best["prob"] >= 0.5, best.to_dict()
    # Check the winner from scratch: its full decoded distribution puts p >= 0.5 on the concept's variants.
    w = open_weights(None)
    x = w.vectors(best["matrix"], int(best["layer"]))[int(best["neuron"])] * (1 if best["pole"] == "+" else -1)
    p = torch.softmax(logits(build_head(w), x[None]).double(), -1)[0]
    assert abs(float(p[list(ids)].sum()) - best["prob"]) < 1e-4
    if concept == " coffee":
        assert (best["id"], best["matrix"], best["pole"]) == ("L29N750", "up", "+")


def test_demo_exact_search_matches_brute_force_on_a_layer(demo_atlas):
    files = Atlas.open(demo_atlas)
    r = search(files, [" coffee"], layers="29", matrices="up", top=20)
    w = open_weights(None)
    ids = list(r.concepts[0].token_ids)
    p = torch.softmax(logits(build_head(w), w.vectors("up", 29)).double(), -1)[:, ids].sum(-1)  # [d_mlp]
    pm = torch.softmax(logits(build_head(w), -w.vectors("up", 29)).double(), -1)[:, ids].sum(-1)
    ref = sorted([(float(v), n, "+") for n, v in enumerate(p)] + [(float(v), n, "-") for n, v in enumerate(pm)], reverse=True)
    assert list(zip(r.table["neuron"], r.table["pole"]))[:10] == [(n, s) for _, n, s in ref[:10]]
    assert np.allclose(r.table["prob"], [v for v, _, _ in ref[:20]], atol=1e-5)


def test_demo_show_coffee_neuron(demo_atlas):
    t = show(Atlas.open(demo_atlas), "L29N750").rows
    up = t[(t["matrix"] == "up") & (t["pole"] == "+")].iloc[0]
    assert up["top_token"] == " coffee" and up["top_prob"] > 0.9 and up["rank"] == 1
    assert len(t) == 6 and (t["n_ranked"] == 2 * 30 * 3 * 1536).all()


def test_rows_writer_makes_big_row_groups(tmp_path):
    from neuronmap.atlas.format import SCHEMA
    from neuronmap.atlas.writer import RowsWriter

    import pyarrow as pa

    w = RowsWriter(tmp_path / "n.parquet", rows=250)
    block = pa.Table.from_pylist([{"matrix": "up", "layer": 0, "neuron": i, "id": f"L0N{i}", "pole": "+", "token_ids": [1],
                                   "tokens": ["a"], "probs": [1.0], "logits": [0.0], "logsumexp": 0.0, "entropy": 0.0,
                                   "weight_norm": 1.0} for i in range(100)], schema=SCHEMA)
    for _ in range(10):
        w.write(block)
    w.close()
    meta = pq.read_metadata(tmp_path / "n.parquet")
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [300, 300, 300, 100]


def test_tokens_with_markup_characters_print_as_they_are():
    from rich.console import Console

    from neuronmap.cli.common import show_token

    c = Console(record=True, width=80)
    c.print(show_token("[/bold]") + " " + show_token(" [x]"))
    assert c.export_text().strip() == "'[/bold]' ' [x]'"


def test_a_search_takes_at_most_64_concepts_of_256_characters(tiny_atlases, capsys):
    """Bounded work per search: the CLI and the viewer share the limit (issue 25: 10,000 concepts ran for minutes)."""
    d = tiny_atlases["llama"]
    rc, _, err = run_cli(capsys, "search", d, *[f"<{i % 60}>" for i in range(65)], "--stored")
    assert rc == 2 and err == "error: at most 64 concepts per search, got 65: split the query into several searches\n"
    rc, _, err = run_cli(capsys, "search", d, "x" * 257, "--stored")
    assert rc == 2 and err == ("error: concept 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... has 257 characters: at most 256 "
                               "per concept; give a word or token, e.g. coffee\n")
    with pytest.raises(NeuronmapError, match="got 10,000: split the query"):
        search(Atlas.open(d), ["<7>"] * 10_000)


def test_many_hits_are_described_in_order(tiny_atlases):
    """64 concepts x 100 hits: each hit's id, stored top 5, entropy and norm are its own row's, in the ranking's order
    (one query per hit took over 10 minutes for 6,400 hits on one demo layer; one query per block now: the speed is
    not asserted here, by the project's rule, but this test would not finish in CI with the old query)."""
    files = Atlas.open(tiny_atlases["llama"])
    r = search(files, [f"<{i}>" for i in range(64)], top=100)
    t = r.table
    assert len(t) == 64 * 100, len(t)
    rows = pq.read_table(files.neurons).to_pandas().set_index(["layer", "matrix", "pole", "neuron"])
    for h in t.itertuples():
        row = rows.loc[(h.layer, h.matrix, h.pole, h.neuron)]
        assert h.id == f"L{h.layer}N{h.neuron}" and list(h.top_tokens) == list(row["tokens"][:5])
        assert h.entropy == row["entropy"] and h.weight_norm == row["weight_norm"]
    for concept, hits in t.groupby("concept", sort=False):
        assert hits["rank"].tolist() == list(range(1, 101)) and hits["prob"].is_monotonic_decreasing
