"""Decode exactness on the real demo model against an fp64 reference, and the engine's building blocks."""

import numpy as np
import pytest
import torch

from neuronmap.decode import build_head, decode_block, resolve_device, resolve_dtype, summarize, top_candidates
from neuronmap.errors import NeuronmapError
from neuronmap.sources import open_weights


@pytest.fixture(scope="module")
def demo():
    return open_weights(None)


def _fp64_reference(weights, x: torch.Tensor, sign: float):
    """Everything in float64, straight from the definition: softmax(W_U @ rmsnorm(sign * x))."""
    w, _ = weights.final_norm()
    xx = sign * x.double()
    h = xx * torch.rsqrt(xx.pow(2).mean(-1, keepdim=True) + weights.eps) * w.double()
    z = h @ weights.head().double().T  # [n, d_vocab]
    return z, torch.logsumexp(z, -1)


def _sample(weights, seed=0, per=64):
    rng = np.random.default_rng(seed)
    rows = []
    for layer in rng.choice(weights.n_layers, size=6, replace=False):
        for matrix in ("gate", "up", "down"):
            v = weights.vectors(matrix, int(layer))
            rows.append(v[torch.from_numpy(rng.choice(weights.d_mlp, size=per, replace=False))])
    return torch.cat(rows)  # [n, d_model]


@pytest.mark.parametrize("dtype, prob_tol", [("float32", 1e-3), ("bfloat16", 1e-2)])
def test_topk_and_probs_match_fp64_on_the_demo_model(demo, dtype, prob_tol):
    x = _sample(demo)
    head = build_head(demo, "final", "cpu", dtype)
    with torch.inference_mode():
        out = decode_block(head, x, k=10)
    n_total = n_same = 0
    for pole, sign in (("+", 1.0), ("-", -1.0)):
        z, lse = _fp64_reference(demo, x, sign)
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
        p = torch.softmax(z, -1)
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
        assert (d.entropy.double() - ent).abs().max() < 1e-3
    assert n_same / n_total >= 0.999 if dtype == "float32" else n_same / n_total >= 0.99


def test_odd_head_minus_pole_equals_decoding_the_negated_vector(demo):
    head = build_head(demo, "final", "cpu", "float32")
    assert head.odd
    x = demo.vectors("up", 29)[:32]
    with torch.inference_mode():
        both = decode_block(head, x, k=5)
        neg = decode_block(head, -x, k=5)
    assert torch.equal(both["-"].token_ids, neg["+"].token_ids)
    assert torch.allclose(both["-"].logsumexp, neg["+"].logsumexp, atol=1e-4)


def test_top_candidates_finds_the_true_top():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 64 * 50, generator=g)
    got = top_candidates(z, 16).sort(-1).values
    want = torch.topk(z, 16, -1).indices.sort(-1).values
    assert torch.equal(got, want)
    odd = torch.randn(5, 1001, generator=g)  # not a multiple of the group: falls back to topk
    assert torch.equal(top_candidates(odd, 3).sort(-1).values, torch.topk(odd, 3, -1).indices.sort(-1).values)


def test_summarize_matches_torch():
    z = torch.randn(8, 300, generator=torch.Generator().manual_seed(1)) * 4
    d = summarize(z.clone(), 7)
    assert torch.equal(d.token_ids, torch.topk(z, 7, -1).indices)
    assert torch.allclose(d.logsumexp, torch.logsumexp(z, -1), atol=1e-5)
    p = torch.softmax(z, -1)
    assert torch.allclose(d.entropy, -(p * p.log()).sum(-1), atol=1e-4)


def test_device_and_dtype_choices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    with pytest.raises(NeuronmapError, match="unknown --dtype 'half'"):
        resolve_dtype("half", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(NeuronmapError, match="--device cuda was asked for, but no CUDA GPU is available"):
            resolve_device("cuda")
