"""One forward pass that keeps what ``trace`` needs, at the traced positions only; the head and norms as data.

Captured per layer (``[n_pos, ...]`` fp32, only the traced positions, so a long text costs ``n_pos`` rows, not
``seq``): the residual stream entering and leaving each decoder block, each MLP neuron's activation (the down
projection's input, as neuronmap.runtime.hooks.recording reads it), the down projection's output, and the final
norm's input. Every module is found through the family table (neuronmap.sources.families): the down projection,
the block (``Family.block``), the final norm, Gemma's norm of the MLP output (``Family.mlp_out_norm``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.decode.head import Head
from neuronmap.runtime.hooks import intervene
from neuronmap.runtime.models import Model, find_module
from neuronmap.runtime.specs import Intervention


@dataclass
class Captured:
    """What one forward pass left at the traced positions (``n_pos`` rows each), fp32 on the model's device.

    Attributes:
        acts: per layer ``[n_pos, d_mlp]``: every neuron's activation.
        mlp_out: per layer ``[n_pos, d_model]``: the down projection's output (bias included).
        resid_in, resid_out: per layer ``[n_pos, d_model]``: the residual stream entering and leaving the block.
        final_in: ``[n_pos, d_model]``: the final norm's input.
        logits: ``[n_pos, d_vocab]``: the model's own logits.
    """

    acts: list
    mlp_out: list
    resid_in: list
    resid_out: list
    final_in: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def norm_params(module: torch.nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(gain, bias, eps)`` of a loaded norm module, fp32; ``rms_1p`` (Gemma stores ``w - 1``) adds the 1."""
    w = module.weight.detach().float()
    bias = getattr(module, "bias", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise NeuronmapError(f"the norm {type(module).__name__} has no eps attribute: fix its family in "
                             "neuronmap/sources/families.py")
    return (1.0 + w if kind == "rms_1p" else w), (None if bias is None else bias.detach().float()), float(eps)


def norm_scale(kind: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The factor a norm divides by, as the model computes it: ``[n, d_model] -> [n, 1]`` fp32.

    ``rms``/``rms_1p``: ``1 / sqrt(mean(x^2) + eps)``; ``layer``: ``1 / sqrt(var(x) + eps)`` (after centring).
    """
    x = x.float()
    if kind == "layer":
        return torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def model_head(m: Model) -> Head:
    """The loaded model's own final norm, unembedding and softcap as a ``Head`` (neuronmap.decode.head's maths).

    Read from the modules, not the files: what the forward pass used, on its device.
    """
    gain, bias, eps = norm_params(final_norm(m), m.family.norm)
    out = m.model.get_output_embeddings()
    cfg = m.model.config.get_text_config()
    cap = getattr(cfg, m.family.softcap_key, None) if m.family.softcap_key else None
    b = getattr(out, "bias", None)
    return Head(norm=m.family.norm, gain=gain, bias=bias, eps=eps, W_U=out.weight.detach().float(), W_U_screen=None,
                b_U=None if b is None else b.detach().float(), softcap=float(cap) if cap else None)


def final_norm(m: Model) -> torch.nn.Module:
    return find_module(m.model, m.family.final_norm)


def mlp_out_norms(m: Model) -> list[torch.nn.Module] | None:
    """Each layer's norm of the MLP output (Gemma 2/3), or None where the MLP writes its output as is."""
    if m.family.mlp_out_norm is None:
        return None
    return [find_module(m.model, m.family.mlp_out_norm.format(i=i)) for i in range(m.n_layers)]


def capture(m: Model, ids: torch.Tensor, pos: torch.Tensor) -> Captured:
    """Run the model once on ``ids`` ``[1, seq]`` and keep, at positions ``pos`` ``[n_pos]``, what ``Captured`` lists."""
    n = m.n_layers
    c = Captured([None] * n, [None] * n, [None] * n, [None] * n)

    def keep(t):  # [1, seq, d] -> [n_pos, d]; OPT flattens its MLP's tokens to [seq, d]
        t = _first(t)
        return (t[pos] if t.dim() == 2 else t[0, pos]).detach().float()

    def pre_block(i):
        def hook(module, args, kwargs):
            c.resid_in[i] = keep(args[0] if args else kwargs["hidden_states"])
        return hook

    def post_block(i):
        def hook(module, args, output):
            c.resid_out[i] = keep(output)
        return hook

    def pre_down(i):
        def hook(module, args):
            c.acts[i] = keep(args[0])
        return hook

    def post_down(i):
        def hook(module, args, output):
            c.mlp_out[i] = keep(output)
        return hook

    def pre_final(module, args):
        c.final_in = keep(args[0])

    handles = []
    try:
        for i in range(n):
            block = find_module(m.model, m.family.block.format(i=i))
            handles += [block.register_forward_pre_hook(pre_block(i), with_kwargs=True),
                        block.register_forward_hook(post_block(i)),
                        m.downs[i].register_forward_pre_hook(pre_down(i)),
                        m.downs[i].register_forward_hook(post_down(i))]
        handles.append(final_norm(m).register_forward_pre_hook(pre_final))
        with torch.no_grad():
            logits = m.model(input_ids=ids).logits  # [1, seq, d_vocab]
        c.logits = logits[0, pos].float()
    finally:
        for h in handles:
            h.remove()
    return c


@contextmanager
def frozen_final_norm(m: Model, head: Head, scale: float) -> Iterator[None]:
    """Inside the block, the final norm scales the last position by ``scale`` (as recorded), not by its own factor.

    So an ablation's logit change there is linear in what reached the norm: the premise of the direct contribution.
    """
    def hook(module, args, output):
        x = args[0][..., -1, :].float()  # [batch, d_model]
        if head.norm == "layer":
            x = x - x.mean(-1, keepdim=True)
        y = x * scale * head.gain
        if head.bias is not None:
            y = y + head.bias
        output = output.clone()
        output[..., -1, :] = y.to(output.dtype)
        return output

    h = final_norm(m).register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def last_logit(m: Model, ids: torch.Tensor, target: int, ivs: list[Intervention], head: Head | None = None,
               scale: float | None = None) -> float:
    """The target's logit after the last token of ``ids`` with ``ivs`` applied there (and the final norm frozen)."""
    with torch.no_grad(), intervene(m, ivs, "last"):
        if scale is None:
            return float(m.model(input_ids=ids).logits[0, -1, target])
        with frozen_final_norm(m, head, scale):
            return float(m.model(input_ids=ids).logits[0, -1, target])
