"""Each adapter proven against the family's own transformers modules, on tiny random checkpoints."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_FAMILIES, tiny_config
from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.families import FAMILIES, family_for_gguf_arch, family_for_model_type
from neuronmap.decode.engine import resolve_dtype
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions


def _final_norm_and_head(model):
    """The oracle: the family's own final-norm module, and its LM head with softcap."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm"):
        try:
            norm = model.get_submodule(path)
            break
        except AttributeError:
            continue
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def decode(x):
        z = head(norm(x))
        return torch.tanh(z / cap) * cap if cap else z

    return decode


def _own_vectors(model, family, matrix, layer):
    """Neuron vectors read from the live transformers modules, [d_mlp, d_model]."""
    sd = {k: v for k, v in model.state_dict().items()}
    d_mlp = 24
    if family == "gpt2":
        w = sd[f"transformer.h.{layer}.mlp.c_fc.weight"].T if matrix == "up" else sd[f"transformer.h.{layer}.mlp.c_proj.weight"]
        return w
    if family == "gpt_neox":
        return sd[f"gpt_neox.layers.{layer}.mlp.dense_h_to_4h.weight"] if matrix == "up" else sd[f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight"].T
    if family == "opt":
        return sd[f"model.decoder.layers.{layer}.fc1.weight"] if matrix == "up" else sd[f"model.decoder.layers.{layer}.fc2.weight"].T
    if family == "phi3":
        gu = sd[f"model.layers.{layer}.mlp.gate_up_proj.weight"]
        return {"gate": gu[:d_mlp], "up": gu[d_mlp:], "down": sd[f"model.layers.{layer}.mlp.down_proj.weight"].T}[matrix]
    w = sd[f"model.layers.{layer}.mlp.{matrix}_proj.weight"]
    return w.T if matrix == "down" else w


# auto: the default, split (the fused kernel) where this CPU has AVX512-BF16, else float32 again.
@pytest.mark.parametrize("dtype", ["float32", "auto"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_atlas_logits_equal_the_familys_own_modules(family, dtype, tiny_models, tmp_path):
    path = tiny_models(family)
    model = AutoModelForCausalLM.from_pretrained(path)
    result = map_model(str(path), tmp_path / "atlas", MapOptions(top_k=64, dtype=dtype, device="cpu"))
    assert result.meta["dtype"] == resolve_dtype(dtype, torch.device("cpu"))
    table = pq.read_table(result.path / "neurons.parquet").to_pandas()
    decode = _final_norm_and_head(model)
    fam = family_for_model_type(model.config.model_type)
    assert set(table["matrix"]) == set(fam.matrices)
    rng = np.random.default_rng(0)
    checked = 0
    for matrix in fam.matrices:
        for layer in (0, 1):
            vecs = _own_vectors(model, family, matrix, layer)
            for neuron in rng.choice(24, size=6, replace=False):
                for pole, sign in (("+", 1.0), ("-", -1.0)):
                    row = table[(table.matrix == matrix) & (table.layer == layer) & (table.neuron == neuron) & (table.pole == pole)].iloc[0]
                    with torch.no_grad():
                        want = decode(sign * vecs[neuron].float()[None])[0].double()
                    got = np.zeros(64)
                    got[np.asarray(row.token_ids)] = np.asarray(row.logits)
                    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
                    assert abs(row.logsumexp - torch.logsumexp(want, 0).item()) < 1e-4
                    p = torch.softmax(want, 0)
                    assert abs(row.entropy - float(-(p * p.log()).sum())) < 1e-4
                    assert abs(row.weight_norm - float(vecs[neuron].norm())) < 1e-4
                    assert row.id == f"L{layer}N{neuron}"
                    checked += 1
    assert checked == len(fam.matrices) * 2 * 6 * 2


def test_fold_input_norm_multiplies_read_vectors_by_the_pre_mlp_gain(tiny_models, tmp_path):
    path = tiny_models("gemma2")
    model = AutoModelForCausalLM.from_pretrained(path)
    plain = map_model(str(path), tmp_path / "a", MapOptions(top_k=64, matrices="up,down", dtype="float32", device="cpu"))
    folded = map_model(str(path), tmp_path / "b", MapOptions(top_k=64, matrices="up,down", dtype="float32", device="cpu",
                                                            fold_input_norm=True))
    a = pq.read_table(plain.path / "neurons.parquet").to_pandas().set_index(["matrix", "layer", "neuron", "pole"])
    b = pq.read_table(folded.path / "neurons.parquet").to_pandas().set_index(["matrix", "layer", "neuron", "pole"])
    gain = 1.0 + model.model.layers[1].pre_feedforward_layernorm.weight.detach()  # Gemma's 1 + w
    w = model.model.layers[1].mlp.up_proj.weight.detach()[5]
    assert abs(b.loc[("up", 1, 5, "+")].weight_norm - float((w * gain).norm())) < 1e-4
    assert abs(a.loc[("up", 1, 5, "+")].weight_norm - float(w.norm())) < 1e-4
    # down vectors are written, not read: folding leaves them alone.
    assert a.loc[("down", 0, 3, "+")].weight_norm == b.loc[("down", 0, 3, "+")].weight_norm
    assert folded.meta["decode"]["fold_input_norm"] is True


def test_norm_none_skips_the_final_norm(tiny_models, tmp_path):
    path = tiny_models("llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    r = map_model(str(path), tmp_path / "a", MapOptions(top_k=64, norm="none", dtype="float32", device="cpu", matrices="up", layers="0"))
    row = pq.read_table(r.path / "neurons.parquet").to_pandas().iloc[0]
    want = (model.lm_head.weight.detach() @ model.model.layers[0].mlp.up_proj.weight.detach()[0]).double()
    got = np.zeros(64)
    got[np.asarray(row.token_ids)] = np.asarray(row.logits)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    assert r.meta["decode"]["final_norm"] == "none"


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(NeuronmapError) as e:
        family_for_model_type("mamba")
    msg = str(e.value)
    assert "unknown model family 'mamba'" in msg
    for fam in FAMILIES:
        assert fam.name in msg
    with pytest.raises(NeuronmapError, match="unknown model family 'rwkv'.*known families: llama"):
        family_for_gguf_arch("rwkv")


def test_every_family_is_tested():
    # The families the parametrized reference test above runs on, read from its own parameter list.
    marks = {m.args[0]: m for m in test_atlas_logits_equal_the_familys_own_modules.pytestmark if m.name == "parametrize"}
    assert marks["family"].args == ("family", TINY_FAMILIES)
    tested = {family_for_model_type(tiny_config(name).model_type).name for name in TINY_FAMILIES}
    assert tested == {f.name for f in FAMILIES}


def test_a_family_with_a_norm_the_decoder_cannot_reproduce_is_refused():
    import dataclasses

    llama = next(f for f in FAMILIES if f.name == "llama")
    with pytest.raises(ValueError, match="norm 'batch' is not one of rms, rms_1p, layer"):
        dataclasses.replace(llama, norm="batch")
