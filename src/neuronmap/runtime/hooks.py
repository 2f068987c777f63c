"""Hooks on the model's MLPs: read every neuron's activation (``recording``) or rewrite some (``intervene``).

A neuron's activation is the input of the down projection at its index:
``act(gate) * up`` in gated MLPs, ``act(fc1)`` otherwise. An intervention
rewrites that column before the down projection reads it, so everything
downstream (later layers, the logits, generation) sees the changed value.
The spec grammar (``L29N808=20x``) is neuronmap.runtime.specs.

Positions (``--positions``), for every forward pass inside ``intervene``:
  ``all``        every token, prompt and generated (the default)
  ``prompt``     the tokens of the prompt: the whole input of a forward pass that
                 starts from an empty KV cache
  ``generated``  tokens after the prompt (forward passes that continue a cache)
  ``last``       the newest token of each forward pass: the one whose next token is
                 being predicted (the prompt's last token, then each generated one)
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from importlib import resources
from typing import Callable, Iterator

import numpy as np
import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.core.fsio import atomic_file
from neuronmap.core.ids import neuron_id, parse_neuron_id
from neuronmap.runtime.models import Model, require_tokenizer
from neuronmap.runtime.specs import MODES, Intervention, Spec, Value, check_amount, check_specs
from neuronmap.core.cache import cache_dir, file_sha256

POSITIONS = ("all", "prompt", "generated", "last")
POSITIONS_DEFAULT = "all"


# ------------------------------------------------------------------ specs


def check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise NeuronmapError(f"unknown positions={positions!r}: expected one of {', '.join(POSITIONS)}")


# ------------------------------------------------------------------ hooks


class _Cursor:
    """Where the current forward pass sits in its sequences, shared by one context's hooks.

    Attributes:
        offset: position of the forward pass's first token (the KV cache length).
        prompt_len: input length of the last forward pass that started from an empty cache.
        last: ``[batch]`` index of each row's newest real token in this forward pass
            (right-padded batches end in padding), or None for ``seq - 1``.
    """

    offset = 0
    prompt_len = 0
    last: torch.Tensor | None = None


def _model_hook(cursor: _Cursor):
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        past = kwargs.get("past_key_values")
        cursor.offset = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        if x is None:
            return
        seq = int(x.shape[1])
        if cursor.offset == 0:
            cursor.prompt_len = seq
        mask = kwargs.get("attention_mask")
        cursor.last = None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            window = mask[:, -seq:]  # [batch, seq]
            cursor.last = seq - 1 - window.flip(-1).argmax(-1)  # [batch]
    return hook


def _selected(cursor: _Cursor, seq: int, positions: str, device: torch.device) -> torch.Tensor:
    """Which tokens of the current forward pass to rewrite: ``[seq]`` or ``[batch, seq]`` bool."""
    idx = torch.arange(seq, device=device)  # [seq]
    if positions == "all":
        return torch.ones(seq, dtype=torch.bool, device=device)
    if positions == "prompt":
        return cursor.offset + idx < cursor.prompt_len
    if positions == "generated":
        return cursor.offset + idx >= cursor.prompt_len
    if cursor.last is None:
        return idx == seq - 1
    return idx.unsqueeze(0) == cursor.last.to(device).unsqueeze(-1)  # [batch, seq]


def _mlp_hook(cursor: _Cursor, iv: Intervention, positions: str):
    def hook(module, args):
        x = args[0]  # [..., seq, d_mlp]
        sel = _selected(cursor, x.shape[-2], positions, x.device)  # [seq] or [batch, seq]
        c = x[..., iv.neuron]  # [..., seq]
        new = torch.full_like(c, iv.value) if iv.mode == "set" else c + iv.value if iv.mode == "add" else c * iv.value
        x = x.clone()
        x[..., iv.neuron] = torch.where(sel, new, c)
        return (x, *args[1:])
    return hook


@contextmanager
def intervene(m: Model, interventions: list[Intervention], positions: str = POSITIONS_DEFAULT) -> Iterator[None]:
    """Rewrite neurons' activations in every forward pass of ``m.model`` inside the block.

    Hooks are removed on exit, also when the block raises. Interventions on the
    same neuron apply in order (``set`` then ``add`` adds to the set value).

    Args:
        m: the loaded model.
        interventions: absolute rewrites (see ``resolve``).
        positions: one of ``POSITIONS``.

    Raises:
        NeuronmapError: unknown positions or mode.

    Example:
        >>> with intervene(m, [Intervention(29, 808, "set", 40.0)]):  # doctest: +SKIP
        ...     logits = m.model(ids).logits
    """
    check_positions(positions)
    for iv in interventions:
        if iv.mode not in MODES:
            raise NeuronmapError(f"unknown mode {iv.mode!r}: expected one of {', '.join(MODES)}")
        parse_neuron_id(neuron_id(iv.layer, iv.neuron), m.n_layers, m.d_mlp)
    cursor = _Cursor()
    handles = [m.model.register_forward_pre_hook(_model_hook(cursor), with_kwargs=True)]
    try:
        # One hook per neuron, in order, so two rewrites of one neuron compose.
        for iv in interventions:
            handles.append(m.downs[iv.layer].register_forward_pre_hook(_mlp_hook(cursor, iv, positions)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recording(m: Model, each: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[list[torch.Tensor | None]]:
    """Record every layer's activations ``[..., seq, d_mlp]`` (the down projections' inputs) of the last forward pass.

    Args:
        m: the model.
        each: if given, called as ``each(layer, acts)`` the moment a layer's activations exist, and nothing is
            kept (the list stays None): the caller consumes them while the pass goes on, so a pass never holds
            every layer's activations at once.
    """
    seen: list[torch.Tensor | None] = [None] * m.n_layers

    def make(i: int):
        def hook(module, args):
            if each is None:
                seen[i] = args[0].detach()
            else:
                each(i, args[0].detach())
        return hook

    handles = [d.register_forward_pre_hook(make(i)) for i, d in enumerate(m.downs)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ natural range


def bundled_text(name: str) -> str:
    """A text file from ``neuronmap/data`` (``reference.txt``, ``prompts.txt``)."""
    return resources.files("neuronmap").joinpath("data", name).read_text(encoding="utf-8")


def bundled_prompts() -> list[str]:
    """The ~20 neutral prompts used when ``--prompts`` is not given."""
    return [p for p in bundled_text("prompts.txt").splitlines() if p.strip()]


def encode(m: Model, text: str) -> torch.Tensor:
    """``[1, seq]`` token ids of plain text on the model's device."""
    tok = require_tokenizer(m)
    ids = tok(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise NeuronmapError("the prompt is empty after tokenization: give some text")
    return ids.to(m.device)


def natural_range(m: Model) -> torch.Tensor:
    """The largest |activation| of every neuron on the bundled reference text, ``[n_layers, d_mlp]`` fp32.

    Computed with one forward pass and cached in ``cache_dir()/ranges``, keyed by
    the weight files' sha256, the dtype and the reference text.

    Raises:
        NeuronmapError: the model has no tokenizer.
    """
    text = bundled_text("reference.txt")
    h = hashlib.sha256(text.encode())
    for f in m.source.files:
        h.update(file_sha256(f).encode())
    h.update(str(m.dtype).encode())
    path = cache_dir() / "ranges" / f"{h.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            arr = np.load(path)
            if arr.shape == (m.n_layers, m.d_mlp):
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    ids = encode(m, text)
    with torch.no_grad(), recording(m) as seen:
        m.model(ids)
    ranges = torch.stack([a.float().abs().reshape(-1, m.d_mlp).amax(0).cpu() for a in seen])  # [n_layers, d_mlp]
    try:
        with atomic_file(path, "cache") as tmp, open(tmp, "wb") as f:
            np.save(f, ranges.numpy())
    except NeuronmapError:
        pass  # a read-only cache only costs a forward pass
    return ranges


def resolve(specs: list[Spec], m: Model, value: Value | None = None) -> list[Intervention]:
    """Turn specs into absolute interventions; ``value`` (a sweep point) overrides each spec's own.

    Raises:
        NeuronmapError: a spec without a value and no ``value`` given.
    """
    check_specs(specs, m)
    ranges = None
    out = []
    for s in specs:
        v = value if value is not None else s.value
        if v is None:
            raise NeuronmapError(f"neuron spec {s.id!r} has no value: give one (e.g. {s.id}=20x) or a sweep=...")
        amount = v.amount
        if v.relative and s.mode != "scale":
            ranges = natural_range(m) if ranges is None else ranges
            amount *= float(ranges[s.layer, s.neuron])
        check_amount(s, v, amount)
        out.append(Intervention(s.layer, s.neuron, s.mode, amount))
    return out


