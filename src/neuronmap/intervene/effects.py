"""What an intervention does: a concept's next-token probability, collateral KL, and generations.

``clamp`` measures, on neutral prompts, the probability that the next token is
one of a concept's single-token variants (`` dog``, ``dog``, `` Dog``, `` dogs``
..., neuronmap.atlas.concepts), without and with the intervention, and the KL
divergence ``KL(P_clamped || P_baseline)`` of the next-token distributions over
the bundled reference text (nats per token): how much else the intervention
changes. ``generate`` (neuronmap.intervene.generate) samples answers side by side. neuronmap.intervene.verify runs the
clamp sweep on an atlas's candidates for a concept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from neuronmap.atlas.concepts import Concept, expand_concept, tokenizer_strings, variant_strings, vocab_index
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import neuron_id
from neuronmap.runtime.hooks import POSITIONS_DEFAULT, bundled_prompts, bundled_text, check_positions, encode, intervene, resolve
from neuronmap.runtime.specs import Intervention, Spec, Value, parse_sweep
from neuronmap.runtime.models import Model, require_tokenizer

DEFAULT_SWEEP = "0,5x,10x,20x,50x"  # the example in clamp's --sweep help


def finite(x: float) -> float | None:
    """``x``, or None where it is inf or nan (JSON has neither)."""
    return float(x) if math.isfinite(x) else None


# ------------------------------------------------------------------ concepts


def concept_tokens(m: Model, word: str) -> Concept:
    """A concept's single-token variants in ``m``'s tokenizer (neuronmap.atlas.concepts' model, the atlas's strings).

    Raises:
        NeuronmapError: no tokenizer, an empty word, or one that starts with no content token.

    Example:
        >>> concept_tokens(m, "dog").tokens  # doctest: +SKIP
        (' dog', 'dog', ' dogs', 'dogs', ' Dog', 'Dog', ' Dogs', 'Dogs')
    """
    return expand_concept(word, vocab_index(tokenizer_strings(require_tokenizer(m))))


def check_word(word: str) -> None:
    if not word.strip():
        raise NeuronmapError(f"empty word={word!r}: give a word, e.g. word=dog")


def mentions(text: str, word: str) -> bool:
    """Whether ``text`` contains the concept as a whole word (any case, singular or plural)."""
    forms = sorted({f.strip().lower() for f in variant_strings(word)}, key=len, reverse=True)
    return re.search(r"\b(" + "|".join(map(re.escape, forms)) + r")\b", text, re.IGNORECASE) is not None


# ------------------------------------------------------------------ distributions


def next_token_logprobs(m: Model, prompts: list[str], interventions: list[Intervention] = (),
                        positions: str = POSITIONS_DEFAULT, batch: int = 32) -> torch.Tensor:
    """Log-probabilities of the token after each prompt, ``[n_prompts, d_vocab]`` fp32 on CPU.

    Prompts run in right-padded batches: with causal attention the padding after
    a prompt never changes it, and its last real token is read.
    """
    out = []
    encoded = [encode(m, p)[0] for p in prompts]
    for i in range(0, len(encoded), batch):
        chunk = encoded[i:i + batch]
        seq = max(len(e) for e in chunk)
        ids = torch.zeros(len(chunk), seq, dtype=torch.long, device=m.device)  # [b, seq]
        mask = torch.zeros_like(ids)
        for j, e in enumerate(chunk):
            ids[j, :len(e)], mask[j, :len(e)] = e, 1
        last = mask.sum(-1) - 1  # [b]
        with torch.no_grad(), intervene(m, list(interventions), positions):
            logits = finite_logits(m.model(input_ids=ids, attention_mask=mask).logits, interventions)  # [b, seq, d_vocab]
        out.append(logits[torch.arange(len(chunk)), last].float().log_softmax(-1).cpu())
    return torch.cat(out)


def reference_logprobs(m: Model, interventions: list[Intervention] = (), positions: str = POSITIONS_DEFAULT) -> torch.Tensor:
    """Next-token log-probabilities at every position of the reference text, ``[seq, d_vocab]`` fp32 on CPU."""
    ids = encode(m, bundled_text("reference.txt"))
    with torch.no_grad(), intervene(m, list(interventions), positions):
        logits = finite_logits(m.model(ids).logits[0], interventions)  # [seq, d_vocab]
    return logits.float().log_softmax(-1).cpu()


def finite_logits(logits: torch.Tensor, interventions: list[Intervention]) -> torch.Tensor:
    """``logits`` unchanged, once checked finite: a clamp value can overflow float32 inside the model.

    Raises:
        NeuronmapError: a logit is inf or NaN, naming the interventions that caused it.
    """
    if not bool(torch.isfinite(logits).all()):
        setting = ", ".join(f"{neuron_id(iv.layer, iv.neuron)}={iv.value:g}" for iv in interventions) or "no intervention"
        raise NeuronmapError(f"the model's logits are not finite with {setting}: the value overflows inside the model; "
                             "choose a smaller one, e.g. 20x")
    return logits


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` of each row in nats, from log-probabilities ``[n, d_vocab]`` -> ``[n]``."""
    return (logp.exp() * (logp - logq)).sum(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Mean over rows of ``KL(p || q)`` in nats, from log-probabilities ``[n, d_vocab]``."""
    return float(kl_rows(logp, logq).mean())


# ------------------------------------------------------------------ clamp


@dataclass(frozen=True)
class Outcome:
    """One setting's effect (the baseline too).

    Attributes:
        label: ``baseline`` or the specs, e.g. ``L29N808=20x``.
        value: the sweep value applied to every spec (signed, as set), or None for the
            baseline and for specs that carry their own values.
        interventions: the absolute rewrites.
        probs: the concept's next-token probability on each prompt.
        top: the most likely next token on each prompt.
        kl: ``KL(P_clamped || P_baseline)`` over the reference text, nats per token.
        ratio: mean probability over the baseline's mean.
        raised: prompts on which the probability rose.
    """

    label: str
    value: Value | None
    interventions: tuple[Intervention, ...]
    probs: tuple[float, ...]
    top: tuple[str, ...]
    kl: float
    ratio: float
    raised: int

    @property
    def mean(self) -> float:
        return sum(self.probs) / len(self.probs)

    def to_dict(self) -> dict:
        """JSON types only; ``probs`` and ``top`` follow the report's prompts; an infinite ratio is None."""
        return {"label": self.label, "value": None if self.value is None else self.value.to_dict(),
                "interventions": [iv.to_dict() for iv in self.interventions], "mean_prob": self.mean,
                "ratio": finite(self.ratio), "raised": self.raised, "kl": finite(self.kl), "probs": list(self.probs),
                "top": list(self.top)}


@dataclass(frozen=True)
class ClampReport:
    """Baseline and clamped next-token probabilities of a concept on a set of prompts.

    Attributes:
        source: the model's source spec.
        concept: its variants in the model's vocabulary (``approximate`` when none is a single token).
        outcomes: one per setting (per sweep value, or one for the specs' own values).
    """

    source: str
    concept: Concept
    prompts: tuple[str, ...]
    positions: str
    baseline: Outcome
    outcomes: tuple[Outcome, ...]

    def to_dict(self) -> dict:
        """JSON types only: the form ``clamp --json`` prints."""
        return {"source": self.source, "concept": self.concept.to_dict(), "positions": self.positions,
                "prompts": list(self.prompts), "baseline": self.baseline.to_dict(),
                "settings": [o.to_dict() for o in self.outcomes]}


class Baseline:
    """The unclamped distributions, computed once and shared by every setting."""

    def __init__(self, m: Model, concept: Concept, prompts: list[str]):
        self.m, self.concept, self.prompts = m, concept, prompts
        self.next = next_token_logprobs(m, prompts)  # [n_prompts, d_vocab]
        self.ref = reference_logprobs(m)  # [seq, d_vocab]
        self.outcome = self._outcome("baseline", None, [], self.next, 0.0, None)

    def _outcome(self, label, value, ivs, logp, kl_value, base: Outcome | None) -> Outcome:
        tok = self.m.tokenizer
        probs = tuple(float(x) for x in logp[:, list(self.concept.token_ids)].exp().sum(-1))
        top = tuple(tok.decode([int(i)]) for i in logp.argmax(-1))
        if base is None:
            return Outcome(label, value, tuple(ivs), probs, top, kl_value, 1.0, 0)
        mean = sum(probs) / len(probs)
        ratio = mean / base.mean if base.mean > 0 else float("inf")
        raised = sum(p > b for p, b in zip(probs, base.probs))
        return Outcome(label, value, tuple(ivs), probs, top, kl_value, ratio, raised)

    def measure(self, specs: list[Spec], value: Value | None, ivs: list[Intervention], positions: str) -> Outcome:
        """The outcome of ``ivs``: ``specs`` resolved with ``value`` (a sweep point) or their own values (None)."""
        logp = next_token_logprobs(self.m, self.prompts, ivs, positions)
        ref = reference_logprobs(self.m, ivs, positions)
        return self._outcome(setting_label(specs, value), value, ivs, logp, kl(ref, self.ref), self.outcome)


def setting_label(specs: list[Spec], value: Value | None) -> str:
    """The specs as typed, each with ``value`` where given: ``L29N808=20x L3N7=20x``."""
    return " ".join(str(s) if value is None else str(Spec(s.layer, s.neuron, s.mode, value)) for s in specs)


def clamp(m: Model, specs: list[Spec], word: str, prompts: list[str] | None = None, sweep: str | None = None,
          positions: str = POSITIONS_DEFAULT) -> ClampReport:
    """Measure how intervening on neurons changes a concept's next-token probability.

    Args:
        m: the loaded model.
        specs: the neurons and (without ``sweep``) their values; all act together.
        word: the concept, e.g. ``dog``.
        prompts: prompts to measure on (default: the bundled neutral ones).
        sweep: comma list of values, e.g. ``0,5x,10x,20x,50x``: one setting per value,
            applied to every spec with its own mode.
        positions: one of ``intervene.POSITIONS``.

    Returns:
        ClampReport: the baseline and one outcome per setting.

    Raises:
        NeuronmapError: a bad spec or sweep, a neuron out of range, a concept not in the vocabulary.

    Example:
        >>> r = clamp(m, [parse_spec("L29N808=20x")], "dog")  # doctest: +SKIP
        >>> r.outcomes[0].ratio > 1  # doctest: +SKIP
        True
    """
    check_positions(positions)
    values: list[Value | None] = parse_sweep(sweep) if sweep else [None]
    settings = [(v, resolve(specs, m, v)) for v in values]
    concept = concept_tokens(m, word)
    base = Baseline(m, concept, neutral_prompts(prompts))
    outcomes = tuple(base.measure(specs, v, ivs, positions) for v, ivs in settings)
    return ClampReport(m.source.spec, concept, tuple(base.prompts), positions, base.outcome, outcomes)


def neutral_prompts(prompts: list[str] | None) -> list[str]:
    """``prompts``, or the bundled neutral ones where None.

    Raises:
        NeuronmapError: an empty list.
    """
    out = list(prompts) if prompts is not None else bundled_prompts()
    if not out:
        raise NeuronmapError("no prompts: the prompts file has no non-empty lines")
    return out


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompts file.

    Raises:
        NeuronmapError: missing or unreadable, or no non-empty line.
    """
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise NeuronmapError(f"cannot read prompts_file={path} ({type(e).__name__}): pass a UTF-8 text file, one prompt per line") from e
    if not lines:
        raise NeuronmapError(f"prompts_file={path} has no non-empty lines: put one prompt per line")
    return lines


# ------------------------------------------------------------------ generate


