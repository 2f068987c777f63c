"""Decode residual-stream vectors into token distributions with the model's own head.

A vector ``x`` ``[d_model]`` is treated as a residual-stream state:
``logits = softcap(final_norm(x) @ W_U.T + b_U)``, ``p = softmax(logits)``.
Both poles are decoded: ``+`` is ``x`` and ``-`` is ``-x``.

Never is a whole layer's ``[d_mlp, d_vocab]`` materialised: vectors go through in
blocks of ``block_rows(d_vocab)`` rows, each reduced at once to top-k,
log-sum-exp and entropy.

Two precisions:
  - ``float32``: one fp32 matmul per block; exact up to fp32 rounding.
  - ``bfloat16``: a bf16 matmul screens ``n_candidates`` tokens per vector, which
    are then rescored exactly in fp32; the log-sum-exp and entropy use the exact
    logits for the candidates and the screened ones for the rest of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from neuronmap.errors import NeuronmapError
from neuronmap.sources import Weights

NORM_MODES = ("final", "none")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Head:
    """The final norm, the unembedding and the softcap, ready on one device.

    Attributes:
        norm: ``rms`` | ``rms_1p`` | ``layer`` | ``none``.
        gain: ``[d_model]`` effective gain (Gemma's ``1 + w`` already added), or None.
        bias: ``[d_model]`` norm bias, or None.
        eps: norm epsilon.
        W_U: ``[d_vocab, d_model]`` fp32.
        W_U_screen: ``[d_vocab, d_model]`` bf16 copy for screening, or None.
        b_U: ``[d_vocab]`` head bias, or None.
        softcap: final-logit softcap, or None.
    """

    norm: str
    gain: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    W_U: torch.Tensor
    W_U_screen: torch.Tensor | None
    b_U: torch.Tensor | None
    softcap: float | None

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


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if present else cpu.

    Raises:
        NeuronmapError: cuda asked for but absent.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NeuronmapError("--device cuda was asked for, but no CUDA GPU is available to torch: use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise NeuronmapError(f"unknown --device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` -> ``bfloat16`` screening where the hardware has fast bf16, else ``float32``."""
    if dtype not in DTYPES:
        raise NeuronmapError(f"unknown --dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    # Exact fp32 is the default everywhere: bf16 screening rounds the logits of
    # the tail of the vocabulary, which moves probabilities by up to ~5e-3
    # (docs/method.md). It is opt-in, for speed where d_model is large.
    return "float32"


def build_head(weights: Weights, norm: str = "final", device: torch.device | str = "cpu", dtype: str = "float32") -> Head:
    """Read the final norm and LM head of a model onto a device.

    Args:
        weights: an opened model.
        norm: ``final`` (the model's own final norm) or ``none`` (skip it).
        device: where to compute.
        dtype: ``float32`` or ``bfloat16`` (adds the screening copy).

    Raises:
        NeuronmapError: unknown norm mode.
    """
    if norm not in NORM_MODES:
        raise NeuronmapError(f"unknown --norm {norm!r}: expected final or none")
    device = torch.device(device)
    W_U = weights.head().to(device)  # [d_vocab, d_model]
    b_U = weights.head_bias()
    gain = bias = None
    kind = "none"
    if norm == "final":
        kind = weights.family.norm
        w, bias = weights.final_norm()
        gain = (1.0 + w) if kind == "rms_1p" else w
        gain, bias = gain.to(device), (bias.to(device) if bias is not None else None)
    return Head(
        norm=kind, gain=gain, bias=bias, eps=weights.eps, W_U=W_U,
        W_U_screen=W_U.to(torch.bfloat16) if dtype == "bfloat16" else None,
        b_U=b_U.to(device) if b_U is not None else None, softcap=weights.softcap,
    )


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


def _finish(head: Head, z: torch.Tensor) -> torch.Tensor:
    if head.b_U is not None:
        z = z + head.b_U
    if head.softcap:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


def logits(head: Head, x: torch.Tensor) -> torch.Tensor:
    """Exact fp32 logits of vectors, ``[n, d_model] -> [n, d_vocab]``. For small n only."""
    return _finish(head, apply_norm(head, x.float()) @ head.W_U.T)


def _rescore(head: Head, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exact fp32 logits of normed states ``h`` ``[n, d_model]`` at ``ids`` ``[n, c]`` -> ``[n, c]``."""
    rows = head.W_U[ids]  # [n, c, d_model]
    z = torch.bmm(rows, h.unsqueeze(-1)).squeeze(-1)
    if head.b_U is not None:
        z = z + head.b_U[ids]
    return torch.tanh(z / head.softcap) * head.softcap if head.softcap else z


def top_candidates(z: torch.Tensor, c: int, group: int = 64) -> torch.Tensor:
    """Indices of the ``c`` largest logits per row, ``[n, d_vocab] -> [n, c]`` (unordered ties aside).

    ``torch.topk`` over the whole vocabulary is slow on CPUs; the ``c`` largest
    values always lie in the ``c`` groups with the largest maxima, so one
    ``amax`` pass and a small top-k find them exactly.
    """
    n, v = z.shape
    if v % group or v // group < c:
        return torch.topk(z, c, dim=-1, sorted=False).indices
    gmax = z.view(n, v // group, group).amax(-1)  # [n, v / group]
    groups = torch.topk(gmax, c, dim=-1, sorted=False).indices  # [n, c]
    idx = (groups.unsqueeze(-1) * group + torch.arange(group, device=z.device)).view(n, -1)  # [n, c * group]
    best = torch.topk(z.gather(1, idx), c, dim=-1, sorted=False).indices
    return idx.gather(1, best)


def summarize(z: torch.Tensor, k: int, cand: torch.Tensor | None = None, buf: torch.Tensor | None = None) -> Decoded:
    """Top-k, log-sum-exp and entropy of logits ``z`` ``[n, d_vocab]``.

    Args:
        z: logits; not modified.
        k: top-k to return, sorted best first.
        cand: ``[n, c]`` indices known to contain the top-k (c >= k), or None.
        buf: scratch ``[n, d_vocab]`` fp32, reused across calls to spare allocations.
    """
    if cand is None:
        cand = top_candidates(z, k)
    vals = z.gather(1, cand)
    top = torch.topk(vals, k, dim=-1)  # sorted
    ids = cand.gather(1, top.indices)
    m = top.values[:, :1]
    e = torch.sub(z, m, out=buf if buf is not None else torch.empty_like(z)).exp_()  # [n, d_vocab]
    s = e.sum(-1)
    lse = m[:, 0] + torch.log(s)
    # H = lse - E_p[z]; in place, as this pass is memory-bound.
    ent = lse - e.mul_(z).sum(-1) / s
    return Decoded(ids, top.values, lse, ent)


def decode_block(head: Head, x: torch.Tensor, k: int, n_candidates: int = 16, chunk: int = 64) -> dict[str, Decoded]:
    """Decode both poles of a block of vectors.

    One matmul for the whole block (big enough for the hardware's full rate),
    then the reductions in chunks of ``chunk`` rows that stay in cache.

    Args:
        head: from ``build_head``; bf16 screening is used when it has ``W_U_screen``.
        x: ``[n, d_model]`` vectors (any float dtype, on head's device).
        k: top-k to keep.
        n_candidates: tokens per vector rescored exactly after bf16 screening.
        chunk: rows reduced at a time.

    Returns:
        ``{"+": Decoded, "-": Decoded}``, each with ``n`` rows.

    Example:
        >>> out = decode_block(head, vectors, k=10)  # doctest: +SKIP
        >>> out["+"].token_ids.shape
        torch.Size([n, 10])
    """
    x = x.float()
    screen = head.W_U_screen is not None
    W = head.W_U_screen if screen else head.W_U
    poles = {"+": apply_norm(head, x)}  # [n, d_model] normed states
    if not head.odd:
        poles["-"] = apply_norm(head, -x)
    raw = {p: h.to(W.dtype) @ W.T for p, h in poles.items()}  # [n, d_vocab] each
    c = min(max(n_candidates, k), W.shape[0])
    buf = torch.empty((min(chunk, x.shape[0]), W.shape[0]), dtype=torch.float32, device=x.device)
    zbuf = torch.empty_like(buf)
    parts: dict[str, list[Decoded]] = {"+": [], "-": []}
    for lo in range(0, x.shape[0], chunk):
        hi = min(lo + chunk, x.shape[0])
        n = hi - lo
        for pole in ("+", "-"):
            # An odd head (no biases) gives the - pole as the + pole's logits negated: no second matmul.
            sign = -1.0 if (pole == "-" and head.odd) else 1.0
            h = poles["+" if head.odd else pole][lo:hi]
            z = zbuf[:n]
            torch.mul(raw["+" if head.odd else pole][lo:hi], sign, out=z)
            z = _finish(head, z)
            if screen:
                cand = top_candidates(z, c)  # [n, c]
                z.scatter_(1, cand, sign * _rescore(head, h, cand))
            else:
                cand = top_candidates(z, k)
            parts[pole].append(summarize(z, k, cand, buf[:n]))
    return {p: Decoded(*(torch.cat([getattr(d, f) for d in ds]) for f in ("token_ids", "logits", "logsumexp", "entropy")))
            for p, ds in parts.items()}


def block_rows(d_vocab: int, budget_bytes: int = 1 << 27) -> int:
    """Rows per block so one ``[rows, d_vocab]`` fp32 array stays near ``budget_bytes``."""
    rows = max(16, budget_bytes // (4 * d_vocab))
    return 1 << (rows.bit_length() - 1)
