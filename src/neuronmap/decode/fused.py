"""The fused split-precision decode kernel (``--dtype auto`` on a CPU with AVX512-BF16): exact logits at bf16 rate.

A normed state ``h`` (fp32) is split into two bf16 halves, ``hi = bf16(h)`` and ``lo = bf16(h - hi)``; the head
``W_U`` is bf16 as Llama and Gemma store it, or is split the same way. The logits
``z = hi . W + lo . W (+ hi . W_lo)`` are accumulated in fp32 by the CPU's ``vdpbf16ps`` and reduced in the same
pass (csrc/fused.c), so only top-k, log-sum-exp and entropy leave the kernel. What is dropped, ``lo . W_lo``
and the rounding of ``lo`` (each ~2^-16 of ``z``'s terms), is below fp32's own error on a 128k-token
log-sum-exp; docs/method.md has the measured error against fp64.

The C source (csrc/fused.c) ships with the package and is built and loaded by ``neuronmap.decode.native`` (compiled once
into the cache; ``make install`` does it). Where the CPU lacks AVX512-BF16, or no compiler works, ``status()``
says why and ``--dtype auto`` falls back to exact fp32 (decode.resolve_dtype).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from neuronmap.decode import native
from neuronmap.decode.head import Decoded, rescore
from neuronmap.core.errors import NeuronmapError

NAME = "avx512bf16"  # the kernel name recorded in meta.json
AMX_NAME = "amx-bf16"  # the same kernel, its products on AMX tiles (NEURONMAP_AMX=0 turns it off)
PANEL = 64  # tokens per panel of the packed head (csrc/fused.c)
MAX_K = 256  # top-k the kernel keeps in registers' reach; larger k goes the fp32 way
VERSION = 6  # nm_version() of csrc/fused.c


@lru_cache(maxsize=1)
def _amx() -> ctypes.CDLL | None:
    """The AMX-BF16 build of the kernel where the CPU has AMX and Linux grants the tile state, else None."""
    if os.environ.get("NEURONMAP_AMX", "1") == "0":
        return None
    lib = native.load("fused_amx")
    return lib if lib is not None and lib.nm_version() == VERSION and lib.nm_amx_init() == 0 else None


def name() -> str:
    """The kernel name recorded in meta.json: ``amx-bf16`` where the AMX build runs, else ``avx512bf16``."""
    return AMX_NAME if _load()[0] is not None and _amx() is not None else NAME


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    lib = native.load("fused")
    if lib is None:
        return None, f"the fused kernel is not available ({native.why_not('fused')})"
    if lib.nm_version() != VERSION:
        return None, f"the fused kernel library is stale (version {lib.nm_version()}, expected {VERSION})"
    lib = _amx() or lib  # the same functions, the products on AMX tiles
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.nm_decode.argtypes = [p, i, i, i, p, p, i, p, f, i, i, i, p, p, p, p, p]
    lib.nm_decode.restype = i
    return lib, "ok"


def status() -> str:
    """``ok`` when the kernel is usable here, else one line saying why not (no AVX512-BF16, no compiler)."""
    return _load()[1]


def available(device: torch.device) -> bool:
    """True when ``--dtype auto`` gives the fused kernel on ``device`` (a CPU with AVX512-BF16 and a compiler)."""
    return torch.device(device).type == "cpu" and status() == "ok"


@dataclass(frozen=True)
class Packed:
    """The head in the kernel's layout.

    Attributes:
        panels: ``[n_panels, d2, nw, 64, 2]`` bf16 (``d2 = ceil(d_model / 2)``; tokens past ``d_vocab`` are zero).
        nw: 1 (the head is bf16) or 2 (the head split into ``hi`` and ``lo`` halves).
        d_vocab: tokens.
    """

    panels: torch.Tensor
    nw: int
    d_vocab: int


def split_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (hi, lo) bf16 with ``hi + lo`` = x to ~2^-16 relative."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def pack_head(W: torch.Tensor) -> Packed:
    """``W_U`` ``[d_vocab, d_model]`` (bf16, or fp32 to be split) -> ``Packed``; one copy of the head's size (bf16)
    or twice it (split)."""
    v, d = W.shape
    halves = [W] if W.dtype == torch.bfloat16 else list(split_halves(W.float()))
    n_panels, d2 = -(-v // PANEL), -(-d // 2)
    out = torch.zeros(n_panels, d2, len(halves), PANEL, 2, dtype=torch.bfloat16)
    full = v // PANEL * PANEL
    for h, w in enumerate(halves):
        w = torch.nn.functional.pad(w, (0, 2 * d2 - d)) if d % 2 else w
        # [n_panels, 64, d2, 2] -> [n_panels, d2, 64, 2], a panel at a time in chunks to bound the temporary
        for p0 in range(0, full // PANEL, 256):
            p1 = min(full // PANEL, p0 + 256)
            out[p0:p1, :, h] = w[p0 * PANEL:p1 * PANEL].reshape(p1 - p0, PANEL, d2, 2).transpose(1, 2)
        if full < v:
            out[-1, :, h, :v - full] = w[full:].reshape(v - full, d2, 2).transpose(0, 1)
    return Packed(out, len(halves), v)


def decode_rows(packed: Packed, h: torch.Tensor, k: int, minus: bool, bias: torch.Tensor | None = None,
                softcap: float | None = None) -> tuple[torch.Tensor, ...]:
    """Top-k, log-sum-exp and entropy of the logits of normed states ``h``, fused.

    Args:
        packed: the head (``pack_head``).
        h: ``[n, d_model]`` fp32 normed states (finite).
        k: top-k, 1 to ``MAX_K``.
        minus: also the ``-`` pole, ``-z`` (an odd head: no biases).
        bias: ``[d_vocab]`` fp32 head bias, or None.
        softcap: final-logit softcap, or None.

    Returns:
        Per pole (``+``, then ``-`` when ``minus``) a tuple: ids ``[n, k]`` int64 and their logits ``[n, k]`` fp32,
        best first; the max logit ``m`` ``[n]`` fp32, ``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)``
        ``[n]`` fp64 (log-sum-exp ``m + log s``, entropy ``log s - t / s``).

    Raises:
        NeuronmapError: the kernel is unavailable here, or ran out of memory.

    Example:
        >>> W, h = torch.randn(1000, 64).bfloat16(), torch.randn(3, 64)
        >>> (ids, z, m, s, t), = decode_rows(pack_head(W), h, 5, minus=False)
        >>> torch.equal(ids[:, 0], (h.double() @ W.double().T).argmax(-1))
        True
    """
    lib, why = _load()
    if lib is None:
        raise NeuronmapError(f"the fused decode kernel cannot run here: {why}; use dtype=float32")
    n, d = h.shape
    d2 = packed.panels.shape[1]
    h = torch.nn.functional.pad(h.float(), (0, 2 * d2 - d)) if d % 2 else h.float()
    hi, lo = (t.contiguous() for t in split_halves(h))
    poles = 2 if minus else 1
    mx = torch.empty(poles, n)
    s, t = torch.empty(poles, n, dtype=torch.float64), torch.empty(poles, n, dtype=torch.float64)
    vals, ids = torch.empty(poles, n, k), torch.empty(poles, n, k, dtype=torch.int32)
    b = bias.float().contiguous() if bias is not None else None
    rc = lib.nm_decode(packed.panels.data_ptr(), packed.nw, d2, packed.d_vocab, hi.data_ptr(), lo.data_ptr(), n,
                       b.data_ptr() if b is not None else None,
                       float(softcap or 0.0), poles, k, torch.get_num_threads(), mx.data_ptr(), s.data_ptr(), t.data_ptr(), vals.data_ptr(),
                       ids.data_ptr())
    if rc != 0:
        raise NeuronmapError(f"the fused decode kernel ran out of memory on a block of {n} rows: use dtype=float32")
    return tuple((ids[p].long(), vals[p], mx[p], s[p], t[p]) for p in range(poles))


def decode_states(head, states: dict[str, torch.Tensor], k: int) -> dict:
    """Both poles of a block through the kernel: one pass for an odd head, one per pole otherwise (biases).

    Args:
        head: a ``decode.Head`` with ``packed``.
        states: ``{"+": h, "-": h}`` ``[n, d_model]`` fp32 normed states (``-`` only where the head is not odd).
        k: top-k, at most ``MAX_K``.

    Returns:
        ``{"+": Decoded, "-": Decoded}``; a vector holding nan or inf gets nan statistics, as the fp32 path gives.
    """
    n = states["+"].shape[0]
    ok = torch.stack([torch.isfinite(h).all(-1) for h in states.values()]).all(0)  # [n]
    every = bool(ok.all())
    rows = {p: h if every else h[ok] for p, h in states.items()}
    if head.odd:
        got = dict(zip("+-", decode_rows(head.packed, rows["+"], k, True, None, head.softcap)))
        rows["-"] = -rows["+"]
    else:
        got = {p: decode_rows(head.packed, h, k, False, head.b_U, head.softcap)[0] for p, h in rows.items()}
    out = {}
    for p, (ids, zs, m, s, t) in got.items():
        # The top-k rescored in fp32, and swapped into the sums: where one token dominates, the log-sum-exp is its
        # logit, and the split's last bits (~1e-4 at |z| ~ 100) would show there.
        zx = rescore(head, rows[p], ids)  # [n, k]
        ys, yx = (zs - m[:, None]).double(), (zx - m[:, None]).double()
        es, ex = ys.exp(), yx.exp()
        s = s - es.sum(-1) + ex.sum(-1)
        t = t - (es * ys).sum(-1) + (ex * yx).sum(-1)
        order = torch.sort(zx, dim=-1, descending=True, stable=True).indices
        log_s = torch.log(s)
        res = (ids.gather(1, order), zx.gather(1, order), (m.double() + log_s).float(), (log_s - t / s).float())
        if not every:
            full = (torch.arange(k).repeat(n, 1), torch.full((n, k), float("nan")), torch.full((n,), float("nan")),
                    torch.full((n,), float("nan")))
            for f, v in zip(full, res):
                f[ok] = v
            res = full
        out[p] = Decoded(*res)
    return out
