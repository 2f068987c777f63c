"""Decode exactness on the real demo model against an fp64 reference, and the engine's building blocks."""

import re

import numpy as np
import pytest
import torch

from neuronmap.decode.engine import _compile_failed, build_head, choose_reducer, compiled_reduce, decode_block, reduce_logits, resolve_device, resolve_dtype
from neuronmap.decode.head import Head
from neuronmap.decode import fused
from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.resolve import open_weights

# The fused split kernel needs AVX512-BF16 and a C compiler; elsewhere `auto` is float32 and these cases skip.
needs_kernel = pytest.mark.skipif(fused.status() != "ok", reason=f"fused kernel: {fused.status()}")
SPLIT = pytest.param("split", marks=needs_kernel)


@pytest.fixture(scope="module")
def demo():
    return open_weights(None)


def _fp64_reference(weights, x: torch.Tensor, sign: float):
    """Everything in float64, straight from the definition: softmax(W_U @ rmsnorm(sign * x)) (Gemma: gain 1 + w)."""
    w, _ = weights.final_norm()
    assert weights.family.norm in ("rms", "rms_1p") and weights.head_bias() is None
    gain = w.double() + (1.0 if weights.family.norm == "rms_1p" else 0.0)
    xx = sign * x.double()
    h = xx * torch.rsqrt(xx.pow(2).mean(-1, keepdim=True) + weights.eps) * gain
    z = h @ weights.head().double().T  # [n, d_vocab]
    if weights.softcap:
        z = torch.tanh(z / weights.softcap) * weights.softcap
    return z, torch.logsumexp(z, -1)


def _sample(weights, seed=0, per=64):
    rng = np.random.default_rng(seed)
    rows = []
    for layer in rng.choice(weights.n_layers, size=min(6, weights.n_layers), replace=False):
        for matrix in ("gate", "up", "down"):
            v = weights.vectors(matrix, int(layer))
            rows.append(v[torch.from_numpy(rng.choice(weights.d_mlp, size=per, replace=False))])
    return torch.cat(rows)  # [n, d_model]


# bf16 screening rounds the tail's logits: documented bounds in docs/method.md. split (the default) is held to
# issue 13's criteria: probabilities and log-sum-exp within 1e-4 of fp64, top-k equal but at near-ties.
@pytest.mark.parametrize("dtype, prob_tol, lse_tol, ent_tol", [
    ("float32", 1e-3, 1e-4, 1e-3), ("bfloat16", 1e-2, 5e-2, 5e-2), pytest.param("split", 1e-4, 1e-4, 1e-4, marks=needs_kernel)])
def test_topk_and_probs_match_fp64_on_the_demo_model(demo, dtype, prob_tol, lse_tol, ent_tol):
    _check_model_against_fp64(demo, dtype, prob_tol, lse_tol, ent_tol)


def _check_model_against_fp64(weights, dtype, prob_tol, lse_tol, ent_tol):
    x = _sample(weights)
    head = build_head(weights, "final", "cpu", dtype)
    with torch.inference_mode():
        out = decode_block(head, x, k=10)
    n_total = n_same = 0
    for pole, sign in (("+", 1.0), ("-", -1.0)):
        z, lse = _fp64_reference(weights, x, sign)
        ref = torch.topk(z, 10, -1)
        d = out[pole]
        same = (d.token_ids == ref.indices).all(-1)
        n_total += len(same)
        n_same += int(same.sum())
        for i in torch.nonzero(~same).flatten().tolist():
            # Any disagreement must be a near-tie: our tokens' true logits within 1e-3 of the reference's.
            ours = z[i, d.token_ids[i]]
            assert (ours - ref.values[i]).abs().max() < 1e-3, f"row {i}: not a near-tie"
        ref_p = torch.exp(z.gather(1, d.token_ids) - lse[:, None])
        assert (d.probs.double() - ref_p).abs().max() < prob_tol
        assert (d.logsumexp.double() - lse).abs().max() < lse_tol
        p = torch.softmax(z, -1)
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
        assert (d.entropy.double() - ent).abs().max() < ent_tol
    assert n_same / n_total >= 0.99 if dtype == "bfloat16" else n_same / n_total >= 0.999


def _bf16_checkpoint(out, d_model=512, d_mlp=256, d_vocab=20000, seed=0):
    """A llama-family checkpoint stored in bf16, as Llama 3.1 is, with an outlier in the final norm's gain."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": d_model,
           "intermediate_size": d_mlp, "vocab_size": d_vocab, "num_attention_heads": 8, "num_key_value_heads": 8,
           "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg))
    gain = 1 + 0.3 * torch.randn(d_model, generator=g)
    gain[:4] *= 20  # massive-activation dimensions, where the split's rounding matters most
    sd = {"model.embed_tokens.weight": torch.randn(d_vocab, d_model, generator=g) * 0.02,
          "lm_head.weight": torch.randn(d_vocab, d_model, generator=g) * 0.05, "model.norm.weight": gain}
    for i in range(2):
        for m in ("gate", "up"):
            sd[f"model.layers.{i}.mlp.{m}_proj.weight"] = torch.randn(d_mlp, d_model, generator=g) * 0.05
        sd[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(d_model, d_mlp, generator=g) * 0.05
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(d_model)
    save_file({k: v.bfloat16().contiguous() for k, v in sd.items()}, out / "model.safetensors")
    return out


# The default (split) against fp64 on Gemma 3 (gain 1 + w, a 262k-token fp32 head split in two) and on a bf16
# checkpoint (the head used as stored), with issue 13's criteria. Gemma 3's logits reach a few hundred, where
# even the fp32 path's log-sum-exp is off by 1.7e-4 (measured): there split is held to 3x that, its entropy to 2e-4.
@needs_kernel
@pytest.mark.parametrize("model, lse_tol, ent_tol", [("gemma3", 5e-4, 2e-4), ("bf16", 1e-4, 1e-4)])
def test_split_matches_fp64_on_gemma3_and_a_bf16_checkpoint(model, lse_tol, ent_tol, request, tmp_path):
    if model == "gemma3":
        weights = open_weights(str(request.getfixturevalue("gemma_gguf")))
    else:
        weights = open_weights(str(_bf16_checkpoint(tmp_path)))
        assert weights.head(native=True).dtype == torch.bfloat16
    head = build_head(weights, "final", "cpu", "split")
    assert head.packed.nw == (2 if model == "gemma3" else 1)
    _check_model_against_fp64(weights, "split", 1e-4, lse_tol, ent_tol)


@pytest.mark.parametrize("dtype", ["float32", SPLIT])
def test_odd_head_minus_pole_equals_decoding_the_negated_vector(demo, dtype):
    head = build_head(demo, "final", "cpu", dtype)
    assert head.odd
    x = demo.vectors("up", 29)[:32]
    with torch.inference_mode():
        both = decode_block(head, x, k=5)
        neg = decode_block(head, -x, k=5)
    assert torch.equal(both["-"].token_ids, neg["+"].token_ids)
    assert torch.allclose(both["-"].logsumexp, neg["+"].logsumexp, atol=1e-4)


def _random_head(v: int, d: int, dtype: str, softcap=None, b_U=None, bf16_values=True) -> Head:
    g = torch.Generator().manual_seed(v)
    W = torch.randn(v, d, generator=g) * 0.5
    W = W.bfloat16().float() if bf16_values else W  # exact in bf16, like a bf16 checkpoint; else split by the kernel
    packed = fused.pack_head(W.bfloat16() if bf16_values else W) if dtype == "split" else None
    return Head(norm="none", gain=None, bias=None, eps=0.0, W_U=W, W_U_screen=W.bfloat16() if dtype == "bfloat16" else None,
                b_U=b_U, softcap=softcap, packed=packed)


def _check_against_fp64(head: Head, x: torch.Tensor, out: dict, k: int, tol: float) -> None:
    for pole, sign in (("+", 1.0), ("-", -1.0)):
        z = sign * x.double() @ head.W_U.double().T
        if head.b_U is not None:
            z = z + head.b_U.double()
        if head.softcap:
            z = torch.tanh(z / head.softcap) * head.softcap
        d = out[pole]
        assert torch.equal(d.token_ids, torch.topk(z, k, -1).indices), pole
        lse = torch.logsumexp(z, -1)
        assert (d.logsumexp.double() - lse).abs().max() < tol
        assert (d.probs.double() - torch.exp(z.gather(1, d.token_ids) - lse[:, None])).abs().max() < tol
        p = torch.softmax(z, -1)
        assert (d.entropy.double() - (-(p * p.log()).sum(-1))).abs().max() < 10 * tol


# Vocabularies below one group (and one kernel panel), not a multiple of either, and a multiple; an odd d_model.
@pytest.mark.parametrize("v", [50, 1001, 64 * 40])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", SPLIT])
@pytest.mark.parametrize("d", [32, 45])
def test_decode_block_matches_fp64_on_any_vocabulary_size(v, dtype, d):
    head = _random_head(v, d, dtype, bf16_values=d == 32)  # d 45: an fp32 head, split into two bf16 halves
    x = torch.randn(37, d, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = decode_block(head, x, k=7, chunk=16)
    # bf16 screening: exact top-k (the candidates are rescored) but a rounded tail in the sums.
    _check_against_fp64(head, x, out, 7, 1e-4 if dtype == "float32" else 1e-2)


@pytest.mark.parametrize("dtype", ["float32", SPLIT])
def test_decode_block_with_head_bias_and_softcap(dtype):
    v = 1001
    b_U = torch.randn(v, generator=torch.Generator().manual_seed(2))
    head = _random_head(v, 32, dtype, softcap=5.0, b_U=b_U)
    assert not head.odd
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        _check_against_fp64(head, x, decode_block(head, x, k=5), 5, 1e-4)
    odd = _random_head(v, 32, dtype, softcap=5.0)
    with torch.inference_mode():
        _check_against_fp64(odd, x, decode_block(odd, x, k=5), 5, 1e-4)


@pytest.mark.slow  # a cold torch.compile
def test_compiled_kernel_gives_the_eager_numbers():
    z = torch.randn(24, 64 * 30 + 5, generator=torch.Generator().manual_seed(4)) * 4
    with torch.inference_mode():
        for minus in (True, False):  # odd heads, and heads with a bias (one pole per pass)
            eager, fused = reduce_logits(z, minus), compiled_reduce(z, minus)
            assert not _compile_failed, _compile_failed
            assert len(fused) == (8 if minus else 4)
            for a, b in zip(eager, fused):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        eager = reduce_logits(z, True)
    _, m, s, _ = eager[:4]
    assert torch.allclose(m[:, 0] + s.log(), torch.logsumexp(z, -1), atol=1e-5)
    assert torch.allclose(eager[5][:, 0] + eager[6].log(), torch.logsumexp(-z, -1), atol=1e-5)


def test_kernel_choice():
    assert choose_reducer("auto", 1e6) is reduce_logits
    assert choose_reducer("auto", 1e11) is compiled_reduce
    assert choose_reducer("eager", 1e11) is reduce_logits
    with pytest.raises(NeuronmapError, match="unknown kernel='fast': expected one of auto, eager, compiled"):
        choose_reducer("fast", 1)


def test_device_and_dtype_choices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == ("split" if fused.status() == "ok" else "float32")
    assert resolve_dtype("float32", torch.device("cpu")) == "float32"
    with pytest.raises(NeuronmapError, match="unknown dtype='half'"):
        resolve_dtype("half", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(NeuronmapError, match="device=cuda was asked for, but no CUDA GPU is available"):
            resolve_device("cuda")


def test_bf16_screening_keeps_a_bf16_head_only_once(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from neuronmap.sources.resolve import open_weights

    path = tiny_models("llama")
    bf = tmp_path / "bf16"
    shutil.copytree(path, bf)
    sd = load_file(bf / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in sd.items()}, bf / "model.safetensors")
    head = build_head(open_weights(str(bf)), "final", "cpu", "bfloat16")
    assert head.W_U.dtype == torch.bfloat16 and head.W_U_screen is head.W_U
    fp = build_head(open_weights(str(path)), "final", "cpu", "bfloat16")  # an fp32 head is kept for exact rescoring
    assert fp.W_U.dtype == torch.float32 and fp.W_U_screen.dtype == torch.bfloat16
    x = open_weights(str(bf)).vectors("up", 0)
    exact = build_head(open_weights(str(bf)), "final", "cpu", "float32")
    with torch.inference_mode():
        a, b = decode_block(head, x, k=3), decode_block(exact, x, k=3)
    assert torch.equal(a["+"].token_ids, b["+"].token_ids)


@needs_kernel
def test_fused_kernel_gives_the_same_bits_on_any_number_of_threads():
    # A Ray worker runs one thread, a map here two: their parts must be the same atlas rows.
    W = torch.randn(5000, 70, generator=torch.Generator().manual_seed(5)).bfloat16()
    h = torch.randn(13, 70, generator=torch.Generator().manual_seed(6))
    packed, threads = fused.pack_head(W), torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(fused.decode_rows(packed, h, 5, True))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_auto_falls_back_to_float32_without_avx512_bf16(monkeypatch):
    # A CPU without the instruction (its flags read from /proc/cpuinfo): auto is exact fp32, split is refused in one line.
    from neuronmap.decode import native

    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    native.load.cache_clear()
    fused._load.cache_clear()
    try:
        why = "the fused kernel is not available (this CPU lacks avx512bw, avx512vl, avx512dq, avx512_bf16)"
        assert fused.status() == why
        assert resolve_dtype("auto", torch.device("cpu")) == "float32"
        with pytest.raises(NeuronmapError, match=re.escape(f"dtype=split cannot run on cpu: {why}; use dtype=float32")):
            resolve_dtype("split", torch.device("cpu"))
    finally:
        monkeypatch.undo()
        native.load.cache_clear()
        fused._load.cache_clear()


@pytest.mark.skipif(fused._amx() is None, reason="no AMX-BF16 here (or Linux refused the tile state)")
@pytest.mark.parametrize("bf16_head", [True, False])
def test_amx_kernel_matches_fp64_and_the_avx512_kernel(bf16_head, monkeypatch):
    # 37 rows: two whole AMX tiles of 16 and 5 rows on vdpbf16ps; d_model 96 (three 32-wide steps); 1000 tokens (a short
    # last panel). Both builds must give the fp64 top-10 in order, and sums that agree to fp32 rounding.
    g = torch.Generator().manual_seed(7)
    W = torch.randn(1000, 96, generator=g) * 0.05
    W = W.bfloat16() if bf16_head else W
    h = torch.randn(37, 96, generator=g) * 3
    packed, ref = fused.pack_head(W), h.double() @ W.double().T  # [37, 1000]
    outs = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("NEURONMAP_AMX", amx)
        fused._amx.cache_clear()
        fused._load.cache_clear()
        assert fused.name() == ("amx-bf16" if amx == "1" else "avx512bf16")
        outs[amx] = fused.decode_rows(packed, h, 10, True)
    monkeypatch.undo()
    fused._amx.cache_clear()
    fused._load.cache_clear()
    for pole, sign in enumerate((1.0, -1.0)):
        top = (sign * ref).topk(10, -1)
        lse = torch.logsumexp(sign * ref, -1)
        for amx in ("1", "0"):
            ids, z, m, s, _ = outs[amx][pole]
            assert torch.equal(ids, top.indices)
            assert (z.double() - top.values).abs().max() < 1e-4
            assert ((m.double() + s.log()) - lse).abs().max() < 1e-5
