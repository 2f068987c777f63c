"""Interventions: hooks match manual MLP rewrites on tiny models, ablation and a known causal neuron on the real demo model.

The demo model is loaded once (``demo``); the CLI tests reuse it through
``load_model``'s in-process cache, since their default source is the same model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from neuronmap.atlas.handle import Atlas
from neuronmap.cli import main
from neuronmap.atlas.concepts import variant_strings
from neuronmap.intervene.effects import clamp, concept_tokens, mentions, next_token_logprobs
from neuronmap.intervene.generate import generate
from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.hooks import POSITIONS, intervene, natural_range, recording, resolve
from neuronmap.runtime.specs import Intervention, Value, parse_spec, parse_sweep
from neuronmap.runtime.models import find_module, load_model, module_name, wrap_model
from neuronmap.sources.resolve import resolve_source
from neuronmap.intervene.verify import candidates, verify

PROMPT = "The picture on the wall shows a"
# Measured on the bundled 20 prompts: L29N808=20x raises P(dog variants) from 0.0040 to 0.386 on average.
MEASURED_DOG_RATIO = 95.4


@pytest.fixture(scope="session")
def demo():
    return load_model(None)


def tiny(tiny_models, family: str, dtype=torch.float32):
    path = tiny_models(family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)  # a fresh copy: tests may not share one
    return wrap_model(model, None, resolve_source(str(path)))


@contextmanager
def manual_mlps(m, ivs: list[Intervention], mask: torch.Tensor):
    """Recompute each touched layer's MLP by hand from its weights, rewriting the neurons at ``mask`` positions."""
    saved = {}
    for layer in sorted({iv.layer for iv in ivs}):
        mlp = find_module(m.model, module_name(m.family.down, layer).rsplit(".", 1)[0])

        def forward(x, mlp=mlp, layer=layer):
            if m.family.gated:
                h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [b, seq, d_mlp]
            else:
                h = mlp.act(mlp.c_fc(x))
            h = h.clone()
            for iv in (iv for iv in ivs if iv.layer == layer):
                c = h[..., iv.neuron]
                new = {"set": torch.full_like(c, iv.value), "add": c + iv.value, "scale": c * iv.value}[iv.mode]
                h[..., iv.neuron] = torch.where(mask, new, c)
            return (mlp.down_proj if m.family.gated else mlp.c_proj)(h)

        saved[mlp] = forward
        mlp.forward = forward
    try:
        yield
    finally:
        for mlp in saved:
            del mlp.forward


def n_hooks(m) -> int:
    return len(m.model._forward_pre_hooks) + sum(len(d._forward_pre_hooks) for d in m.downs)


# ------------------------------------------------------------------ specs


def test_parse_spec_modes_and_values():
    assert parse_spec("L29N808=20x") == parse_spec(" L29N808 = 20x ")
    s = parse_spec("L29N808=20x")
    assert (s.layer, s.neuron, s.mode, s.value) == (29, 808, "set", Value(20.0, True))
    assert parse_spec("L3N7+=-2.5").mode == "add" and parse_spec("L3N7+=-2.5").value == Value(-2.5)
    assert parse_spec("L3N7*=3").mode == "scale"
    assert parse_spec("L3N7").value is None
    assert str(parse_spec("L3N7+=5x")) == "L3N7+=5x"
    assert parse_sweep("0,5x,-10") == [Value(0.0), Value(5.0, True), Value(-10.0)]


@pytest.mark.parametrize("bad", ["L29N808==5", "L29N808=abc", "L29X808=5", "L29N808=", "L29N808-=5", "L29N808=5y"])
def test_malformed_specs_raise_one_line(bad):
    with pytest.raises(NeuronmapError) as e:
        parse_spec(bad)
    assert "\n" not in str(e.value) and "L29N808=20x" in str(e.value)


def test_relative_scale_factor_refused():
    with pytest.raises(NeuronmapError, match=r"\*= takes a plain factor"):
        parse_spec("L29N808*=3x")


def test_mentions_whole_words_in_any_case_and_plural():
    assert mentions("two foxes", "fox") and mentions("CITIES", "city")
    assert mentions("I love Dogs.", "dog") and mentions("a dog!", "dog")
    assert not mentions("hotdog stand", "dog") and not mentions("cats", "dog")


# ------------------------------------------------------------------ hooks on tiny models


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode,value", [("set", 3.0), ("add", -2.0), ("scale", 4.0)])
def test_modes_match_manual_mlp(tiny_models, family, mode, value):
    m = tiny(tiny_models, family)
    ids = torch.tensor([[5, 9, 3, 17, 40, 8]])
    ivs = [Intervention(1, 7, mode, value), Intervention(0, 3, "set", 1.5)]
    with torch.no_grad():
        base = m.model(ids).logits
        with intervene(m, ivs):
            got = m.model(ids).logits
        with manual_mlps(m, ivs, torch.ones(ids.shape[1], dtype=torch.bool)):
            want = m.model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


@pytest.mark.parametrize("positions", POSITIONS)
def test_positions_in_generation_match_manual(tiny_models, positions):
    m = tiny(tiny_models, "llama")
    prompt = torch.tensor([[5, 9, 3, 17, 40]])
    P = prompt.shape[1]
    ivs = [Intervention(0, 3, "set", 2.5), Intervention(1, 7, "add", 1.5)]
    with torch.no_grad(), intervene(m, ivs, positions):
        out = m.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    step = torch.stack(out.logits, 1)  # [1, G, vocab]: the cached, hooked generation's logits
    seq = out.sequences
    T = seq.shape[1]
    idx = torch.arange(T)
    # Without a cache, every position is recomputed; "last" has touched the prompt's last token and each generated one.
    mask = {"all": idx >= 0, "prompt": idx < P, "generated": idx >= P, "last": idx >= P - 1}[positions]
    with torch.no_grad():
        with manual_mlps(m, ivs, mask):
            full = m.model(seq).logits  # [1, T, vocab]
        plain = m.model(seq).logits
    torch.testing.assert_close(step, full[:, P - 1:T - 1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full, plain, atol=1e-3)


def test_last_position_in_right_padded_batch(tiny_models):
    m = tiny(tiny_models, "llama")
    rows = [[5, 9, 3, 17], [6, 8]]
    ids = torch.tensor([[5, 9, 3, 17], [6, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ivs = [Intervention(1, 7, "set", 4.0)]
    with torch.no_grad():
        with intervene(m, ivs, "last"):
            batched = m.model(input_ids=ids, attention_mask=mask).logits
            alone = [m.model(torch.tensor([r])).logits[0, -1] for r in rows]
        plain = [m.model(torch.tensor([r])).logits[0, -1] for r in rows]
    for j, r in enumerate(rows):
        torch.testing.assert_close(batched[j, len(r) - 1], alone[j], atol=1e-4, rtol=1e-4)
        # The hook did act: each row's last-token logits moved away from the unhooked model's.
        assert not torch.allclose(alone[j], plain[j], atol=1e-3)


def test_bfloat16_matches_manual(tiny_models):
    m = tiny(tiny_models, "llama", torch.bfloat16)
    assert m.dtype == torch.bfloat16
    ids = torch.tensor([[5, 9, 3, 17]])
    ivs = [Intervention(1, 7, "set", 2.5), Intervention(1, 2, "scale", -1.0)]
    with torch.no_grad():
        with intervene(m, ivs):
            got = m.model(ids).logits
        with manual_mlps(m, ivs, torch.ones(4, dtype=torch.bool)):
            want = m.model(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_hooks_removed_after_context_and_exception(tiny_models):
    m = tiny(tiny_models, "gpt2")
    before = n_hooks(m)
    with intervene(m, [Intervention(0, 1, "set", 1.0), Intervention(1, 2, "add", 1.0)]):
        assert n_hooks(m) == before + 3
    assert n_hooks(m) == before
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(m, [Intervention(0, 1, "set", 1.0)]):
            raise RuntimeError("boom")
    assert n_hooks(m) == before


def test_natural_range_cached(tmp_path, monkeypatch, tiny_with_tokenizer):
    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path))
    m = load_model(str(tiny_with_tokenizer))
    r = natural_range(m)
    assert r.shape == (m.n_layers, m.d_mlp) and (r > 0).all()
    assert len(list((tmp_path / "ranges").glob("*.npy"))) == 1
    torch.testing.assert_close(natural_range(m), r)
    iv = resolve([parse_spec("L1N5=3x"), parse_spec("L0N2*=2")], m)
    assert iv[0].value == pytest.approx(3 * float(r[1, 5])) and iv[1].value == 2.0


# ------------------------------------------------------------------ the real demo model


def test_ablating_a_layer_equals_zeroing_down_input(demo):
    ids = demo.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    layer = 20
    with torch.no_grad():
        base = demo.model(ids).logits
        with intervene(demo, [Intervention(layer, i, "set", 0.0) for i in range(demo.d_mlp)]):
            clamped = demo.model(ids).logits
        h = demo.downs[layer].register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
        try:
            zeroed = demo.model(ids).logits
        finally:
            h.remove()
    torch.testing.assert_close(clamped, zeroed, atol=1e-5, rtol=1e-5)
    assert (clamped - base).abs().max() > 0.1


def test_recording_sees_what_down_reads(demo):
    ids = demo.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    mlp = demo.model.model.layers[29].mlp
    mlp_in = {}
    h = mlp.register_forward_pre_hook(lambda mod, args: mlp_in.update(x=args[0]))
    try:
        with torch.no_grad(), recording(demo) as seen:
            demo.model(ids)
    finally:
        h.remove()
    x = mlp_in["x"]
    with torch.no_grad():
        want = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    torch.testing.assert_close(seen[29], want)


def test_known_neuron_raises_its_concept(demo):
    r = clamp(demo, [parse_spec("L29N808=20x")], "dog")
    o = r.outcomes[0]
    assert {" dog", "dog", " dogs"} <= set(r.concept.tokens) and not r.concept.approximate
    assert o.ratio > MEASURED_DOG_RATIO / 2, o.ratio
    assert o.raised == len(r.prompts) == 20
    assert 0.0 < o.kl < 2.0
    assert r.baseline.mean < 0.02 < o.mean


def test_concept_tokens_are_single_tokens(demo):
    c = concept_tokens(demo, "Dog")
    assert not c.approximate and " DOG" in c.missing
    for v, i in zip(c.tokens, c.token_ids):
        assert demo.tokenizer.encode(v, add_special_tokens=False) == [i]


def test_concept_that_is_no_single_token_uses_its_first_content_token_or_is_refused(demo):
    c = concept_tokens(demo, "qzxjvwk")
    assert c.approximate and all(t.strip() and "qzxjvwk".startswith(t.strip()) for t in c.tokens)
    with pytest.raises(NeuronmapError, match=r"^concept '🐕' matches no token of this vocabulary: .*try a word"):
        concept_tokens(demo, "🐕")  # its only prefix token is ' ': never measured by whitespace


def test_next_token_batching_matches_single_prompts(demo):
    prompts = [PROMPT, "Our family has always had a"]
    ivs = [Intervention(29, 808, "set", 30.0)]
    batched = next_token_logprobs(demo, prompts, ivs, "last")
    for j, p in enumerate(prompts):
        torch.testing.assert_close(batched[j], next_token_logprobs(demo, [p], ivs, "last")[0], atol=1e-4, rtol=1e-4)


def test_generate_pairs_samples_by_seed(demo):
    same = generate(demo, "What is your favourite animal?", [parse_spec("L29N808*=1")], n=2, max_new_tokens=5, seed=3)
    assert same.baseline == same.clamped and len(same.baseline) == 2
    r = generate(demo, "What is your favourite animal?", [parse_spec("L29N808=20x")], n=1, temperature=0,
                 max_new_tokens=5, concepts=["dog", "cat"])
    assert r.notice is None
    assert r.clamped != r.baseline
    assert [s.concept for s in r.shares] == ["dog", "cat"]
    assert r.shares[0].clamped + r.shares[1].clamped >= 1 > r.shares[0].baseline + r.shares[1].baseline, r


def test_verify_finds_and_confirms_the_dog_neuron(demo, tmp_path, capsys):
    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions

    atlas = tmp_path / "atlas"
    map_model(None, atlas, MapOptions(layers="29", device="cpu"))
    cands = candidates(Atlas.open(atlas), "dog", top=3)
    assert cands[0].id == "L29N808" and cands[0].prob > 0.5
    assert len({c.id for c in cands}) == 3  # one row per neuron
    assert main(["verify", str(atlas), "dog", "--top", "1", "--sweep", "20x", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "exact" and out["sweep"] == [{"amount": 20.0, "relative": True}]
    row = out["neurons"][0]
    assert row["id"] == "L29N808" and row["sign"] == 1 and row["causal"] is True
    assert row["best"]["ratio"] > MEASURED_DOG_RATIO / 2 and row["best"]["value"] == {"amount": 20.0, "relative": True}


# ------------------------------------------------------------------ CLI: bad input, one line each


def run_cli(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("spec", ["L29N808==5", "29:808=5"])
def test_cli_malformed_spec(spec, capsys):
    rc, _, err = run_cli(["clamp", "--neuron", spec, "--concept", "dog"], capsys)
    assert rc == 2
    assert err.startswith("error: malformed neuron spec") and err.count("\n") == 1


@pytest.mark.parametrize("spec,msg", [("L30N0=5", "layer 30 is out of range, the model has layers 0-29"),
                                      ("L29N1536=5x", "index 1536 is out of range, each layer has neurons 0-1535")])
def test_cli_neuron_out_of_range(demo, spec, msg, capsys):
    rc, _, err = run_cli(["clamp", "--neuron", spec, "--concept", "dog"], capsys)
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_cli_concept_not_in_vocabulary(tiny_with_tokenizer, capsys):
    rc, out, err = run_cli(["clamp", str(tiny_with_tokenizer), "--neuron", "L1N5=3", "--concept", "doggo", "--json"], capsys)
    assert rc == 0 and err == ("notice: no variant of 'doggo' is a single token: measured by its first token(s) 'dog', "
                               "which stand for more than the concept\n")
    assert json.loads(out)["concept"] == {"concept": "doggo", "tokens": [{"id": 18, "token": "dog"}],
                                          "missing": variant_strings("doggo"), "approximate": True}
    rc, _, err = run_cli(["clamp", str(tiny_with_tokenizer), "--neuron", "L1N5=3", "--concept", "qzxjvwk"], capsys)
    assert rc == 2 and err.startswith("error: concept 'qzxjvwk' matches no token of this vocabulary") and err.count("\n") == 1


def test_cli_clamp_json(demo, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Our family has always had a\n\nI took a photo of a\n")
    rc, out, _ = run_cli(["clamp", "--neuron", "L29N808=20x", "--concept", "dog", "--prompts", str(prompts),
                          "--sweep", "0,10x,20x", "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert [s["label"] for s in d["settings"]] == ["L29N808=0", "L29N808=10x", "L29N808=20x"]
    assert [s["value"]["amount"] for s in d["settings"]] == [0.0, 10.0, 20.0]
    assert d["prompts"] == ["Our family has always had a", "I took a photo of a"] and len(d["baseline"]["probs"]) == 2
    assert d["settings"][2]["interventions"][0] == {**d["settings"][2]["interventions"][0], "id": "L29N808",
                                                     "layer": 29, "neuron": 808, "mode": "set"}
    # Dose-response: more activation, more "dog".
    ratios = [s["ratio"] for s in d["settings"]]
    assert ratios[0] < 2 < ratios[1] < ratios[2]


def test_cli_chat_without_template_falls_back(tiny_with_tokenizer, capsys):
    rc, out, err = run_cli(["generate", str(tiny_with_tokenizer), "--clamp", "L1N5=3", "--chat",
                            "what is your favourite animal", "-n", "2", "--max-new-tokens", "3", "--json"], capsys)
    assert rc == 0
    assert err == f"notice: {tiny_with_tokenizer} has no chat template: the message is used as plain text\n"
    d = json.loads(out)
    assert d["chat_template"] is False and len(d["baseline"]) == len(d["clamped"]) == 2


def test_cli_relative_value_without_tokenizer(tiny_models, capsys):
    path = tiny_models("gpt2")
    rc, _, err = run_cli(["generate", str(path), "--clamp", "L0N1=3x", "--prompt", "hi"], capsys)
    assert rc == 2 and "has no tokenizer transformers can load" in err and err.count("\n") == 1


# ------------------------------------------------------------------ results serialize themselves


def round_trips(d: dict) -> dict:
    """``d`` through strict JSON (no NaN or inf) and back, unchanged."""
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back == d
    return back


def test_clamp_and_generate_results_serialize_and_are_what_the_cli_prints(tiny_with_tokenizer, capsys):
    m = load_model(str(tiny_with_tokenizer))
    r = clamp(m, [parse_spec("L1N5")], "dog", sweep="0,2x")
    d = round_trips(r.to_dict())
    assert [s["value"] for s in d["settings"]] == [{"amount": 0.0, "relative": False}, {"amount": 2.0, "relative": True}]
    assert len(d["prompts"]) == len(d["settings"][1]["probs"]) == 20 and d["baseline"]["ratio"] == 1.0
    assert dataclasses.replace(r.outcomes[0], ratio=float("inf")).to_dict()["ratio"] is None
    rc, out, _ = run_cli(["clamp", str(tiny_with_tokenizer), "--neuron", "L1N5", "--concept", "dog", "--sweep", "0,2x",
                          "--json"], capsys)
    assert rc == 0 and json.loads(out) == d

    g = generate(m, "what is your favourite animal", [parse_spec("L1N5=3")], n=2, max_new_tokens=3, concepts=["dog"],
                 chat=False)
    d = round_trips(g.to_dict())
    assert d["shares"][0]["concept"] == "dog" and d["interventions"][0]["id"] == "L1N5" and d["chat_template"] is False
    rc, out, _ = run_cli(["generate", str(tiny_with_tokenizer), "--clamp", "L1N5=3", "--prompt", "what is your favourite animal",
                          "-n", "2", "--max-new-tokens", "3", "--concept", "dog", "--json"], capsys)
    assert rc == 0 and json.loads(out) == d


@pytest.fixture()
def tiny_atlas(tiny_with_tokenizer, tmp_path):
    """A private copy of the tokenized tiny checkpoint and its atlas: ``(checkpoint, atlas)``."""
    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_with_tokenizer, ckpt)
    atlas = tmp_path / "atlas"
    map_model(str(ckpt), atlas, MapOptions(top_k=5, device="cpu"))
    return ckpt, atlas


def test_verify_result_serializes_and_is_what_the_cli_prints(tiny_atlas, capsys):
    _, atlas = tiny_atlas
    r = verify(Atlas.open(atlas), "dog", top=2, sweep="2x,-1", min_ratio=1.0)
    d = round_trips(r.to_dict())
    assert r.method == "exact" and len(d["neurons"]) == 2 and d["min_ratio"] == 1.0
    for v, row in zip(r.rows, d["neurons"]):
        assert row["causal"] is v.causal is (v.best.ratio >= 1.0)
        assert [s["value"]["amount"] for s in row["sweep"]] == [2.0 * v.sign, -1.0 * v.sign]
    rc, out, _ = run_cli(["verify", str(atlas), "dog", "--top", "2", "--sweep", "2x,-1", "--min-ratio", "1", "--json"], capsys)
    assert rc == 0 and json.loads(out) == d


def test_verify_refuses_a_checkpoint_changed_since_mapping(tiny_atlas, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ckpt, atlas = tiny_atlas
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    tensors = load_file(ckpt / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NeuronmapError, match=r"^the weights changed since mapping: .*model\.safetensors has sha256 \w+\.\.\., "
                                             r"the atlas recorded \w+\.\.\.; re-map with `neuronmap map .*`, "
                                             r"or pass source=PATH if the weights only moved$"):
        verify(Atlas.open(atlas), "dog", top=1, sweep="2x")
    rc, _, err = run_cli(["verify", str(atlas), "dog", "--top", "1", "--sweep", "2x"], capsys)
    assert rc == 2 and err.startswith("error: the weights changed since mapping:") and err.count("\n") == 1
    # The unchanged weights elsewhere: exact candidates; another model: the stored top-k.
    assert verify(Atlas.open(atlas), "dog", str(moved), top=1, sweep="2x").method == "exact"
    assert verify(Atlas.open(atlas), "dog", str(ckpt), top=1, sweep="2x").method == "stored"


def test_cli_defaults_are_the_api_defaults():
    import inspect

    from neuronmap.cli import build_parser

    def api(fn, name):
        return inspect.signature(fn).parameters[name].default

    p = build_parser()
    g = p.parse_args(["generate", "--clamp", "L0N0=1", "--prompt", "hi"])
    assert (g.n, g.temperature, g.seed, g.max_new_tokens, g.positions) == tuple(
        api(generate, k) for k in ("n", "temperature", "seed", "max_new_tokens", "positions"))
    assert (g.device, g.dtype) == (api(load_model, "device"), api(load_model, "dtype"))
    v = p.parse_args(["verify", "atlas", "dog"])
    assert (v.top, v.sweep, v.min_ratio, v.positions, v.device, v.dtype, v.source) == tuple(
        api(verify, k) for k in ("top", "sweep", "min_ratio", "positions", "device", "dtype", "source"))
    c = p.parse_args(["clamp", "--neuron", "L0N0=1", "--concept", "dog"])
    assert (c.sweep, c.positions) == (api(clamp, "sweep"), api(clamp, "positions"))


def test_cli_value_that_overflows_the_model_is_refused(tiny_with_tokenizer, capsys):
    """A finite clamp value can still overflow float32 inside the model: one line, never NaN in --json."""
    rc, out, err = run_cli(["clamp", str(tiny_with_tokenizer), "--neuron", "L1N5=3e38", "--neuron", "L0N5=3e38",
                            "--concept", "dog", "--json"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: the model's logits are not finite with L1N5=3e+38, L0N5=3e+38: the value overflows")
    rc, out, err = run_cli(["clamp", str(tiny_with_tokenizer), "--neuron", "L1N5=1e308x", "--concept", "dog", "--json"], capsys)
    assert rc == 2 and "1e+308x comes to inf, which the model's float32 activations cannot hold" in err


@pytest.mark.parametrize("argv", [["clamp", "{m}", "--neuron", "L1N5", "--concept", "dog"],
                                  ["generate", "{m}", "--clamp", "L1N5", "--prompt", "hello"]])
def test_cli_spec_without_value_fails_before_the_model_loads(argv, tmp_path, capsys):
    """The model path does not exist: the error about the value must come first, from the arguments alone."""
    rc, _, err = run_cli([a.format(m=tmp_path / "absent") for a in argv], capsys)
    assert rc == 2 and err == "error: neuron spec 'L1N5' has no value: give one (e.g. L1N5=20x) or a --sweep\n"


def test_generate_api_refuses_a_nan_temperature(tiny_with_tokenizer):
    m = load_model(str(tiny_with_tokenizer))
    with pytest.raises(NeuronmapError, match="temperature=nan is not a number >= 0"):
        generate(m, "hello", [parse_spec("L1N5=3")], temperature=float("nan"))
