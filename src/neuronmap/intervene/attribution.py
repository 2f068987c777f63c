"""The maths of ``trace`` (neuronmap.intervene.trace): the target's logit split into every neuron's direct
contribution and the groups that make up the rest, and the logit lens. See trace.py's docstring for the formula.
"""

from __future__ import annotations

import numpy as np
import torch

from neuronmap.core.ids import neuron_id
from neuronmap.decode.head import Head, apply_norm, logits as head_logits
from neuronmap.intervene.capture import Captured, mlp_out_norms, norm_params, norm_scale
from neuronmap.runtime.models import Model

LENS_CHUNK = 256  # positions per logit-lens product: [chunk, d_vocab] at a time, not [seq, d_vocab] per layer


def directions(head: Head, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``u`` ``[n_pos, d_model]`` with ``z_t = x . u + const``, ``const`` ``[n_pos]`` and the scale ``[n_pos, 1]``.

    Args:
        head: the model's head.
        x: ``[n_pos, d_model]`` the final norm's actual input (its scale is read from it, as the model computes it).
        targets: ``[n_pos]`` token ids.
    """
    W = head.W_U[targets]  # [n_pos, d_model]
    const = torch.zeros(len(targets), dtype=torch.float64, device=W.device)
    if head.b_U is not None:
        const += head.b_U[targets].double()
    if head.norm == "none":
        return W, const, torch.ones(len(targets), 1, device=W.device)
    scale = norm_scale(head.norm, x, head.eps)  # [n_pos, 1]
    v = W * head.gain
    if head.norm == "layer":
        v = v - v.mean(-1, keepdim=True)  # the mean-centring, distributed over the components
    if head.bias is not None:
        const += (W * head.bias).sum(-1).double()
    return v * scale, const, scale


def decompose(m: Model, c: Captured, head: Head, targets: torch.Tensor) -> tuple[torch.Tensor, list[list[dict]], torch.Tensor]:
    """Every neuron's direct contribution and every group's, at each traced position.

    Returns:
        ``(contrib, groups, scale)``: ``contrib`` ``[n_pos, n_layers, d_mlp]`` fp32; ``groups`` per position a list
        of ``{"group", "layer", "contribution"}`` whose sum (with the neurons inside ``mlp``) is the logit before
        the softcap; ``scale`` ``[n_pos, 1]``.
    """
    u, const, scale = directions(head, c.final_in, targets)  # [n_pos, d_model]
    norms = mlp_out_norms(m)
    n_pos = len(targets)
    dot = lambda a: (a.double() * u.double()).sum(-1)  # noqa: E731  [n_pos]
    rows: list[tuple[str, int | None, torch.Tensor]] = [("embeddings", None, dot(c.resid_in[0]))]
    between = c.final_in - c.resid_out[-1]  # [n_pos, d_model]: zero where blocks feed each other directly
    contrib = torch.empty(n_pos, m.n_layers, m.d_mlp, dtype=torch.float32, device=u.device)
    for i in range(m.n_layers):
        s = 1.0
        if norms is not None:
            gain, _, eps = norm_params(norms[i], m.family.norm)
            s = gain * norm_scale(m.family.norm, c.mlp_out[i], eps)  # [n_pos, d_model]
        su = u * s  # what one unit along each residual direction is worth through this layer's MLP-output norm
        w = m.downs[i].weight.detach().float()
        proj = su @ (w.T if m.family.conv1d else w)  # [n_pos, d_mlp]: down column . su, per neuron
        contrib[:, i] = c.acts[i] * proj
        written = c.mlp_out[i] * s  # [n_pos, d_model]: what the MLP added to the residual stream
        rows.append(("attention", i, dot(c.resid_out[i] - c.resid_in[i] - written)))
        rows.append(("mlp", i, contrib[:, i].double().sum(-1)))
        b = getattr(m.downs[i], "bias", None)
        if b is not None:
            rows.append(("mlp bias", i, dot(b.detach().float() * s * torch.ones_like(u))))
        if i:
            between = between + c.resid_in[i] - c.resid_out[i - 1]
    rows.append(("between layers", None, dot(between)))
    rows.append(("final norm and head biases", None, const))
    groups = [[{"group": g, "layer": layer, "contribution": float(v[p])} for g, layer, v in rows] for p in range(n_pos)]
    return contrib, groups, scale


def lens(head: Head, c: Captured, targets: torch.Tensor, tok) -> list[list[dict]]:
    """Per position, per layer: the target's probability and the top token of the residual stream through the head."""
    out: list[list[dict]] = [[] for _ in range(len(targets))]
    for i, r in enumerate(c.resid_out):
        for a in range(0, len(targets), LENS_CHUNK):
            logp = head_logits(head, r[a:a + LENS_CHUNK]).log_softmax(-1)  # [chunk, d_vocab]
            probs = logp.gather(-1, targets[a:a + LENS_CHUNK, None])[:, 0].exp()
            for j, (p, t) in enumerate(zip(probs.tolist(), logp.argmax(-1).tolist())):
                out[a + j].append({"layer": i, "prob": p, "top_token": tok.decode([t])})
    return out


def softcapped(head: Head, z: float) -> float:
    return head.softcap * float(torch.tanh(torch.tensor(z / head.softcap, dtype=torch.float64))) if head.softcap else z


def pre_softcap(head: Head, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The targets' logits before the softcap, from the final norm's input ``x`` ``[n_pos, d_model]`` -> ``[n_pos]``."""
    z = (apply_norm(head, x) * head.W_U[targets]).sum(-1)
    return z + head.b_U[targets] if head.b_U is not None else z


def top_neurons(contrib: torch.Tensor, acts: torch.Tensor, top: int) -> list[tuple[str, int, int, float, float]]:
    """The ``top`` largest then the ``top`` most negative contributors, ``(id, layer, index, activation, contribution)``.

    Args:
        contrib, acts: ``[n_layers, d_mlp]`` at one position.
    """
    flat, a, d_mlp = contrib.reshape(-1), acts.reshape(-1), contrib.shape[1]
    k = min(top, flat.numel())
    hi = torch.topk(flat, k).indices.tolist()
    seen = set(hi)
    lo = [j for j in torch.topk(-flat, k).indices.tolist() if j not in seen]
    return [(neuron_id(j // d_mlp, j % d_mlp), j // d_mlp, j % d_mlp, float(a[j]), float(flat[j])) for j in hi + lo]


def target_ranks(m: Model, head: Head, which: list[tuple[int, int, float]], target: int) -> list[int]:
    """The target's rank among all tokens in each written vector's decoding, ``which``: ``(layer, index, activation)``.

    The written vector is ``sign(activation) x down column`` (the atlas's ``+`` or ``-`` pole), decoded through the
    final norm and head as the atlas decodes it (neuronmap.decode.head), so rank <= the atlas's top-k means the
    target is in the neuron's label.
    """
    if not which:
        return []
    vecs = torch.stack([m.down_column(layer, i) * (1.0 if a >= 0 else -1.0) for layer, i, a in which])  # [n, d_model]
    z = head_logits(head, vecs.to(head.W_U.device))  # [n, d_vocab]
    return [int(r) + 1 for r in (z > z[:, target:target + 1]).sum(-1).tolist()]


def active_neurons(acts: torch.Tensor, quantiles: tuple[list[float], np.ndarray] | None, top: int) -> list[dict]:
    """The neurons most active at one position, ``acts`` ``[n_layers, d_mlp]``.

    With evidence, ranked by how far the activation lies beyond the neuron's recorded range: ``(a - median) /
    (q_max - median)`` above the median, ``(median - a) / (median - q_min)`` below (``q_max``/``q_min``: the highest
    and lowest recorded quantile levels, 0.999 and 0.01), so 1.0 is as far out as its rarest recorded tokens. Without,
    by ``|activation|``.
    """
    a = acts.float().cpu()
    if quantiles is None:
        score = a.abs()
    else:
        levels, q = quantiles
        q = torch.from_numpy(q)
        med = q[..., min(range(len(levels)), key=lambda i: abs(levels[i] - 0.5))]
        hi, lo = (q[..., -1] - med).clamp_min(1e-6), (med - q[..., 0]).clamp_min(1e-6)
        score = torch.where(a >= med, (a - med) / hi, (med - a) / lo).nan_to_num(0.0)
    d_mlp = a.shape[1]
    best = torch.topk(score.reshape(-1), min(top, score.numel()))
    return [{"neuron": neuron_id(j // d_mlp, j % d_mlp), "layer": j // d_mlp, "index": j % d_mlp,
             "activation": float(a.reshape(-1)[j]), "score": float(v)} for v, j in zip(best.values.tolist(),
                                                                                     best.indices.tolist())]
