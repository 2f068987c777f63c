"""The model's own head as data: the final norm, the unembedding and the softcap (``Head``), and the exact fp32 maths
every decode path shares (``apply_norm``, ``logits``, ``rescore``). Imported by neuronmap.decode.engine and the fused
kernel's wrapper (neuronmap.decode.fused); imports nothing of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


NORM_MODES = ("final", "none")


@dataclass(frozen=True)
class Head:
    """The final norm, the unembedding and the softcap, ready on one device.

    Attributes:
        norm: ``rms`` | ``rms_1p`` | ``layer`` | ``none``.
        gain: ``[d_model]`` effective gain (Gemma's ``1 + w`` already added), or None.
        bias: ``[d_model]`` norm bias, or None.
        eps: norm epsilon.
        W_U: ``[d_vocab, d_model]`` fp32; bf16 when screening or split and the checkpoint
            stores bf16 (then it is exact, and an fp32 copy would only double the memory).
        W_U_screen: ``[d_vocab, d_model]`` bf16 for screening (may be ``W_U`` itself), or None.
        b_U: ``[d_vocab]`` head bias, or None.
        softcap: final-logit softcap, or None.
        packed: the head in the fused kernel's layout (``split`` on a CPU), or None.
    """

    norm: str
    gain: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    W_U: torch.Tensor
    W_U_screen: torch.Tensor | None
    b_U: torch.Tensor | None
    softcap: float | None
    packed: object | None = None  # neuronmap.decode.fused.Packed

    @property
    def odd(self) -> bool:
        """True when decode(-x) = -decode(x) in logit space: no biases anywhere.

        Then the ``-`` pole needs no second matmul.
        """
        return self.bias is None and self.b_U is None


@dataclass(frozen=True)
class Decoded:
    """Top-k and summary statistics of one pole of a block of vectors.

    Attributes:
        token_ids: ``[n, k]`` int64, best first.
        logits: ``[n, k]`` fp32.
        logsumexp: ``[n]`` fp32, over the whole vocabulary.
        entropy: ``[n]`` fp32, nats.
    """

    token_ids: torch.Tensor
    logits: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """``[n, k]`` probabilities of the top-k tokens."""
        return torch.exp(self.logits - self.logsumexp[:, None])


def apply_norm(head: Head, x: torch.Tensor) -> torch.Tensor:
    """The final norm exactly as the family computes it, in fp32. ``[n, d_model] -> [n, d_model]``."""
    if head.norm == "none":
        return x
    if head.norm in ("rms", "rms_1p"):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + head.eps)
    else:
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + head.eps)
    y = y * head.gain
    return y + head.bias if head.bias is not None else y


def finish(head: Head, z: torch.Tensor) -> torch.Tensor:
    if head.b_U is not None:
        z = z + head.b_U
    if head.softcap:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


def logits(head: Head, x: torch.Tensor) -> torch.Tensor:
    """Exact fp32 logits of vectors, ``[n, d_model] -> [n, d_vocab]``. For small n only."""
    return finish(head, apply_norm(head, x.float()) @ head.W_U.float().T)


def rescore(head: Head, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exact fp32 logits of normed states ``h`` ``[n, d_model]`` at ``ids`` ``[n, c]`` -> ``[n, c]``."""
    rows = head.W_U[ids].float()  # [n, c, d_model]
    z = torch.bmm(rows, h.unsqueeze(-1)).squeeze(-1)
    if head.b_U is not None:
        z = z + head.b_U[ids]
    return torch.tanh(z / head.softcap) * head.softcap if head.softcap else z
