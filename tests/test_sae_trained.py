"""The trained test SAEs (conftest ``demo_saes``): a TopK SAE and a transcoder of the demo model, mapped with
``map --sae``; a trained feature's decoded tokens against the tokens that follow its top activations."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.resolve import open_weights
from neuronmap.sources.sae import open_saes


@pytest.fixture(scope="module")
def topk_atlas(demo_saes, tmp_path_factory):
    out = tmp_path_factory.mktemp("tk") / "features"
    assert main(["map", "--sae", str(demo_saes / "topk"), "-o", str(out), "--json"]) == 0
    return out


def test_map_sae_on_the_trained_topk_sae(demo_saes, topk_atlas):
    meta = json.loads((topk_atlas / "meta.json").read_text())
    (s,) = meta["sae"]
    assert s["architecture"] == "topk" and s["k"] == 16 and s["hook"] == "blocks.20.hook_resid_post"
    assert s["d_sae"] == meta["d_mlp"] == 2048 and meta["n_rows"] == 2 * 2 * 2048
    t = pq.read_table(topk_atlas / "neurons.parquet", columns=["id", "matrix"]).to_pandas()
    assert set(t["matrix"]) == {"enc", "dec"} and t["id"].str.fullmatch(r"L20F[0-9]+").all()


def test_the_sae_encodes_as_trained(demo_saes):
    w = open_weights(None)
    (sae,) = open_saes(demo_saes / "topk", w)
    x = load_file(str(demo_saes / "acts.safetensors"))["x"]
    acts = sae.encode(x)  # [n_tokens, d_sae]
    assert ((acts > 0).sum(-1) <= 16).all()
    fvu = float((sae.decode(acts) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    print(f"topk SAE: fraction of variance unexplained {fvu:.3f}, features alive {(acts > 0).any(0).sum()} of 2048")
    assert fvu < 0.5  # a trained dictionary, not a random one (random unit rows leave ~1.0)


def agreement(acts: torch.Tensor, nxt: torch.Tensor, top_ids: np.ndarray, n_top: int = 20) -> tuple[float, int]:
    """Of each live feature's ``n_top`` largest activations, the fraction whose next token is among the feature's
    decoded top tokens (``top_ids [d_sae, k]``); averaged over features with ``n_top`` activations."""
    scores = []
    for f in range(acts.shape[1]):
        a = acts[:, f]
        if int((a > 0).sum()) < n_top:
            continue
        pos = a.topk(n_top).indices
        nt = nxt[pos].numpy()
        scores.append(np.isin(nt[nt >= 0], top_ids[f]).mean())
    return float(np.mean(scores)), len(scores)


def test_trained_features_decode_to_what_follows_their_top_activations(demo_saes, topk_atlas):
    w = open_weights(None)
    (sae,) = open_saes(demo_saes / "topk", w)
    d = load_file(str(demo_saes / "acts.safetensors"))
    acts, nxt = sae.encode(d["x"]), d["next"]
    t = pq.read_table(topk_atlas / "neurons.parquet", columns=["matrix", "neuron", "pole", "token_ids"]).to_pandas()
    t = t[(t["matrix"] == "dec") & (t["pole"] == "+")].sort_values("neuron")
    top_ids = np.stack(t["token_ids"])  # [d_sae, 10]
    got, n = agreement(acts, nxt, top_ids)
    rng = np.random.default_rng(0)
    base = np.mean([agreement(acts, nxt, top_ids[rng.permutation(len(top_ids))])[0] for _ in range(3)])
    print(f"decoded top-10 holds the next token of a top-20 activation: {got:.4f} over {n} features; "
          f"random feature's top-10: {base:.4f}")
    assert n >= 50 and got > 2 * base


def test_the_transcoder_maps_and_two_saes_at_one_layer_are_refused(demo_saes, tmp_path, capsys):
    out = tmp_path / "tc"
    assert main(["map", "--sae", str(demo_saes / "transcoder"), "-o", str(out), "--matrices", "dec"]) == 0
    (s,) = json.loads((out / "meta.json").read_text())["sae"]
    assert s["architecture"] == "transcoder" and s["hook"] == "blocks.20.ln2.hook_normalized"
    assert s["hook_out"] == "blocks.20.hook_mlp_out"
    assert "1 SAE (transcoder) x 2048 features" in capsys.readouterr().out
    assert main(["map", "--sae", str(demo_saes), "-o", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err
    assert "are both at layer 20" in err and "one atlas holds one SAE per layer" in err
    with pytest.raises(NeuronmapError):
        open_saes(demo_saes, open_weights(None))


def test_steering_a_feature_raises_its_decoded_token(demo_saes, topk_atlas):
    """Adding a multiple of a feature's decoder direction at its hook raises the token it decodes to, far more than
    adding the next feature's direction of the same norm does, for a majority of the 5 most confident word features.
    Measured (docs/features.md): 3 of 5; the two that decode to the fragment ' strugg' lower it, the ten layers above
    layer 20 undo what the direct path predicts."""
    from neuronmap.runtime.features import steer_feature
    from neuronmap.runtime.models import load_model
    from neuronmap.sources.vocab import WORD

    cols = ["matrix", "neuron", "pole", "token_ids", "tokens", "probs"]
    t = pq.read_table(topk_atlas / "neurons.parquet", columns=cols).to_pandas()
    t = t[(t["matrix"] == "dec") & (t["pole"] == "+")].sort_values("neuron").reset_index(drop=True)
    conf = np.array([p[0] if WORD.match(w[0]) else 0.0 for p, w in zip(t["probs"], t["tokens"])])
    m = load_model(None)
    (sae,) = open_saes(demo_saes / "topk", open_weights(None))
    ids = torch.tensor([m.tokenizer("The weather today is", add_special_tokens=False)["input_ids"]])

    def p(token, feature=None):
        with torch.inference_mode():
            if feature is None:
                return torch.softmax(m.model(ids).logits[0, -1], -1)[token].item()
            with steer_feature(m, sae, feature, 200.0):
                return torch.softmax(m.model(ids).logits[0, -1], -1)[token].item()
    wins = 0
    for f in np.argsort(-conf)[:5]:
        f, token = int(f), int(t["token_ids"][int(f)][0])
        other = (f + 1) % len(t)
        base, steered, control = p(token), p(token, f), p(token, other)
        wins += steered > 10 * base and steered > 10 * control
        print(f"L20F{f} ({m.tokenizer.decode([token])!r}): p {base:.2e} -> {steered:.2e} at 200x its decoder "
              f"direction; L20F{other} the same: {control:.2e}")
    assert wins >= 3
    with pytest.raises(NeuronmapError, match=r"feature 2048 is out of range: the SAE at .* has features 0-2047"):
        with steer_feature(m, sae, 2048, 1.0):
            pass


def test_feature_pages_in_chromium(topk_atlas):
    """The overview, a feature typed into the search box, its cards and its similar vectors, and the layer page, in a
    real browser, with no script error."""
    from playwright.sync_api import expect, sync_playwright
    from test_viewer_browser import CHROMIUM, serving

    with serving(topk_atlas) as url, sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.keyboard.press("/")
        page.keyboard.type("L20F885")
        page.keyboard.press("Enter")
        expect(page.locator("h1")).to_contain_text("L20F885")
        expect(page.locator("section.card")).to_have_count(4)
        expect(page.locator('section.card[data-matrix="dec"][data-pole="+"]')).to_be_visible()
        expect(page.locator("#similar table tr td a").first).to_contain_text("L20F", timeout=60_000)
        page.click("text=L20F886 →")
        expect(page.locator("h1")).to_contain_text("L20F886")
        page.click("text=layer 20")
        expect(page.locator("table td a").first).to_contain_text("L20F")
        b.close()
        assert errors == []
