"""Record activation evidence: what every neuron fires on in a corpus, streamed with bounded memory.

The activation is the input of the down projection (``neuronmap.runtime.hooks``: the
quantity ``clamp`` sets), recorded for every layer from one forward pass per batch.
Per neuron the recorder keeps, whatever the corpus size:

- the top-N and bottom-N activations with their token's index in the token store
  (``[d_mlp, N]`` tensors per layer, merged with each batch by ``torch.topk``);
- a histogram over fixed bins shared by every neuron (``neuronmap.atlas.bins``: 32 bins an
  octave of |activation| from 2^-10 to 2^10 on each side of 0, read off the float32
  bits). Quantiles are read from it (within 1.55 % of the exact value for |a| in
  2^-10..2^10, within 4.9e-4 below); the stored histogram merges 8 bins into one;
- the count of activations > 0 (density) and the sum (mean), exact.

Token ids go to a scratch file (4 bytes a token, on disk, not in memory) so that
examples' windows are cut at the end. Everything is written into a temporary
directory inside the atlas and renamed into place only when complete
(``neuronmap.atlas.evidence.publish``): an interrupted run leaves the atlas as it was.
"""

from __future__ import annotations

import ctypes
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from neuronmap.atlas.format import QUANTILES
from neuronmap.atlas.handle import Atlas
from neuronmap.core import fsio
from neuronmap.decode import native
from neuronmap.atlas.bins import N_BINS, TOP_BITS, bin_index_fast, bin_table, hist_edges
from neuronmap.evidence.corpus import Corpus, Sequence, open_corpus, sequences
from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.hooks import recording
from neuronmap.runtime.models import DEVICE, load_model, require_tokenizer

CONTEXT = 32
EXAMPLES = 20
MAX_EXAMPLES = 100  # 24 bytes a neuron per example while recording, and a row a neuron, pole and example on disk
BATCH_TOKENS = 2048
MAX_TOKENS = 2**31 - 1  # the int32 histogram counts stay exact; it also bounds the scratch file at 8 GB


@dataclass(frozen=True)
class LayerStats:
    """One layer's finished statistics (numpy), ``N`` the examples kept.

    Attributes:
        top_v, top_i: ``[d_mlp, N]`` activations (descending) and token-store indices; -inf / -1 where unfilled.
        bot_v, bot_i: the same for the lowest activations (ascending); +inf / -1 where unfilled.
        counts: ``[d_mlp, bins.N_BINS]`` int64 histogram over ``neuronmap.atlas.bins``.
        positive: ``[d_mlp]`` int64 count of activations > 0.
        total: ``[d_mlp]`` float64 sum of activations.
    """

    top_v: np.ndarray
    top_i: np.ndarray
    bot_v: np.ndarray
    bot_i: np.ndarray
    counts: np.ndarray
    positive: np.ndarray
    total: np.ndarray


class Running:
    """Running top-N, bottom-N, histogram and sum of one layer, on the model's device."""

    def __init__(self, d_mlp: int, n: int, dev: torch.device):
        self.nb = N_BINS
        self.top_v = torch.full((d_mlp, n), -torch.inf, device=dev)  # [d_mlp, N]
        self.bot_v = torch.full((d_mlp, n), torch.inf, device=dev)
        self.top_i = torch.full((d_mlp, n), -1, dtype=torch.long, device=dev)
        self.bot_i = self.top_i.clone()
        self.counts = torch.zeros(d_mlp * self.nb, dtype=torch.int32, device=dev)  # MAX_TOKENS keeps it exact
        self.positive = torch.zeros(d_mlp, dtype=torch.long, device=dev)
        self.total = torch.zeros(d_mlp, dtype=torch.float64, device=dev)
        self.offsets = torch.arange(d_mlp, device=dev, dtype=torch.int32) * self.nb  # [d_mlp]

    def add_rows(self, acts: torch.Tensor, rows: torch.Tensor, first: int) -> str:
        """Add the recorded tokens of one forward pass; which path ran: ``native`` or ``torch``.

        Args:
            acts: ``[batch, seq, d_mlp]`` the layer's activations.
            rows: ``[T]`` int64, the recorded tokens' indices in ``acts`` flattened to ``[batch * seq, d_mlp]``,
                in token-store order; they are tokens ``first .. first+T-1`` of the store.
        """
        flat = acts.reshape(-1, acts.shape[-1])  # [batch * seq, d_mlp]
        lib = native.load("record") if flat.device.type == "cpu" else None
        if lib is None:
            self.add(flat.index_select(0, rows).float().T.contiguous(), first)
            return "torch"
        flat = flat.float().contiguous()
        rows = rows.contiguous()
        p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
        i64 = ctypes.c_int64
        lib.nm_record(p(flat), i64(flat.shape[1]), p(rows), i64(len(rows)), i64(first), i64(flat.shape[1]),
                      i64(self.top_v.shape[1]), p(self.top_v), p(self.top_i), p(self.bot_v), p(self.bot_i),
                      p(self.counts), i64(self.nb), p(bin_table(flat.device)), ctypes.c_int(TOP_BITS),
                      p(self.positive), p(self.total), ctypes.c_int(torch.get_num_threads()))
        return "native"

    def add(self, acts: torch.Tensor, first: int) -> None:
        """``acts`` ``[d_mlp, T]`` fp32, contiguous, of tokens ``first .. first+T-1`` of the token store."""
        # Neuron-major so that each neuron's T values are contiguous: topk and the histogram's scatter each stay
        # in one row at a time (1.6x and 3x faster than token-major here).
        self._merge(acts, first, largest=True)
        self._merge(acts, first, largest=False)
        bins = bin_index_fast(acts).view_as(acts).add_(self.offsets[:, None])  # [d_mlp, T]
        self.counts += torch.bincount(bins.view(-1), minlength=self.counts.numel()).to(torch.int32)
        self.positive += (acts > 0).sum(1)
        self.total += acts.sum(1).double()  # fp32 within a batch, fp64 across batches

    def _merge(self, acts: torch.Tensor, first: int, largest: bool) -> None:
        """Merge the batch into the running top-N (or bottom-N), only for neurons with a value past their N-th."""
        keep_v, keep_i = (self.top_v, self.top_i) if largest else (self.bot_v, self.bot_i)
        edge = keep_v[:, -1:]  # [d_mlp, 1] the N-th kept value: -inf (+inf) until N are kept
        # Once the lists fill, most neurons have nothing in a batch that beats their N-th value: skip them.
        rows = ((acts > edge) if largest else (acts < edge)).any(1).nonzero().squeeze(1)  # [n_rows]
        if not len(rows):
            return
        sub = acts.index_select(0, rows)  # [n_rows, T]
        v, j = sub.topk(min(keep_v.shape[1], sub.shape[1]), 1, largest=largest)
        both_v = torch.cat([keep_v[rows], v], 1)  # [n_rows, N + n]
        both_i = torch.cat([keep_i[rows], j + first], 1)
        mv, mj = both_v.topk(keep_v.shape[1], 1, largest=largest)
        keep_v[rows] = mv
        keep_i[rows] = both_i.gather(1, mj)

    def finish(self) -> LayerStats:
        c = lambda x: x.cpu().numpy()  # noqa: E731
        return LayerStats(c(self.top_v), c(self.top_i), c(self.bot_v), c(self.bot_i),
                          c(self.counts).reshape(-1, self.nb).astype(np.int64), c(self.positive), c(self.total))


@dataclass(frozen=True)
class Stream:
    """What the forward passes leave: per-layer statistics and the token store's layout.

    Attributes:
        layers: ``LayerStats`` per layer.
        n_tokens: tokens recorded.
        row_start: ``[n_rows + 1]`` int64 token-store index where each sequence starts (last: the end).
        row_doc: ``[n_rows]`` document index into ``docs``; row_pos: ``[n_rows]`` the sequence's first token in its document.
        docs: document names.
        store: the token store (int32 token ids, one per recorded token).
        kernel: how the statistics were kept: ``native`` (neuronmap/decode/csrc/record.c) or ``torch``.
    """

    layers: list[LayerStats]
    n_tokens: int
    row_start: np.ndarray
    row_doc: np.ndarray
    row_pos: np.ndarray
    docs: list[str]
    store: Path
    kernel: str


def bos_token(tok) -> int | None:
    """The id put before each sequence: the tokenizer's BOS where it adds one to plain text itself, else None."""
    bos = getattr(tok, "bos_token_id", None)
    ids = tok("a")["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def batches(seqs, batch_tokens: int, limit: int | None):
    """Lists of sequences of about ``batch_tokens`` tokens; the corpus cut at ``limit`` tokens."""
    batch, size, seen = [], 0, 0
    for s in seqs:
        if limit is not None and seen + len(s.token_ids) > limit:
            s = Sequence(s.doc, s.start, s.token_ids[:limit - seen])
        seen += len(s.token_ids)
        if s.token_ids:
            batch.append(s)
            size += len(s.token_ids)
        if size >= batch_tokens:
            yield batch
            batch, size = [], 0
        if limit is not None and seen >= limit:
            break
    if batch:
        yield batch


def encode(batch: list[Sequence], bos: int | None, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch as model input: ``ids`` ``[batch, seq]`` (BOS first where there is one, right-padded), ``valid``
    (the recorded tokens) and the attention ``mask``."""
    lead = 1 if bos is not None else 0
    width = lead + max(len(s.token_ids) for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [batch, seq]
    valid = torch.zeros((len(batch), width), dtype=torch.bool)
    for r, s in enumerate(batch):
        if lead:
            ids[r, 0] = bos
        ids[r, lead:lead + len(s.token_ids)] = torch.tensor(s.token_ids)
        valid[r, lead:lead + len(s.token_ids)] = True
    return ids, valid, (valid | (torch.arange(width) < lead)).long()


def record_batch(m, layers: list[Running], ids: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
                 first: int) -> str:
    """One forward pass of the decoder, each layer's activations merged into ``layers`` as the pass makes them.

    Args:
        m: the model; ids, valid, mask: from ``encode``; first: the store index of the batch's first token.

    Returns:
        The path the statistics took: ``native`` (the C kernel) or ``torch``.
    """
    rows = valid.reshape(-1).nonzero().squeeze(1).to(m.device)  # [T] in store order: row by row
    used = set()
    base = getattr(m.model, "base_model", m.model)  # the decoder alone: the LM head's logits are not needed
    with recording(m, lambda i, acts: used.add(layers[i].add_rows(acts, rows, first))):
        base(input_ids=ids.to(m.device), attention_mask=mask.to(m.device), use_cache=False)
    return "torch" if "torch" in used else "native"


def stream(m, corpus: Corpus, store: Path, context: int = CONTEXT, examples: int = EXAMPLES,
           batch_tokens: int = BATCH_TOKENS, tokens: int | None = None,
           progress: Callable[[int], None] | None = None) -> Stream:
    """Run the model over the corpus, one forward pass per batch with every layer's activations recorded.

    Args:
        m: a loaded ``neuronmap.runtime.models.Model`` with a tokenizer.
        corpus: from ``open_corpus``.
        store: where to write the token store (a new file).
        context: tokens per sequence (BOS not counted).
        examples: top-N and bottom-N kept per neuron.
        batch_tokens: tokens per forward pass (rounded up to whole sequences).
        tokens: stop after this many tokens (None: the whole corpus, at most ``MAX_TOKENS``).
        progress: called with the tokens recorded so far after each batch.

    Returns:
        Stream.

    Raises:
        NeuronmapError: the corpus is empty, binary or malformed (``neuronmap.evidence.corpus``), or has no tokenizer.
    """
    tok = require_tokenizer(m)
    bos = bos_token(tok)
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    layers = [Running(m.d_mlp, examples, m.device) for _ in range(m.n_layers)]
    # Typed arrays, not lists: 8 bytes a sequence, not ~36 (a 10M-token run has ~300k sequences).
    starts, row_doc, row_pos, docs, doc_index = array("q", [0]), array("i"), array("q"), [], {}
    n, kernel = 0, "native"
    limit = min(tokens, MAX_TOKENS) if tokens is not None else MAX_TOKENS
    with open(store, "wb") as f, torch.no_grad():
        for batch in batches(sequences(corpus, tok, context), batch_tokens, limit):
            ids, valid, mask = encode(batch, bos, pad)
            for s in batch:
                f.write(np.asarray(s.token_ids, np.int32).tobytes())
                if s.doc not in doc_index:
                    doc_index[s.doc] = len(docs)
                    docs.append(s.doc)
                row_doc.append(doc_index[s.doc])
                row_pos.append(s.start)
                starts.append(starts[-1] + len(s.token_ids))
            if record_batch(m, layers, ids, valid, mask, n) == "torch":
                kernel = "torch"
            n = starts[-1]
            if progress:
                progress(n)
    if n == 0:
        raise NeuronmapError(f"corpus={corpus.path} holds no text (0 tokens): give a corpus with some text")
    return Stream([x.finish() for x in layers], n, np.asarray(starts, np.int64), np.asarray(row_doc, np.int32),
                  np.asarray(row_pos, np.int64), docs, store, kernel)


@dataclass(frozen=True)
class RecordResult:
    """What ``record`` added to an atlas.

    Attributes:
        path: the atlas.
        evidence: the ``evidence`` entry now in its meta.json.
    """

    path: Path
    evidence: dict

    def to_dict(self) -> dict:
        """JSON types only: the atlas path and its meta.json ``evidence`` entry."""
        return {"atlas": str(self.path), **self.evidence}


@dataclass(frozen=True)
class RecordOptions:
    """How ``record`` reads its corpus and what it keeps; recorded in meta.json's ``evidence`` entry.

    Attributes:
        text_column: the text column of a JSONL, Parquet or ``hf:`` corpus (None: ``text``).
        every: read the first of each ``every`` documents (a spread-out slice of a large corpus).
        tokens: record at most this many tokens (None: the whole corpus).
        context: tokens per sequence the model reads.
        examples: top-N and bottom-N examples kept per neuron, 1 to ``MAX_EXAMPLES``.
        batch_tokens: tokens per forward pass.
        device: ``cpu`` | ``cuda`` | ``auto``.
    """

    text_column: str | None = None
    every: int = 1
    tokens: int | None = None
    context: int = CONTEXT
    examples: int = EXAMPLES
    batch_tokens: int = BATCH_TOKENS
    device: str = DEVICE

    def check(self) -> None:
        """Check the numbers before any model loads.

        Raises:
            NeuronmapError: one out of range (``examples`` above ``MAX_EXAMPLES`` too).
        """
        if not 1 <= self.examples <= MAX_EXAMPLES:
            raise NeuronmapError(f"examples={self.examples} is out of range: expected a whole number from 1 to "
                                 f"{MAX_EXAMPLES} (each example kept costs 24 bytes a neuron while recording and a row a "
                                 "neuron and pole in examples.parquet)")
        for name, v in (("every", self.every), ("tokens", self.tokens), ("context", self.context),
                        ("batch_tokens", self.batch_tokens)):
            if v is not None and v < 1:
                raise NeuronmapError(f"{name}={v} is out of range: expected a whole number >= 1")


def record(atlas: Atlas, corpus: Path | str, options: RecordOptions = RecordOptions(), source: str | None = None,
           overwrite: bool = False, progress: Callable[[int], None] | None = None) -> RecordResult:
    """Add activation evidence (examples, quantiles, density, histogram, agreement) to an atlas.

    Args:
        atlas: the opened atlas (``Atlas.open(path)``), made by ``neuronmap map``.
        corpus: anything ``neuronmap.evidence.corpus.open_corpus`` takes.
        options: how the corpus is read and what is kept (``RecordOptions``).
        source: the model, if it moved since mapping (sha256 checked against meta.json).
        overwrite: replace evidence the atlas already holds.
        progress: called with the tokens recorded so far.

    Returns:
        RecordResult.

    Raises:
        NeuronmapError: a bad atlas, corpus or number; evidence present without ``overwrite``; weights whose
            sha256 differs from the atlas's (another model); a model without a tokenizer. The numbers and the
            corpus's start (``open_corpus``) are checked before the model loads.

    Example:
        >>> record(Atlas.open("demo-atlas"), "texts/", RecordOptions(tokens=200_000)).evidence["tokens"]  # doctest: +SKIP
        200000
    """
    from neuronmap.evidence.agreement import agreement
    from neuronmap.atlas.evidence import publish, tables
    from neuronmap.atlas.scoring import check_weights

    options.check()
    if "evidence" in atlas.meta and not overwrite:
        raise NeuronmapError(f"{atlas.root} already holds activation evidence (from "
                             f"{atlas.meta['evidence'].get('corpus', {}).get('name', '?')}): pass overwrite=True to replace it")
    c = open_corpus(corpus, options.text_column, options.every)
    src = check_weights(atlas, source, fix="pass source=PATH if they only moved")
    m = load_model(src, options.device, "float32")
    t0 = time.perf_counter()
    tmp = fsio.temp_dir_beside(atlas.root / "evidence", "atlas")
    try:
        s = stream(m, c, tmp / "tokens.bin", options.context, options.examples, options.batch_tokens, options.tokens,
                   progress)
        seconds = time.perf_counter() - t0
        built = tables(atlas, s)
        agree, summary = agreement(atlas, src, s)
        entry = {"corpus": c.to_dict(), "tokens": s.n_tokens, "documents": len(s.docs), "sequences": len(s.row_doc),
                 "context": options.context, "examples": options.examples, "batch_tokens": options.batch_tokens,
                 "bos": bos_token(m.tokenizer), "device": str(m.device), "kernel": s.kernel,
                 "record_s": round(seconds, 3), "tokens_per_s": round(s.n_tokens / max(seconds, 1e-9), 1),
                 "quantiles": list(QUANTILES), "hist_edges": [float(x) for x in hist_edges()],
                 "rows": {k: v.num_rows for k, v in {**built, "agreement": agree}.items()}, "agreement": summary,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        publish(atlas, tmp, {**built, "agreement": agree}, entry)
    finally:
        fsio.remove_tree(tmp)
    return RecordResult(atlas.root, entry)

