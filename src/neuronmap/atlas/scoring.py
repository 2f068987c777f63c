"""The probability a decoded vector puts on a few tokens: exactly from the weights, or from the stored top-k.

- exact: ``p(t | x) = exp(z_t - lse(x))`` with ``z_t = softcap(final_norm(x) . W_U[t] + b_t)``
  and the log-sum-exp the atlas stored for ``x``. Only the tokens' rows of ``W_U``
  are needed (``[n_tokens, d_model]``), so one streaming pass over the weights scores
  every vector of the atlas, not only those whose top-k holds ``t``.
- stored: the atlas's top-k lists, with no weights. A row is found only where ``t``
  is among its top k. Lookups go through the token index of neuronmap.atlas.store
  (``stored_top``, ``stored_rank``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from neuronmap.atlas.format import AtlasFiles
from neuronmap.atlas.store import connect, where_clause
from neuronmap.decode.engine import build_head
from neuronmap.decode.head import apply_norm, logits
from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.resolve import Weights, open_weights, resolve_source
from neuronmap.sources.weights import Source
from neuronmap.core.cache import file_sha256

if TYPE_CHECKING:  # the handle calls these functions; they only name its type
    from neuronmap.atlas.handle import Atlas


# ------------------------------------------------------------------ exact, from the weights


def check_weights(atlas: Atlas, weights: str | None = None,
                  fix: str = "pass weights=PATH if they only moved, or search the stored top-k with stored=True") -> Source:
    """The weights an atlas was mapped from, each file's sha256 checked against meta.json.

    Args:
        files: the atlas.
        weights: where the weights are now, if they moved (anything ``resolve_source``
            takes); default: the path recorded in meta.json.
        fix: the calling command's remedies, after "re-map with ...", in its errors.

    Raises:
        NeuronmapError: a file is missing, or its sha256 differs from the recorded one.

    Example:
        >>> check_weights(open_files("demo-atlas")).kind  # doctest: +SKIP
        'gguf'
    """
    src = atlas.meta.get("source") or {}
    expected = {f["name"]: f["sha256"] for f in src.get("files", [])}
    fix = f"re-map with `neuronmap map {src.get('spec', 'SOURCE')} -o {atlas.root} --overwrite`, {fix}"
    if not expected:
        raise NeuronmapError(f"{atlas.root}/meta.json records no source weights with sha256: {fix}")
    if weights is not None:
        found = resolve_source(weights)
        have = {file_sha256(f) for f in found.files}
        for name, sha in expected.items():
            if sha not in have:
                raise NeuronmapError(f"{weights} is not what this atlas was mapped from: none of its files has the sha256 "
                                     f"of {name} ({sha[:12]}...); {fix}")
        return found
    path = Path(src["path"])
    base = path.parent if src["kind"] == "gguf" else path
    for name, sha in expected.items():
        f = base / name
        if not f.is_file():
            raise NeuronmapError(f"the weights moved or were deleted since mapping: {f} is missing; {fix}")
        got = file_sha256(f)
        if got != sha:
            raise NeuronmapError(f"the weights changed since mapping: {f} has sha256 {got[:12]}..., the atlas recorded "
                                 f"{sha[:12]}...; {fix}")
    return Source(src["kind"], src["spec"], path, tuple(base / n for n in expected))


_KEEP_BYTES = 0  # tensor bytes kept per opened model; 0 (the CLI): read, use, drop
_KEPT: dict[tuple, Weights] = {}
_KEPT_MODELS = 2  # a served pair of atlases, without hoarding memory
_LOCK = threading.Lock()


def keep_weights(budget_bytes: int) -> None:
    """Keep the tensors ``atlas_weights`` reads in memory, up to ``budget_bytes`` per model (a long-running viewer).

    A one-shot command reads each tensor once, so keeping them would only raise its peak memory; a viewer
    answers many searches from the same weights, and re-reading (dequantizing) them dominated each answer.
    """
    global _KEEP_BYTES
    with _LOCK:
        _KEEP_BYTES = int(budget_bytes)
        _KEPT.clear()


def _memoized(w: Weights, budget: int) -> Weights:
    kept: dict[str, torch.Tensor] = {}
    used = [0]

    def read(name: str) -> torch.Tensor:
        t = kept.get(name)
        if t is None:
            t = w.read(name)
            with _LOCK:
                if used[0] + t.nbytes <= budget and name not in kept:
                    kept[name] = t
                    used[0] += t.nbytes
        return t

    return dataclasses.replace(w, read=read)


def atlas_weights(atlas: Atlas, weights: str | None = None) -> Weights:
    """The weights an atlas was mapped from (``check_weights``), opened; kept in memory after ``keep_weights``.

    Raises:
        NeuronmapError: as ``check_weights``.
    """
    src = check_weights(atlas, weights)
    if atlas.meta.get("sae"):  # a feature atlas: its SAEs' vectors in place of the neurons', each sha256 checked
        from neuronmap.sources.sae import reopen_saes

        return reopen_saes(atlas.meta["sae"], _model_weights(src))
    return _model_weights(src)


def _model_weights(src) -> Weights:
    if not _KEEP_BYTES:
        return open_weights(src)
    key = tuple((str(f), file_sha256(f)) for f in src.files)  # the sha256 is cached by path, size and times
    with _LOCK:
        w = _KEPT.get(key)
    if w is None:
        w = _memoized(open_weights(src), _KEEP_BYTES)
        with _LOCK:
            while len(_KEPT) >= _KEPT_MODELS:
                _KEPT.pop(next(iter(_KEPT)))
            _KEPT[key] = w
    return w


@dataclass(frozen=True)
class TokenProbs:
    """Exact probabilities of a few tokens under every chosen atlas row.

    Attributes:
        keys: one row per atlas row: ``matrix``, ``layer``, ``neuron``, ``pole``.
        token_ids: the tokens, in column order.
        probs: ``[n_rows, n_tokens]`` float32.
    """

    keys: pd.DataFrame
    token_ids: tuple[int, ...]
    probs: np.ndarray


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _prefetched(fn: Callable, items: list, depth: int = 2) -> Iterator:
    """``fn(item)`` for each item in order, computed up to ``depth`` items ahead in one background thread.

    Reading (dequantizing) the next vectors overlaps the math on the current ones;
    the bounded depth keeps at most ``depth + 1`` matrices in memory.
    """
    with ThreadPoolExecutor(1) as pool:
        ahead = deque(pool.submit(fn, it) for it in items[:depth])
        for it in items[depth:]:
            ahead.append(pool.submit(fn, it))
            yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def exact_token_probs(files: AtlasFiles, weights: Weights, token_ids: list[int], matrices: list[str],
                      layers: list[int], poles: list[str]) -> TokenProbs:
    """p(t | row) for every atlas row of the chosen matrices, layers and poles, from the weights.

    One pass over the vectors with the atlas's own decode options (norm,
    fold_input_norm); per (layer, matrix) one norm and one
    ``[d_mlp, d_model] x [d_model, n_tokens]`` product, then the stored log-sum-exp.

    Example:
        >>> tp = exact_token_probs(files, open_weights(check_weights(files)), [6728], ["up"], [29], ["+"])  # doctest: +SKIP
        >>> tp.probs.shape
        (1536, 1)
    """
    dec = files.meta["decode"]
    keys = connect().execute(f"SELECT matrix, layer, neuron, pole, logsumexp FROM read_parquet(?) "
                             f"WHERE {where_clause(matrices, layers, poles)}", [str(files.neurons)]).df()
    head = build_head(weights, dec.get("norm", "final"), "cpu", "float32")
    ids = torch.tensor(token_ids, dtype=torch.long)
    # The norm is applied once per vector; then a head that skips it maps normed states to the tokens' logits.
    rows = dataclasses.replace(head, norm="none", W_U=head.W_U[ids].contiguous(), W_U_screen=None,
                               b_U=head.b_U[ids] if head.b_U is not None else None)  # W_U: [n_tokens, d_model]
    neuron, lse = keys["neuron"].to_numpy(), keys["logsumexp"].to_numpy(np.float64)
    plus = keys["pole"].to_numpy() == "+"
    probs = np.zeros((len(keys), len(token_ids)), np.float32)  # [n_rows, n_tokens]
    groups = keys.groupby(["layer", "matrix"], sort=False).indices

    def read(group: tuple) -> torch.Tensor:
        layer, matrix = int(group[0]), group[1]
        vecs = weights.vectors(matrix, layer)  # [d_mlp, d_model]
        if dec.get("fold_input_norm") and matrix != "down":
            vecs = vecs * weights.mlp_norm_gain(layer)
        return vecs

    # Small products: torch's intra-op threads cost more than they gain, badly so on a busy machine.
    threads = 1 if weights.d_mlp * weights.d_model < (1 << 24) else torch.get_num_threads()
    with torch.inference_mode(), _torch_threads(threads):
        for (group, idx), vecs in zip(groups.items(), _prefetched(read, list(groups))):
            h = apply_norm(head, vecs)
            # Without a norm bias the norm is odd, so the - pole's normed state is -h, bit for bit.
            h_minus = -h if head.bias is None else apply_norm(head, -vecs)
            z = {True: logits(rows, h).double().numpy(), False: logits(rows, h_minus).double().numpy()}  # [d_mlp, n_tokens]
            n, p = neuron[idx], plus[idx]
            probs[idx] = np.exp(np.where(p[:, None], z[True][n], z[False][n]) - lse[idx, None])
    return TokenProbs(keys[["matrix", "layer", "neuron", "pole"]], tuple(token_ids), probs)
