"""``generate``: sample answers with and without an intervention, side by side, and how often each mentions a concept."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.hooks import POSITIONS_DEFAULT, check_positions, encode, intervene, resolve
from neuronmap.runtime.specs import Intervention, Spec
from neuronmap.runtime.models import Model, require_tokenizer
from neuronmap.intervene.effects import check_word, finite_logits, mentions, setting_label

N_SAMPLES = 10


TEMPERATURE = 0.7


SEED = 0


MAX_NEW_TOKENS = 24


def chat_input(m: Model, text: str, chat: bool = True) -> tuple[torch.Tensor, str | None]:
    """Token ids ``[1, seq]`` for a user message: the chat template if the tokenizer has one, else the plain text.

    Returns:
        (ids, notice): ``notice`` is a one-line message when a chat was asked for and
        the model has no template, else None.
    """
    tok = require_tokenizer(m)
    if chat and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        return enc["input_ids"].to(m.device), None
    notice = None
    if chat:
        notice = f"{m.source.spec} has no chat template: the message is used as plain text"
    return encode(m, text), notice


def sample(m: Model, ids: torch.Tensor, interventions: list[Intervention] = (), positions: str = POSITIONS_DEFAULT,
           n: int = N_SAMPLES, temperature: float = TEMPERATURE, seed: int = SEED, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """``n`` continuations of ``ids`` ``[1, seq]`` with the interventions in place, decoded without special tokens.

    The same seed gives baseline and clamped runs the same random numbers.
    """
    tok = require_tokenizer(m)
    torch.manual_seed(seed)
    if m.device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    batch = ids.repeat(n, 1)  # [n, seq]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad(), intervene(m, list(interventions), positions):
        out = m.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
                               pad_token_id=pad, **sampling)
    return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


@dataclass(frozen=True)
class Share:
    """Fraction of samples that mention a concept (whole word, any case, singular or plural)."""

    concept: str
    baseline: float
    clamped: float

    def to_dict(self) -> dict:
        """JSON types only."""
        return asdict(self)


@dataclass(frozen=True)
class GenerateReport:
    """Baseline and clamped samples for one message.

    Attributes:
        source: the model's source spec.
        chat: a chat was asked for (the message wrapped in the chat template, where the model has one).
        label: the specs applied.
        notice: set when a chat was asked for and the model has no chat template.
        shares: one per ``concepts`` given.
    """

    source: str
    text: str
    chat: bool
    label: str
    notice: str | None
    seed: int
    temperature: float
    max_new_tokens: int
    baseline: tuple[str, ...]
    clamped: tuple[str, ...]
    interventions: tuple[Intervention, ...]
    shares: tuple[Share, ...] = ()

    def to_dict(self) -> dict:
        """JSON types only: the form ``generate --json`` prints."""
        return {"source": self.source, "text": self.text, "chat": self.chat,
                "chat_template": self.chat and self.notice is None, "notice": self.notice, "clamp": self.label,
                "interventions": [iv.to_dict() for iv in self.interventions], "seed": self.seed,
                "temperature": self.temperature, "max_new_tokens": self.max_new_tokens, "baseline": list(self.baseline),
                "clamped": list(self.clamped), "shares": [x.to_dict() for x in self.shares]}


def generate(m: Model, text: str, specs: list[Spec], n: int = N_SAMPLES, temperature: float = TEMPERATURE,
             seed: int = SEED, max_new_tokens: int = MAX_NEW_TOKENS, concepts: list[str] = (),
             positions: str = POSITIONS_DEFAULT, chat: bool = True) -> GenerateReport:
    """Sample answers to ``text`` without and with the interventions, with the same seed.

    Args:
        concepts: words whose share of mentions is reported, e.g. ``["dog", "cat"]``.
        chat: wrap ``text`` in the chat template (plain text with a notice where there is none).

    Raises:
        NeuronmapError: bad specs, no tokenizer, ``n`` or ``max_new_tokens`` below 1, negative temperature.

    Example:
        >>> r = generate(m, "What is your favourite animal?", [parse_spec("L29N808=10x")], concepts=["dog"])  # doctest: +SKIP
        >>> r.shares[0].clamped > r.shares[0].baseline  # doctest: +SKIP
        True
    """
    check_positions(positions)
    if n < 1 or max_new_tokens < 1:
        raise NeuronmapError(f"n={n} and max_new_tokens={max_new_tokens} must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise NeuronmapError(f"temperature={temperature} is not a number >= 0: use 0 (greedy) or more, e.g. 0.7")
    for c in concepts:
        check_word(c)
    ivs = resolve(specs, m)
    ids, notice = chat_input(m, text, chat)
    with torch.no_grad(), intervene(m, ivs, positions):
        finite_logits(m.model(ids).logits, ivs)  # an overflow fails here in one line, not inside sampling
    base = sample(m, ids, [], positions, n, temperature, seed, max_new_tokens)
    clamped = sample(m, ids, ivs, positions, n, temperature, seed, max_new_tokens)

    def share(xs: list[str], c: str) -> float:
        return sum(mentions(x, c) for x in xs) / len(xs)

    shares = tuple(Share(c.strip(), share(base, c), share(clamped, c)) for c in concepts)
    return GenerateReport(m.source.spec, text, chat, setting_label(specs, None), notice, seed, temperature, max_new_tokens,
                          tuple(base), tuple(clamped), tuple(ivs), shares)
