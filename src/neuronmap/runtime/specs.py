"""The intervention grammar: ``L29N808=20x``, ``+=``, ``*=``, sweeps, and their checks against a model.

Spec syntax (``--neuron`` / ``--clamp``; several at once):
  ``L29N808=20``    set the activation to 20
  ``L29N808=20x``   set it to 20 times the neuron's natural range: the largest
                    |activation| it reaches on the bundled neutral reference text
  ``L29N808+=5x``   add 5 times its natural range
  ``L29N808*=3``    multiply it by 3 (a plain factor only)
  ``L29N808=-20x``  values may be negative; ``0`` ablates the neuron
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import neuron_id, parse_neuron_id
from neuronmap.runtime.models import Model

FLOAT32_MAX = 3.4028234663852886e38  # float(torch.finfo(torch.float32).max), without importing torch to parse a spec
MODES = ("set", "add", "scale")


# [0-9], not \d: a neuron id or value in other scripts' digits is refused, not read as the ASCII number (ids.py).
_SPEC = re.compile(r"^\s*(L[0-9]+N[0-9]+)\s*(?:([+*]?=)\s*(\S+?))?\s*$")


_VALUE = re.compile(r"^([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)(x?)$", re.IGNORECASE)


_OPS = {"=": "set", "+=": "add", "*=": "scale"}


SPEC_HELP = "expected L{layer}N{index}=VALUE (set), +=VALUE (add) or *=FACTOR (scale), VALUE a number or Nx, e.g. L29N808=20x"


@dataclass(frozen=True)
class Value:
    """A number, absolute or in units of the neuron's natural range (``20x``)."""

    amount: float
    relative: bool = False

    def __str__(self) -> str:
        return f"{self.amount:g}x" if self.relative else f"{self.amount:g}"

    def to_dict(self) -> dict:
        """JSON types only: ``{"amount": 20.0, "relative": true}``."""
        return {"amount": self.amount, "relative": self.relative}


@dataclass(frozen=True)
class Spec:
    """One parsed ``--neuron`` argument; ``value`` is None when a ``--sweep`` supplies it."""

    layer: int
    neuron: int
    mode: str
    value: Value | None

    @property
    def id(self) -> str:
        return neuron_id(self.layer, self.neuron)

    def __str__(self) -> str:
        op = {v: k for k, v in _OPS.items()}[self.mode]
        return self.id if self.value is None else f"{self.id}{op}{self.value}"


@dataclass(frozen=True)
class Intervention:
    """One neuron's rewrite with an absolute value: ``mode`` is ``set`` | ``add`` | ``scale``."""

    layer: int
    neuron: int
    mode: str
    value: float

    def to_dict(self) -> dict:
        """JSON types only: the neuron's id, layer, index, mode and absolute value."""
        return {"id": neuron_id(self.layer, self.neuron), "layer": self.layer, "neuron": self.neuron, "mode": self.mode,
                "value": self.value}


def parse_value(text: str, what: str = "value") -> Value:
    """Parse ``20``, ``-2.5`` or ``20x``.

    Raises:
        NeuronmapError: not a number with an optional ``x``.

    Example:
        >>> parse_value("20x")
        Value(amount=20.0, relative=True)
    """
    m = _VALUE.match(text.strip())
    if not m or not math.isfinite(float(m.group(1))):
        raise NeuronmapError(f"malformed {what} {text!r}: expected a number, or Nx for N times the neuron's natural range, e.g. 20x")
    return Value(float(m.group(1)), bool(m.group(2)))


def parse_spec(text: str, n_layers: int | None = None, d_mlp: int | None = None) -> Spec:
    """Parse one neuron spec, checking the neuron's range when the shape is given.

    Raises:
        NeuronmapError: malformed, out of range, or a relative factor for ``*=``.

    Example:
        >>> parse_spec("L29N808*=3")
        Spec(layer=29, neuron=808, mode='scale', value=Value(amount=3.0, relative=False))
    """
    m = _SPEC.match(text)
    if not m:
        raise NeuronmapError(f"malformed neuron spec {text!r}: {SPEC_HELP}")
    layer, neuron = parse_neuron_id(m.group(1), n_layers, d_mlp)
    if m.group(2) is None:
        return Spec(layer, neuron, "set", None)
    mode = _OPS[m.group(2)]
    try:
        value = parse_value(m.group(3))
    except NeuronmapError as e:
        raise NeuronmapError(f"malformed neuron spec {text!r}: {SPEC_HELP}") from e
    if mode == "scale" and value.relative:
        raise NeuronmapError(f"neuron spec {text!r}: *= takes a plain factor, e.g. {m.group(1)}*=3")
    return Spec(layer, neuron, mode, value)


def parse_sweep(text: str) -> list[Value]:
    """Parse ``0,5x,10x,20x,50x``.

    Raises:
        NeuronmapError: an item is malformed or the list is empty.
    """
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise NeuronmapError(f"empty sweep={text!r}: expected values such as 0,5x,10x,20x,50x")
    return [parse_value(t, "sweep=... value") for t in items]


def check_specs(specs: list[Spec], m: Model) -> None:
    """Check every spec against the loaded model's shape.

    Raises:
        NeuronmapError: a neuron out of range.
    """
    for s in specs:
        parse_neuron_id(s.id, m.n_layers, m.d_mlp)


def check_amount(s: Spec, v: Value, amount: float) -> None:
    if not math.isfinite(amount) or abs(amount) > FLOAT32_MAX:
        raise NeuronmapError(f"neuron spec {s.id}: {v} comes to {amount:g}, which the model's float32 activations cannot "
                             f"hold (at most {FLOAT32_MAX:.3g}); choose a smaller value, e.g. {s.id}=20x")


def check_values(specs: list[Spec], sweep: str | None) -> None:
    """Check, before any model loads, that every spec has a value or a sweep supplies one, and absolute values fit.

    A relative value (``20x``) is checked once the natural range is known (``resolve``).

    Raises:
        NeuronmapError: a spec without a value and no sweep, or an absolute value beyond float32.

    Example:
        >>> check_values([parse_spec("L29N808=20x")], None)
    """
    for s in specs:
        if s.value is None and not sweep:
            raise NeuronmapError(f"neuron spec {s.id!r} has no value: give one (e.g. {s.id}=20x) or a sweep=...")
        for v in [s.value] if s.value is not None else parse_sweep(sweep):
            if not v.relative and s.mode != "scale":
                check_amount(s, v, v.amount)
