"""Trace one prediction: which neurons wrote the target token's logit, what they mean, where the prediction forms.

The residual stream reaching the final norm is a sum: the embeddings, each attention block's output, each MLP's
output (every neuron's ``activation x down column``, then its bias; Gemma 2/3 norm the MLP output first, at the
scale the model used), in the order the blocks add them. The final norm is linear once its scale is fixed at the
value the forward pass used at that position, so the target's logit before the softcap splits exactly:

    z_t = sum_c  c . u  +  b_norm . W_U[t] + b_U[t],    u = gain * W_U[t] * scale          (rms, rms_1p)
                                                        u = centred(gain * W_U[t]) * scale (layer)

``scale`` is ``1/sqrt(mean(x^2)+eps)`` (``1/sqrt(var(x)+eps)`` for LayerNorm) of the norm's actual input ``x``.
LayerNorm's mean-centring is linear, so it is distributed over the components (``u`` is centred) rather than
reported as a group of its own. A neuron's direct contribution is ``activation * (down column . s_l * u)``, ``s_l``
Gemma's MLP-output norm factor (1 elsewhere). Where the family has a final softcap (Gemma 2/3) the contributions sum
to the logit before it: the model's logit is ``softcap * tanh(sum / softcap)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.labels import activation_quantiles, neuron_labels
from neuronmap.atlas.scoring import check_weights
from neuronmap.decode.head import Head
from neuronmap.intervene.attribution import active_neurons, decompose, lens, pre_softcap, softcapped, target_ranks, top_neurons
from neuronmap.intervene.capture import capture, last_logit, model_head
from neuronmap.runtime.hooks import encode
from neuronmap.runtime.models import DEVICE, DTYPE, Model, load_model, require_tokenizer
from neuronmap.runtime.specs import Intervention

TOP = 20  # top and bottom contributors shown
NEXT = 5  # the model's top next tokens shown
POSITIONS = ("last", "all")  # or a token index


@dataclass(frozen=True)
class TraceNeuron:
    """One neuron's direct contribution to the target's logit at one position.

    Attributes:
        neuron, layer, index: ``L{layer}N{index}``, its layer and index.
        activation: the down projection's input at that position.
        contribution: its direct contribution to the target's logit (before any softcap).
        target_rank: the target's rank (1 = top) among all tokens when the vector the neuron writes here
            (``sign(activation) x down column``) is decoded through the final norm and head, as the atlas decodes it.
        label: from the atlas (``neuronmap.atlas.labels.neuron_labels``: down/up/gate top tokens, agreement), or None.
    """

    neuron: str
    layer: int
    index: int
    activation: float
    contribution: float
    target_rank: int
    label: dict | None = None

    def to_dict(self) -> dict:
        return {"neuron": self.neuron, "layer": self.layer, "index": self.index, "activation": self.activation,
                "contribution": self.contribution, "target_rank": self.target_rank, "label": self.label}


@dataclass(frozen=True)
class TracePosition:
    """The decomposition of the target's logit at one position.

    Attributes:
        position, token: the index of the token whose next token is predicted, and its string.
        next: the model's top next tokens, ``(token, prob)``.
        target, target_id: the traced token.
        logit, prob: the model's logit and probability of the target.
        logit_before_softcap: the logit before the final softcap, or None where the family has none.
        norm_scale: the final norm's factor at this position (``1/rms`` or ``1/std``).
        sum_of_contributions: the sum of every group (before the softcap).
        difference: softcap(sum) minus the model's logit.
        groups: ``{"group", "layer", "contribution"}``: embeddings, attention and mlp per layer, biases, between layers.
        neurons: the top then the bottom contributors.
        lens: per layer ``{"layer", "prob", "top_token"}``: the residual stream after the layer through the head.
        active: the neurons most active here, ``{"neuron", "layer", "index", "activation", "score", "label"}``
            (``--positions all``), ranked by ``Trace.active_rank``.
    """

    position: int
    token: str
    next: tuple[tuple[str, float], ...]
    target: str
    target_id: int
    logit: float
    prob: float
    logit_before_softcap: float | None
    norm_scale: float
    sum_of_contributions: float
    difference: float
    groups: tuple[dict, ...]
    neurons: tuple[TraceNeuron, ...]
    lens: tuple[dict, ...]
    active: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"position": self.position, "token": self.token,
                "next": [{"token": t, "prob": p} for t, p in self.next], "target": self.target,
                "target_id": self.target_id, "logit": self.logit, "prob": self.prob,
                "logit_before_softcap": self.logit_before_softcap, "norm_scale": self.norm_scale,
                "sum_of_contributions": self.sum_of_contributions, "difference": self.difference,
                "groups": list(self.groups), "neurons": [n.to_dict() for n in self.neurons], "lens": list(self.lens),
                "active": list(self.active)}


@dataclass(frozen=True)
class Ablation:
    """One contributor zeroed at the traced position: the logit change it causes beside its direct contribution.

    Attributes:
        neuron, layer, index: which neuron.
        direct: its direct contribution (zeroing it predicts a change of ``-direct``).
        change: the target's logit change when zeroed, everything downstream included.
        change_frozen: the same with the final norm's scale held at the traced pass's value.
    """

    neuron: str
    layer: int
    index: int
    direct: float
    change: float
    change_frozen: float

    def to_dict(self) -> dict:
        return {"neuron": self.neuron, "layer": self.layer, "index": self.index, "direct": self.direct,
                "change": self.change, "change_frozen": self.change_frozen}


@dataclass(frozen=True)
class Trace:
    """A traced text: one ``TracePosition`` per traced position, ablations of the last one's top contributors.

    Attributes:
        text, source, atlas: what was traced, with which model (its spec) and atlas (None: no labels).
        tokens: the text's tokens.
        softcap: the family's final softcap, or None.
        active_rank: ``unusual`` (activation beyond the neuron's recorded quantiles) or ``abs`` (|activation|).
        positions: the traced positions; the last is the headline of ``to_dict``.
        ablations: ``--ablate N`` at the last traced position.
    """

    text: str
    source: str
    atlas: str | None
    tokens: tuple[str, ...]
    softcap: float | None
    active_rank: str
    positions: tuple[TracePosition, ...]
    ablations: tuple[Ablation, ...] = field(default=())

    def to_dict(self) -> dict:
        """The last traced position's fields at the top level, every position under ``positions``."""
        return {"text": self.text, "source": self.source, "atlas": self.atlas, "tokens": list(self.tokens),
                "softcap": self.softcap, "active_rank": self.active_rank, **self.positions[-1].to_dict(),
                "positions": [p.to_dict() for p in self.positions],
                "ablations": [a.to_dict() for a in self.ablations]}


# ------------------------------------------------------------------ input


def target_token(m: Model, word: str) -> int:
    """The token id of ``--target``: the word with a leading space where that is one token (`` Paris``), else as typed.

    Raises:
        NeuronmapError: empty, or more than one token either way (the pieces are named).
    """
    tok = require_tokenizer(m)
    if not word:
        raise NeuronmapError("empty target='': give one token, e.g. target=Paris")
    tries = [word] if word[0].isspace() else [" " + word, word]
    for w in tries:
        ids = tok.encode(w, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
    pieces = [tok.decode([i]) for i in tok.encode(tries[-1], add_special_tokens=False)]
    raise NeuronmapError(f"target={word!r} is {len(pieces)} tokens in this model's vocabulary "
                         f"({', '.join(repr(p) for p in pieces)}), not one: give a single token, "
                         f"e.g. target={pieces[0]!r} to trace the first")


def parse_positions(text: str) -> str | int:
    """``last``, ``all`` or a token index (negative counts from the end).

    Raises:
        NeuronmapError: anything else.
    """
    if text in POSITIONS:
        return text
    try:
        return int(text)
    except ValueError:
        raise NeuronmapError(f"positions={text!r}: expected last, all or a token index such as 3") from None


def chosen_positions(positions: str | int, seq: int) -> list[int]:
    """The traced token indices.

    Raises:
        NeuronmapError: an index past either end of the text.
    """
    if positions == "all":
        return list(range(seq))
    if positions == "last":
        return [seq - 1]
    p = int(positions)
    if not -seq <= p < seq:
        raise NeuronmapError(f"positions={p} is past the end of the text: it has {seq} tokens (0 to {seq - 1}); "
                             "give an index in that range, or last")
    return [p % seq]


# ------------------------------------------------------------------ trace


def trace_model(source: str | None, atlas=None, device: str = DEVICE, dtype: str = DTYPE) -> Model:
    """The model to trace: ``source``; where it is None and an atlas is given, the weights the atlas was mapped from
    (sha256 checked); else the demo model.

    Raises:
        NeuronmapError: as ``load_model`` and ``check_weights``.
    """
    if source is None and atlas is not None:
        return load_model(check_weights(atlas, fix="or pass the model to trace as SOURCE"), device, dtype)
    return load_model(source, device, dtype)


def trace(m: Model, text: str, target: str | None = None, atlas=None, top: int = TOP, positions: str | int = "last",
          ablate: int = 0) -> Trace:
    """Run the model once on ``text`` and split the target's logit into every neuron's direct contribution.

    Args:
        m: the loaded model.
        text: plain text, no chat template.
        target: the traced token (``Paris`` is `` Paris`` where that is one token); default: at each position, the
            model's top next token.
        atlas: an ``Atlas`` of this model (sha256 checked) for labels and evidence, or None.
        top: top and bottom contributors (and most active neurons) per position.
        positions: ``last``, ``all`` or a token index.
        ablate: zero the last position's top ``ablate`` contributors one at a time and measure the logit change.

    Returns:
        Trace.

    Raises:
        NeuronmapError: empty text, a target that is not one token, an index past the end, an atlas of another model.

    Example:
        >>> t = trace(load_model(None), "The capital of France is")  # doctest: +SKIP
        >>> t.positions[-1].target, t.positions[-1].neurons[0].neuron  # doctest: +SKIP
    """
    if not text.strip():
        raise NeuronmapError("the text is empty: give some text to trace, e.g. 'The capital of France is'")
    where_mode = parse_positions(positions) if isinstance(positions, str) else positions
    if atlas is not None:
        check_weights(atlas, str(m.source.path),
                      fix=f"or trace with the model it was mapped from, not {m.source.spec}")
    tok = require_tokenizer(m)
    target_id = target_token(m, target) if target is not None else None
    ids = encode(m, text)  # [1, seq]
    where = chosen_positions(where_mode, ids.shape[1])
    c = capture(m, ids, torch.tensor(where, device=m.device))
    head = model_head(m)
    targets = (torch.full((len(where),), target_id, device=m.device) if target_id is not None
               else c.logits.argmax(-1))  # [n_pos]
    contrib, groups, scale = decompose(m, c, head, targets)
    lens_rows = lens(head, c, targets, tok)
    pre = pre_softcap(head, c.final_in, targets).tolist() if head.softcap else None
    quantiles = activation_quantiles(atlas) if atlas is not None and where_mode == "all" else None
    strings = tuple(tok.decode([int(i)]) for i in ids[0])
    out = []
    for p, pos in enumerate(where):
        acts = torch.stack([a[p] for a in c.acts])  # [n_layers, d_mlp]
        t = int(targets[p])
        probs = c.logits[p].double().softmax(-1)
        nxt = torch.topk(probs, NEXT)
        total = sum(g["contribution"] for g in groups[p])
        logit = float(c.logits[p, t])
        best = top_neurons(contrib[p], acts, top)
        ranks = target_ranks(m, head, [(n[1], n[2], n[3]) for n in best], t)
        neurons = tuple(TraceNeuron(*n, rank) for n, rank in zip(best, ranks))
        active = tuple(active_neurons(acts, quantiles, top)) if where_mode == "all" else ()
        out.append(TracePosition(pos, strings[pos], tuple((tok.decode([int(i)]), float(q)) for q, i in zip(nxt.values, nxt.indices)),
                                 tok.decode([t]), t, logit, float(probs[t]), None if pre is None else pre[p],
                                 float(scale[p]), total, softcapped(head, total) - logit, tuple(groups[p]), neurons,
                                 tuple(lens_rows[p]), active))
    if atlas is not None:
        out = _labelled(atlas, out)
    abl = ablations(m, ids[:, :where[-1] + 1], head, out[-1], float(scale[-1]), ablate) if ablate else ()
    return Trace(text, m.source.spec, None if atlas is None else str(atlas.root), strings, head.softcap,
                 "unusual" if quantiles is not None else "abs", tuple(out), tuple(abl))


def _labelled(atlas, out: list[TracePosition]) -> list[TracePosition]:
    """The positions with atlas labels on their contributors and active neurons (one query for all)."""
    wanted = {(n.layer, n.index, "+" if n.activation >= 0 else "-") for p in out for n in p.neurons}
    wanted |= {(a["layer"], a["index"], "+" if a["activation"] >= 0 else "-") for p in out for a in p.active}
    labels = neuron_labels(atlas, sorted(wanted))
    return [replace(p, neurons=tuple(replace(n, label=labels.get(n.neuron)) for n in p.neurons),
                    active=tuple({**a, "label": labels.get(a["neuron"])} for a in p.active)) for p in out]


def ablations(m: Model, ids: torch.Tensor, head: Head, at: TracePosition, scale: float, n: int) -> list[Ablation]:
    """Zero each of ``at``'s top ``n`` contributors at its position (the last of ``ids``) and measure the logit change.

    Each costs two forward passes of ``ids`` (``[1, position + 1]``: later tokens cannot change it): free, and with the
    final norm's scale frozen at ``scale``, where a last-layer neuron's change equals ``-direct`` exactly.
    """
    t = at.target_id
    base = last_logit(m, ids, t, [])
    base_frozen = last_logit(m, ids, t, [], head, scale)
    out = []
    for nr in at.neurons[:n]:
        iv = [Intervention(nr.layer, nr.index, "set", 0.0)]
        out.append(Ablation(nr.neuron, nr.layer, nr.index, nr.contribution, last_logit(m, ids, t, iv) - base,
                            last_logit(m, ids, t, iv, head, scale) - base_frozen))
    return out
