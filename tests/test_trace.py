"""``trace``: the target's logit split into every neuron's direct contribution and groups that sum to it; ablations;
labels from a real atlas; bad input. Tiny checkpoints of every family check the maths per norm kind, bias and
softcap; the real demo model checks the Paris and dog prompts (figures in docs/trace.md)."""

from __future__ import annotations

import json

import pytest
import torch

from neuronmap.atlas.handle import Atlas
from neuronmap.atlas.labels import neuron_labels
from neuronmap.cli import main
from neuronmap.intervene.attribution import decompose, pre_softcap
from neuronmap.intervene.capture import capture, last_logit, model_head
from neuronmap.intervene.trace import trace
from neuronmap.runtime.models import load_model
from neuronmap.runtime.specs import Intervention

# Norm kinds (rms, rms_1p, layer), MLP biases (gpt2, gpt_neox, opt), Conv1D (gpt2), Gemma's MLP-output norm and softcap.
FAMILIES = ["llama", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt"]
PARIS = "The capital of France is"
DOG = "My favourite pet is my"


@pytest.mark.parametrize("family", FAMILIES)
def test_contributions_sum_to_the_logit_in_every_family(tiny_models, family):
    m = load_model(str(tiny_models(family)), "cpu")
    ids = torch.tensor([[5, 9, 17, 3, 40, 22]])
    pos = torch.tensor([2, 5])
    c = capture(m, ids, pos)
    head = model_head(m)
    targets = c.logits.argmin(-1)  # any token: the least likely is as exact as the top
    contrib, groups, _ = decompose(m, c, head, targets)
    for p in range(2):
        total = sum(g["contribution"] for g in groups[p])
        neurons = float(contrib[p].double().sum())
        mlp = sum(g["contribution"] for g in groups[p] if g["group"] == "mlp")
        assert neurons == pytest.approx(mlp, rel=1e-9, abs=1e-9)
        assert total == pytest.approx(float(pre_softcap(head, c.final_in, targets)[p]), rel=1e-4, abs=1e-4)
        real = float(c.logits[p, targets[p]])
        capped = head.softcap * torch.tanh(torch.tensor(total / head.softcap)) if head.softcap else total
        assert float(capped) == pytest.approx(real, rel=1e-4, abs=1e-4), family
    assert (head.softcap is not None) == family.startswith(("gemma2", "gemma3"))
    # Gemma 2/3 norm the MLP output: without that factor the neurons would not sum to what the MLP wrote.
    assert (m.family.mlp_out_norm is not None) == family.startswith(("gemma2", "gemma3"))


# Not Gemma 2/3: zeroing a neuron also changes the scale of their norm of the MLP output, which is not frozen.
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_last_layer_ablation_with_frozen_norm_equals_minus_direct(tiny_models, family):
    m = load_model(str(tiny_models(family)), "cpu")
    ids = torch.tensor([[5, 9, 17, 3]])
    c = capture(m, ids, torch.tensor([3]))
    head = model_head(m)
    t = int(c.logits[0].argmax())
    contrib, _, scale = decompose(m, c, head, torch.tensor([t]))
    last = m.n_layers - 1
    n = int(contrib[0, last].abs().argmax())
    base = last_logit(m, ids, t, [], head, float(scale[0]))
    ablated = last_logit(m, ids, t, [Intervention(last, n, "set", 0.0)], head, float(scale[0]))
    assert float(ablated - base) == pytest.approx(-float(contrib[0, last, n]), abs=1e-4)


# ------------------------------------------------------------------ the real demo model


@pytest.fixture(scope="module")
def demo():
    return load_model(None)


@pytest.fixture(scope="module")
def tail_atlas(tmp_path_factory):
    """The demo model's last three layers mapped (every matrix and pole): where the dog prompt's contributors are."""
    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions

    out = tmp_path_factory.mktemp("trace-atlas") / "tail"
    map_model(None, out, MapOptions(layers="27-29"))
    return out


def test_paris_contributions_sum_to_the_logit_and_ablation_matches(demo):
    r = trace(demo, PARIS, ablate=2)
    p = r.positions[-1]
    assert p.target == " Paris" and p.prob > 0.5
    assert abs(p.difference) < 1e-3 * abs(p.logit)
    assert abs(p.sum_of_contributions - p.logit) < 1e-3 * abs(p.logit)
    assert p.lens[-1]["prob"] == pytest.approx(p.prob, rel=1e-4) and p.lens[-1]["top_token"] == " Paris"
    assert p.lens[10]["prob"] < 0.01  # the prediction forms in the last layers
    top = p.neurons[0]
    assert top.contribution == max(n.contribution for n in p.neurons) > 0
    assert p.neurons[-1].contribution < 0
    a = r.ablations[0]
    assert a.neuron == top.neuron and top.layer == demo.n_layers - 1  # nothing downstream of it but the final norm
    assert a.change_frozen == pytest.approx(-top.contribution, abs=1e-4)
    assert abs(a.change + top.contribution) > 1e-2  # the norm's own response: where the linear attribution stops


def test_dog_prompt_has_a_contributor_whose_down_vector_decodes_to_dog(demo, tail_atlas):
    r = trace(demo, DOG, target="dog", atlas=Atlas.open(tail_atlas), top=20)
    p = r.positions[-1]
    assert p.target == " dog"
    a = Atlas.open(tail_atlas)
    top_k = a.meta["decode"]["top_k"]
    decoding = [n for n in p.neurons if n.contribution > 0 and n.target_rank <= top_k]
    assert decoding, [(n.neuron, n.target_rank) for n in p.neurons]
    for n in decoding:  # the exact rank and the atlas's stored top-k of the written pole agree
        pole = "+" if n.activation >= 0 else "-"
        stored = neuron_labels(a, [(n.layer, n.index, pole)], k=top_k)[n.neuron]["down"]
        assert stored.index(" dog") + 1 == n.target_rank
        assert n.label["down"] == stored[:len(n.label["down"])]


def test_cli_json_fields(demo, capsys):
    assert main(["trace", PARIS, "--top", "3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("text", "target", "logit", "prob", "sum_of_contributions", "neurons", "groups", "lens"):
        assert k in d
    assert {"neuron", "layer", "index", "activation", "contribution"} <= set(d["neurons"][0])
    assert len(d["lens"]) == demo.n_layers and d["target"] == " Paris"


def test_cli_positions_all_lists_active_neurons(demo, capsys):
    assert main(["trace", "The dog", "--positions", "all", "--top", "4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [p["position"] for p in d["positions"]] == list(range(len(d["tokens"])))
    act = d["positions"][0]["active"]
    assert len(act) == 4 and abs(act[0]["activation"]) >= abs(act[-1]["activation"])  # by |activation| without evidence


@pytest.mark.parametrize("argv, message", [
    (["trace", "   "], "error: the text is empty"),
    (["trace", PARIS, "--target", "Parisian"], "error: --target 'Parisian' is 2 tokens"),
    (["trace", PARIS, "--positions", "99"], "error: --positions 99 is past the end of the text: it has 5 tokens"),
    (["trace", PARIS, "--positions", "middle"], "error: --positions 'middle': expected last, all or a token index"),
])
def test_cli_bad_input(demo, capsys, argv, message):
    assert main(argv) == 2
    e = capsys.readouterr().err
    assert e.startswith(message) and e.count("\n") == 1, e


def test_cli_refuses_an_atlas_of_another_model(demo, atlas, capsys):
    assert main(["trace", "smollm2-135m", PARIS, "--atlas", str(atlas)]) == 2
    e = capsys.readouterr().err
    assert e.startswith("error: ") and "is not what this atlas was mapped from" in e and e.count("\n") == 1, e
