"""Decode residual-stream vectors into token distributions with the model's own head.

A vector ``x`` ``[d_model]`` is treated as a residual-stream state:
``logits = softcap(final_norm(x) @ W_U.T + b_U)``, ``p = softmax(logits)``.
Both poles are decoded: ``+`` is ``x`` and ``-`` is ``-x``.

Never is a whole layer's ``[d_mlp, d_vocab]`` materialised: vectors go through in
blocks of ``block_rows(d_vocab)`` rows, each reduced at once to top-k,
log-sum-exp and entropy.

Three precisions:
  - ``split`` (what ``auto`` gives where it can run): each normed state is split into two bf16 halves and the
    head is bf16 (or split too); the bf16 products accumulate in fp32, as exact as ``float32`` at about twice the
    bf16 product's time. On a CPU with AVX512-BF16 the fused kernel (neuronmap.decode.fused) reduces the logits in the
    same pass; on CUDA ``torch.mm(..., out_dtype=float32)`` makes the logits (untested: no GPU here).
  - ``float32``: one fp32 matmul per block; exact up to fp32 rounding (the reference path).
  - ``bfloat16``: a bf16 matmul screens ``n_candidates`` tokens per vector, which
    are then rescored exactly in fp32; the log-sum-exp and entropy use the exact
    logits for the candidates and the screened ones for the rest of the vocabulary.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from neuronmap.decode import fused
from neuronmap.decode.head import NORM_MODES, Decoded, Head, apply_norm, finish, rescore
from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.resolve import Weights

DTYPES = ("auto", "split", "float32", "bfloat16")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if present else cpu.

    Raises:
        NeuronmapError: cuda asked for but absent.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NeuronmapError("device=cuda was asked for, but no CUDA GPU is available to torch: use device=cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise NeuronmapError(f"unknown device={device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The decode dtype a ``--dtype`` value stands for: ``auto`` is the exact ``split`` where it runs, else ``float32``.

    ``split`` runs on a CPU with AVX512-BF16 and a C compiler (the fused kernel, neuronmap.decode.fused) and on CUDA
    (bf16 products with fp32 output). Elsewhere ``auto`` is ``float32``, equally exact: 2-4x slower than split
    where the kernel runs, and on CPUs without AVX512-BF16 faster than torch's emulated bf16 product (docs/benchmarks.md).
    bf16 screening is never chosen automatically: ask for ``bfloat16``.

    Args:
        dtype: one of ``DTYPES``.
        device: the device the decode will run on (``str`` for a Ray map's workers: there ``auto`` is
            ``float32`` unless this machine, the driver, could run ``split`` on a CPU).

    Returns:
        ``split``, ``float32`` or ``bfloat16``: ``dtype`` itself unless it is ``auto``.

    Raises:
        NeuronmapError: ``dtype`` is not one of ``DTYPES``; ``split`` asked for where it cannot run.

    Example:
        >>> resolve_dtype("float32", torch.device("cpu"))
        'float32'
    """
    if dtype not in DTYPES:
        raise NeuronmapError(f"unknown dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype in ("float32", "bfloat16"):
        return dtype
    dev = torch.device("cpu" if str(device) == "auto" else device)
    can_split = dev.type == "cuda" or fused.available(dev)  # the first call builds the kernel (a second, once)
    if dtype == "split" and not can_split:
        raise NeuronmapError(f"dtype=split cannot run on {dev}: {fused.status()}; use dtype=float32 (as exact, "
                             "slower) or auto")
    if dtype != "auto":
        return dtype
    # bf16 screening rounds the logits of the tail of the vocabulary, which moves probabilities by up to ~5e-3
    # (docs/method.md); split is as exact as fp32.
    return "split" if can_split else "float32"


GROUP = 64  # tokens per group in the search for candidates
KERNELS = ("auto", "eager", "compiled")


def _group_max(z: torch.Tensor) -> torch.Tensor:
    """Maximum of each run of ``GROUP`` tokens, ``[n, d_vocab] -> [n, ceil(d_vocab / GROUP)]``."""
    n, v = z.shape
    full = v - v % GROUP
    if full == 0:
        return z.amax(-1, keepdim=True)
    g = z[:, :full].reshape(n, -1, GROUP).amax(-1)
    return torch.cat([g, z[:, full:].amax(-1, keepdim=True)], 1) if full < v else g


def reduce_logits(z: torch.Tensor, minus: bool) -> tuple[torch.Tensor, ...]:
    """The statistics of logits that need a pass over the whole vocabulary.

    Everything else (top-k, exact rescoring) then works on a few candidates.
    Written as plain tensor code so that ``torch.compile`` can fuse it into
    one or two passes (``compiled_reduce``).

    Args:
        z: ``[n, d_vocab]`` final logits (any float dtype) of the ``+`` pole.
        minus: also give the statistics of ``-z``, the ``-`` pole of an odd head.

    Returns:
        Per pole (``+``, then ``-`` when ``minus``) four tensors: group maxima
        ``g`` ``[n, n_groups]``, the maximum ``m`` ``[n, 1]``,
        ``s = sum(exp(z - m))`` ``[n]`` and ``t = sum(exp(z - m) * (z - m))`` ``[n]``;
        then ``lse = m + log(s)`` and ``entropy = log(s) - t / s``.

    Example:
        >>> z = torch.randn(2, 300)
        >>> g, m, s, t = reduce_logits(z, minus=False)
        >>> torch.allclose(m[:, 0] + s.log(), torch.logsumexp(z, -1))
        True
    """
    z = z.float()
    out: tuple[torch.Tensor, ...] = ()
    for zs in ((z, -z) if minus else (z,)):
        g = _group_max(zs)
        m = g.amax(-1, keepdim=True)
        y = zs - m
        e = y.exp()
        out += (g, m, e.sum(-1), (e * y).sum(-1))
    return out


_compile_failed: list[str] = []


@lru_cache(maxsize=1)
def _compiled():
    return torch.compile(reduce_logits, dynamic=True)


def compiled_reduce(z: torch.Tensor, minus: bool) -> tuple[torch.Tensor, ...]:
    """``reduce_logits`` fused by ``torch.compile`` (3-10x faster on CPU; the first call compiles, ~45 s cold).

    Falls back to the eager code, with one warning, where the compiler is unavailable.
    """
    # A vocabulary of one group hits an inductor codegen bug (size-1 reduction, torch 2.13); nothing to gain there.
    if not _compile_failed and z.shape[1] > GROUP:
        try:
            return _compiled()(z, minus)
        except Exception as e:  # no C++ compiler, unsupported backend: eager gives the same numbers
            import sys

            _compile_failed.append(str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            print(f"warning: torch.compile failed ({_compile_failed[0]}); using the eager kernel", file=sys.stderr)
    return reduce_logits(z, minus)


def kernel_used(reduce, d_vocab: int, dtype: str = "float32", device: str = "cpu", k: int = 10) -> str:
    """What a decode ran: ``avx512bf16`` or ``amx-bf16`` (the fused kernel: ``split`` on a CPU), ``cuda-split`` (``split`` on CUDA,
    then a reducer), else what a reducer from ``choose_reducer`` ran: ``compiled`` or ``eager``."""
    if dtype == "split" and not str(device).startswith("cuda"):
        if k <= fused.MAX_K:
            return fused.name()
    elif dtype == "split":
        return "cuda-split+" + kernel_used(reduce, d_vocab)
    return "compiled" if reduce is compiled_reduce and not _compile_failed and d_vocab > GROUP else "eager"


def choose_reducer(kernel: str, n_elements: float):
    """The reduction kernel for a job of ``n_elements`` logits (vectors x d_vocab).

    ``auto`` compiles only where the time saved repays the compile: measured
    ~4 ns saved per logit on this project's 2-core CPU against ~45 s to compile.

    Raises:
        NeuronmapError: unknown kernel name.
    """
    if kernel not in KERNELS:
        raise NeuronmapError(f"unknown kernel={kernel!r}: expected one of {', '.join(KERNELS)}")
    if kernel == "compiled" or (kernel == "auto" and n_elements >= 2e10):
        return compiled_reduce
    return reduce_logits


def _pole(head: Head, z: torch.Tensor, sign: float, stats: tuple[torch.Tensor, ...], h: torch.Tensor | None,
          k: int, c: int) -> Decoded:
    """Top-k, log-sum-exp and entropy of one pole from its statistics.

    Args:
        z: ``[n, d_vocab]`` logits; the pole's are ``sign * z``.
        stats: ``(g, m, s, t)`` from ``reduce_logits`` for this pole.
        h: ``[n, d_model]`` the pole's normed states, to rescore ``c`` candidates
            exactly (bf16 screening), or None when ``z`` is exact already.
        c: candidates to take from the groups (>= k).
    """
    g, m, s, t = stats
    n, v = z.shape
    # The c largest logits lie in the c groups with the largest maxima.
    groups = torch.topk(g, min(c, g.shape[1]), dim=-1, sorted=False).indices  # [n, c]
    idx = (groups.unsqueeze(-1) * GROUP + torch.arange(GROUP, device=z.device)).view(n, -1)  # [n, c * GROUP]
    valid = idx < v  # the last group may be short
    idx = idx.clamp_max(v - 1)
    vals = (sign * z.gather(1, idx).float()).masked_fill(~valid, float("-inf"))
    best = torch.topk(vals, c, dim=-1, sorted=False).indices
    cand, zc = idx.gather(1, best), vals.gather(1, best)  # [n, c] ids and their (screened) logits
    if h is not None:
        # Swap the screened logits of the candidates for exact ones in the sums.
        zx = rescore(head, h, cand)
        ys, yx = zc - m, zx - m
        es, ex = ys.exp(), yx.exp()
        s = s - es.sum(-1) + ex.sum(-1)
        t = t - (es * ys).sum(-1) + (ex * yx).sum(-1)
        zc = zx
    top = torch.topk(zc, k, dim=-1)  # sorted
    log_s = torch.log(s)
    return Decoded(cand.gather(1, top.indices), top.values, m[:, 0] + log_s, log_s - t / s)


def decode_block(head: Head, x: torch.Tensor, k: int, n_candidates: int = 16, chunk: int | None = None,
                 reduce=reduce_logits) -> dict[str, Decoded]:
    """Decode both poles of a block of vectors.

    One matmul for the whole block (big enough for the hardware's full rate),
    then the reductions in chunks of ``chunk`` rows.

    Args:
        head: from ``build_head``; bf16 screening is used when it has ``W_U_screen``.
        x: ``[n, d_model]`` vectors (any float dtype, on head's device).
        k: top-k to keep.
        n_candidates: tokens per vector rescored exactly after bf16 screening.
        chunk: rows reduced at a time; default: ~8 MB of fp32 logits, which
            keeps glibc from handing each temporary back to the OS (page faults cost
            as much as the arithmetic).
        reduce: ``reduce_logits`` or ``compiled_reduce`` (same numbers; see ``choose_reducer``).

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
    c = min(max(n_candidates, k) if screen else k, W.shape[0])
    states = {"+": apply_norm(head, x)}  # [n, d_model] normed states
    if not head.odd:
        states["-"] = apply_norm(head, -x)
    if head.packed is not None and k <= fused.MAX_K:
        return fused.decode_states(head, states, k)
    if W.dtype == torch.bfloat16 and not screen and W.is_cuda:  # split on CUDA: bf16 products, fp32 out (untested)
        raw = {p: sum(torch.mm(half, W.T, out_dtype=torch.float32) for half in fused.split_halves(h))
               for p, h in states.items()}
    elif W.dtype == torch.bfloat16 and not screen:  # split on a CPU with k > fused.MAX_K: the fp32 product
        raw = {p: h @ W.float().T for p, h in states.items()}
    else:
        raw = {p: h.to(W.dtype) @ W.T for p, h in states.items()}  # [n, d_vocab] each
    parts: dict[str, list[Decoded]] = {"+": [], "-": []}
    chunk = chunk or max(1, (8 << 20) // (4 * W.shape[0]))
    for lo in range(0, x.shape[0], chunk):
        hi = min(lo + chunk, x.shape[0])
        if head.odd:
            # No biases: the - pole's logits are the + pole's negated (softcap is odd too), so one
            # matmul and one pass serve both poles.
            z = raw["+"][lo:hi] if head.softcap is None else finish(head, raw["+"][lo:hi].float())
            st = reduce(z, True)
            h = states["+"][lo:hi]
            parts["+"].append(_pole(head, z, 1.0, st[:4], h if screen else None, k, c))
            parts["-"].append(_pole(head, z, -1.0, st[4:], -h if screen else None, k, c))
        else:
            for p in ("+", "-"):
                z = finish(head, raw[p][lo:hi].float())
                parts[p].append(_pole(head, z, 1.0, reduce(z, False), states[p][lo:hi] if screen else None, k, c))
    return {p: Decoded(*(torch.cat([getattr(d, f) for d in ds]) for f in ("token_ids", "logits", "logsumexp", "entropy")))
            for p, ds in parts.items()}


def block_rows(d_vocab: int, budget_bytes: int = 1 << 27) -> int:
    """Rows per block so one ``[rows, d_vocab]`` fp32 array stays near ``budget_bytes``."""
    rows = max(16, budget_bytes // (4 * d_vocab))
    return 1 << (rows.bit_length() - 1)


def build_head(weights: Weights, norm: str = "final", device: torch.device | str = "cpu", dtype: str = "float32") -> Head:
    """Read the final norm and LM head of a model onto a device.

    Args:
        weights: an opened model.
        norm: ``final`` (the model's own final norm) or ``none`` (skip it).
        device: where to compute.
        dtype: ``float32``, ``split`` (bf16 halves; on a CPU the head is packed for the fused kernel)
            or ``bfloat16`` (adds the screening copy).

    Raises:
        NeuronmapError: unknown norm mode.
    """
    if norm not in NORM_MODES:
        raise NeuronmapError(f"unknown norm={norm!r}: expected final or none")
    device = torch.device(device)
    stored = weights.head(native=True)  # [d_vocab, d_model]
    packed = screen = None
    if dtype == "split":
        # A bf16 head is kept as is (exact); any other is split into bf16 halves (packed) and kept in fp32.
        W_U = stored.to(device) if stored.dtype == torch.bfloat16 else stored.to(device, torch.float32)
        packed = fused.pack_head(W_U) if device.type == "cpu" else None
    elif dtype == "bfloat16" and stored.dtype == torch.bfloat16:
        W_U = screen = stored.to(device)
    else:
        W_U = stored.to(device, torch.float32)
        screen = W_U.to(torch.bfloat16) if dtype == "bfloat16" else None
    del stored
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
        W_U_screen=screen,
        b_U=b_U.to(device) if b_U is not None else None, softcap=weights.softcap, packed=packed,
    )
