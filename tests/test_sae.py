"""SAE and transcoder features: reading SAELens directories, hooks from the family table, `map --sae` exact decoding,
refusals, and every reader (search, show, layer, stats, similar, the viewer) on a feature atlas."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from neuronmap.atlas.handle import Atlas
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import parse_matrices, parse_neuron_id
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.sources.families import family_for_model_type
from neuronmap.sources.resolve import open_weights
from neuronmap.sources.sae import open_saes
from neuronmap.testing.sae import save_sae

LAYER = 3


def test_hooks_are_placed_by_the_family_table():
    llama, gemma3, gpt2, opt = (family_for_model_type(t) for t in ("llama", "gemma3_text", "gpt2", "opt"))
    got = {(f.name, h): (p.module, p.side) for f in (llama, gemma3, gpt2, opt)
           for h in ("blocks.2.hook_resid_pre", "blocks.2.hook_resid_post", "blocks.2.hook_mlp_out",
                     "blocks.2.ln2.hook_normalized") for p in [f.hook_point(h, 4)]}
    assert got[("llama", "blocks.2.hook_resid_pre")] == ("model.layers.2", "input")
    assert got[("llama", "blocks.2.hook_resid_post")] == ("model.layers.2", "output")
    assert got[("llama", "blocks.2.hook_mlp_out")] == ("model.layers.2.mlp", "output")
    assert got[("llama", "blocks.2.ln2.hook_normalized")] == ("model.layers.2.post_attention_layernorm", "output")
    assert got[("gemma3", "blocks.2.hook_mlp_out")] == ("model.layers.2.post_feedforward_layernorm", "output")
    assert got[("gemma3", "blocks.2.ln2.hook_normalized")] == ("model.layers.2.pre_feedforward_layernorm", "output")
    assert got[("gpt2", "blocks.2.hook_resid_post")] == ("transformer.h.2", "output")
    assert got[("gpt2", "blocks.2.ln2.hook_normalized")] == ("transformer.h.2.ln_2", "output")
    assert got[("opt", "blocks.2.hook_mlp_out")] == ("model.decoder.layers.2.fc2", "output")
    with pytest.raises(NeuronmapError, match=r"^unknown hook 'blocks.2.hook_attn_out': expected blocks"):
        llama.hook_point("blocks.2.hook_attn_out", 4)
    with pytest.raises(NeuronmapError, match=r"block 9 is out of range, this llama model has blocks 0-3"):
        llama.hook_point("blocks.9.hook_resid_post", 4)


def test_feature_ids_and_matrices():
    assert parse_neuron_id("L3F17") == (3, 17)
    assert parse_neuron_id("L3F17", letter="F") == (3, 17)
    with pytest.raises(NeuronmapError, match=r"^L3N17 is a neuron id but this atlas holds SAE features .*: write L3F17$"):
        parse_neuron_id("L3N17", letter="F")
    with pytest.raises(NeuronmapError, match=r"^L3F17 is a feature id but this atlas holds neurons .*: write L3N17$"):
        parse_neuron_id("L3F17", letter="N")
    with pytest.raises(NeuronmapError, match=r"feature L0F99: index 99 is out of range, each layer has features 0-9"):
        parse_neuron_id("L0F99", 2, 10)
    assert parse_matrices("dec", ("enc", "dec")) == ["dec"]
    with pytest.raises(NeuronmapError, match=r"this atlas has no 'up' matrix \(features have enc and dec\): use enc,dec"):
        parse_matrices("up", ("enc", "dec"))


@pytest.fixture(scope="module")
def demo():
    return open_weights(None)


@pytest.fixture(scope="module")
def neuron_sae(demo, tmp_path_factory):
    """An SAE whose feature i is neuron i of layer LAYER: decoder row = its down column, encoder = its up row."""
    down, up = demo.vectors("down", LAYER), demo.vectors("up", LAYER)  # [d_mlp, d_model] each
    d_mlp = demo.d_mlp
    tensors = {"W_enc": up.T.contiguous(), "W_dec": down, "b_enc": torch.zeros(d_mlp), "b_dec": torch.zeros(demo.d_model)}
    return save_sae(tmp_path_factory.mktemp("sae") / "neurons-as-features", tensors, "standard",
                    f"blocks.{LAYER}.hook_mlp_out")


@pytest.fixture(scope="module")
def feature_atlas(neuron_sae, tmp_path_factory):
    return map_model(None, tmp_path_factory.mktemp("fa") / "features", MapOptions(sae=str(neuron_sae))).path


@pytest.fixture(scope="module")
def neuron_atlas(tmp_path_factory):
    return map_model(None, tmp_path_factory.mktemp("na") / "neurons", MapOptions(layers=str(LAYER))).path


def _rows(atlas, matrix):
    t = pq.read_table(atlas / "neurons.parquet").to_pandas()
    return t[t["matrix"] == matrix].sort_values(["neuron", "pole"]).reset_index(drop=True)


def test_a_feature_equal_to_a_neuron_decodes_exactly_as_that_neuron(demo, feature_atlas, neuron_atlas):
    meta = json.loads((feature_atlas / "meta.json").read_text())
    assert meta["decode"]["matrices"] == ["enc", "dec"] and meta["decode"]["layers"] == [LAYER]
    assert meta["sae"][0]["architecture"] == "standard" and meta["sae"][0]["hook"] == f"blocks.{LAYER}.hook_mlp_out"
    assert len(meta["sae"][0]["sha256"]) == 64 and meta["d_mlp"] == meta["d_sae"] == demo.d_mlp
    for fm, nm in (("dec", "down"), ("enc", "up")):
        f, n = _rows(feature_atlas, fm), _rows(neuron_atlas, nm)
        assert f["id"][:2].tolist() == [f"L{LAYER}F0", f"L{LAYER}F0"] and n["id"][0] == f"L{LAYER}N0"
        assert len(f) == len(n) == 2 * demo.d_mlp
        same = np.mean([list(a) == list(b) for a, b in zip(f["token_ids"], n["token_ids"])])
        assert same == 1.0, f"{fm}: {same:.4f} of rows have the neuron's top-10"
        assert np.abs(np.stack(f["probs"]) - np.stack(n["probs"])).max() < 1e-6
    # and against the definition in fp64, for a sample of features
    f = _rows(feature_atlas, "dec")
    f = f[f["pole"] == "+"].reset_index(drop=True)
    idx = np.arange(0, demo.d_mlp, 97)
    x = demo.vectors("down", LAYER)[idx].double()
    w, _ = demo.final_norm()
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + demo.eps) * w.double()
    p = torch.softmax(h @ demo.head().double().T, -1)  # [n, d_vocab]
    ref = p.topk(10).values.numpy()
    assert np.abs(np.stack(f["probs"][idx]) - ref).max() < 1e-4


def test_norm_none_is_the_raw_product_with_the_unembedding(demo, neuron_sae, tmp_path):
    out = map_model(None, tmp_path / "raw", MapOptions(sae=str(neuron_sae), norm="none", matrices="dec")).path
    f = _rows(out, "dec")
    f = f[f["pole"] == "+"].reset_index(drop=True)
    idx = np.arange(0, demo.d_mlp, 131)
    raw = demo.vectors("down", LAYER)[idx].double() @ demo.head().double().T  # W_dec @ W_U, Neuronpedia's logits
    want = raw.topk(10).indices.numpy()
    got = np.stack(f["token_ids"][idx])
    assert (got == want).mean() > 0.99  # equal but at fp32 near-ties
    assert np.abs(np.stack(f["logits"][idx]) - raw.topk(10).values.numpy()).max() < 1e-3
    assert json.loads((out / "meta.json").read_text())["decode"]["final_norm"] == "none"


def _sae_dir(tmp_path, demo, name="s", d_in=None, d_sae=64, arch="standard", hook=f"blocks.{LAYER}.hook_resid_post",
             dec_shape=None):
    d_in = d_in or demo.d_model
    t = {"W_enc": torch.randn(d_in, d_sae), "W_dec": torch.randn(*(dec_shape or (d_sae, d_in))),
         "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in)}
    return save_sae(tmp_path / name, t, arch, hook)


def test_bad_saes_are_refused_in_one_line_naming_both_sides(demo, tmp_path):
    bad = _sae_dir(tmp_path, demo, "din", d_in=512)
    with pytest.raises(NeuronmapError, match=r"cfg.json: d_in is 512 but the llama model's d_model is 576 "
                                              r"\(hook blocks.3.hook_resid_post\): this SAE was trained on another model$"):
        open_saes(bad, demo)
    arch = _sae_dir(tmp_path, demo, "arch", arch="matryoshka")
    with pytest.raises(NeuronmapError, match=r"unknown architecture 'matryoshka', expected one of standard, topk, "):
        open_saes(arch, demo)
    hook = _sae_dir(tmp_path, demo, "hook", hook="blocks.3.attn.hook_z")
    with pytest.raises(NeuronmapError, match=r"^unknown hook 'blocks.3.attn.hook_z'"):
        open_saes(hook, demo)
    shape = _sae_dir(tmp_path, demo, "shape", dec_shape=(63, demo.d_model))
    with pytest.raises(NeuronmapError, match=r"tensor W_dec in .* has shape \[63, 576\], expected \[64, 576\] from "
                                              r"cfg.json \(d_in=576, d_sae=64, d_out=576\)"):
        open_saes(shape, demo)
    two = tmp_path / "two"
    _sae_dir(two, demo, "a")
    _sae_dir(two, demo, "b", hook=f"blocks.{LAYER}.hook_resid_pre")
    with pytest.raises(NeuronmapError, match=r"are both at layer 3 .*one atlas holds one SAE per layer"):
        open_saes(two, demo)
    with pytest.raises(NeuronmapError, match=r"holds no SAE: expected cfg.json"):
        open_saes(two / "a" / "cfg.json", demo)


def test_cli_map_sae_refuses_a_mismatch_without_traceback(demo, tmp_path, capsys):
    from neuronmap.cli import main

    bad = _sae_dir(tmp_path, demo, "din", d_in=512)
    assert main(["map", "--sae", str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "d_in is 512 but the llama model's d_model is 576" in err
    assert "\n" not in err and not (tmp_path / "out").exists()
    assert main(["map", "--sae", str(bad), "--fold-input-norm", "-o", str(tmp_path / "out")]) == 2
    assert "--fold-input-norm applies to MLP neurons" in capsys.readouterr().err


def test_readers_work_on_a_feature_atlas(feature_atlas):
    a = Atlas.open(feature_atlas)
    f = f"L{LAYER}F5"
    rep = a.show(f)
    d = rep.to_dict()
    assert d["id"] == f and {(r["matrix"], r["pole"]) for r in d["rows"]} == {(m, p) for m in ("enc", "dec") for p in "+-"}
    assert [r["matrix"] for r in d["rows"]][:2] == ["enc", "enc"]  # enc before dec, as gate/up before down
    with pytest.raises(NeuronmapError, match=f"L{LAYER}N5 is a neuron id but this atlas holds SAE features"):
        a.show(f"L{LAYER}N5")
    lr = a.layer(LAYER).to_dict()
    assert lr["rows"][0]["id"].startswith(f"L{LAYER}F") and {r["matrix"] for r in lr["rows"]} == {"dec"}
    st = a.stats().to_dict()
    assert st["n_rows"] == 4 * a.meta["d_mlp"] and {r["matrix"] for r in st["layers"]} == {"enc", "dec"}
    top = lr["rows"][0]["top_token"]
    hits = a.search([top.strip() or top], top=5).to_dict()
    assert hits["results"] and all(r["id"].startswith(f"L{LAYER}F") for r in hits["results"])
    sim = a.similar(f, "dec", top=3).to_dict()
    assert sim["id"] == f and len(sim["rows"]) == 3 and all(r["id"].startswith(f"L{LAYER}F") for r in sim["rows"])


def test_viewer_pages_on_a_feature_atlas(feature_atlas):
    from starlette.testclient import TestClient

    from neuronmap.viewer import create_app

    c = TestClient(create_app([feature_atlas], host="127.0.0.1"), base_url="http://127.0.0.1")
    page = c.get(f"/neuron/L{LAYER}F5")
    assert page.status_code == 200 and f"L{LAYER}F5" in page.text
    assert f"/neuron/L{LAYER}F4" in page.text and f"/neuron/L{LAYER}F6" in page.text  # prev/next stay features
    assert 'data-matrix="enc"' in page.text and 'data-matrix="dec"' in page.text
    assert "steering SAE features is not built yet" in page.text
    api = c.get(f"/api/neuron/L{LAYER}F5").json()
    assert api["id"] == f"L{LAYER}F5" and len(api["rows"]) == 4
    lay = c.get(f"/layer/{LAYER}")
    assert lay.status_code == 200 and f"/neuron/L{LAYER}F" in lay.text and "matrix=enc" in lay.text
    r = c.get(f"/search?q=L{LAYER}F7", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith(f"/neuron/L{LAYER}F7")
    bad = c.get(f"/api/neuron/L{LAYER}N5")
    assert bad.status_code == 400 and "is a neuron id but this atlas holds SAE features" in bad.json()["error"]
    sim = c.get(f"/api/similar/L{LAYER}F5").json()
    assert sim["rows"] and all(x["id"].startswith(f"L{LAYER}F") for x in sim["rows"])


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "transcoder"])
def test_sae_lens_reads_what_we_save_and_encodes_as_we_do(demo, tmp_path, arch):
    """Runs where sae-lens is installed (it is not a dependency): its own loader, its encode and decode against ours."""
    sae_lens = pytest.importorskip("sae_lens")
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = demo.d_model, 64
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.05, "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(d_sae, generator=g) * 0.2
    p = save_sae(tmp_path / arch, t, arch, f"blocks.{LAYER}.hook_resid_post", k=8 if arch == "topk" else None,
                 hook_out=f"blocks.{LAYER}.hook_mlp_out" if arch == "transcoder" else None)
    theirs = (sae_lens.Transcoder if arch == "transcoder" else sae_lens.SAE).load_from_disk(p)
    (ours,) = open_saes(p, demo)
    assert theirs.cfg.metadata.hook_name == ours.point.hook
    x = torch.randn(32, d_in, generator=g)
    with torch.no_grad():
        a, b = theirs.encode(x), ours.encode(x)
        assert (b > 0).sum() > 0 and torch.equal(a, b)
        assert torch.allclose(theirs.decode(a), ours.decode(b), atol=1e-5)
