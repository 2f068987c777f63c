"""An opened model (``Weights``) and the checks every tensor read goes through.

Whatever the format (safetensors checkpoint or GGUF), every tensor neuronmap
decodes (MLP vectors, LM head or embedding, its bias, the norms) is read
through ``Weights._checked``, which refuses, in one line naming the tensor and
its file:

- a tensor that is not floating point (``I8 I16 I32 I64 U8 BOOL``): it is not a weight;
- a tensor whose shape does not match the model's dimensions;
- a tensor holding NaN or inf: decoding it would give an atlas of NaNs.

The rule is to refuse, not to map and flag: a checkpoint with non-finite
weights is corrupt, and the fix is to re-export or re-download it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.families import Family

# Names of the non-float dtypes, as safetensors and GGUF both spell them.
INT_DTYPE_NAMES = {
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}
FLOATS_EXPECTED = "a float type (F32, F16, BF16, F64, or a quantized GGUF type)"


def dtype_error(name: str, where: Path | str, dtype: str) -> NeuronmapError:
    """The one line for a tensor whose dtype is no float weight type.

    Example:
        >>> str(dtype_error("lm_head.weight", "ck/model.safetensors", "I32"))[:60]
        'tensor lm_head.weight in ck/model.safetensors has dtype I32:'
    """
    return NeuronmapError(
        f"tensor {name} in {where} has dtype {dtype}: expected {FLOATS_EXPECTED}; "
        "the file is not a model of this family or is corrupt: re-export or re-download the checkpoint"
    )


def first_line(e: BaseException, n: int = 100) -> str:
    """An exception's message cut to one line of at most ``n`` characters, for a one-line error."""
    lines = str(e).splitlines()
    return lines[0][:n] if lines else type(e).__name__


def non_finite_count(t: torch.Tensor) -> int:
    """How many values of a float tensor are NaN or inf.

    A finite sum proves every value finite, and costs no copy; only when it is
    not (a NaN, an inf, or an overflow of large finite values) are values counted.

    Example:
        >>> non_finite_count(torch.tensor([1.0, float("nan"), float("inf")]))
        2
    """
    if t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float32))):
        return 0
    return int(t.numel() - torch.isfinite(t).sum())


def as_int(value, where: Path | str, key: str, fix: str, minimum: int = 1) -> int:
    """A count read from a config: a true integer of at least ``minimum``.

    Args:
        value: the value as read (None when the key is absent).
        where: the file, for the message.
        key: the field's name, for the message.
        fix: what the user should do.

    Raises:
        NeuronmapError: absent, not an integer (a string ``"24"``, ``2.5``, a bool), or below ``minimum``.

    Example:
        >>> as_int(24, "config.json", "num_hidden_layers", "fix it")
        24
    """
    if value is None:
        raise NeuronmapError(f"{where} has no {key}: expected an integer of at least {minimum}; {fix}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise NeuronmapError(f"{where} says {key} is {value!r}: expected an integer of at least {minimum}; {fix}")
    if value < minimum:
        raise NeuronmapError(f"{where} says {key} is {value}: expected at least {minimum}; {fix}")
    return int(value)


def as_number(value, where: Path | str, key: str, fix: str) -> float | None:
    """A non-negative finite number read from a config (an epsilon, a softcap), or None where absent.

    Raises:
        NeuronmapError: a string, a bool, a list, NaN, inf or a negative number.

    Example:
        >>> as_number(1e-5, "config.json", "rms_norm_eps", "fix it")
        1e-05
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise NeuronmapError(f"{where} says {key} is {value!r}: expected a finite number of at least 0; {fix}")
    return float(value)


def pad_tokens(strings: list[str], d_vocab: int) -> tuple[str, ...]:
    """Exactly ``d_vocab`` token strings: extra ones dropped, missing or empty ones shown as ``<id>``.

    Example:
        >>> pad_tokens(["a", ""], 3)
        ('a', '<1>', '<2>')
    """
    out = list(strings[:d_vocab]) + [""] * max(0, d_vocab - len(strings))
    return tuple(s if s != "" else f"<{i}>" for i, s in enumerate(out))


@dataclass(frozen=True)
class Source:
    """Where a model's weights are.

    Attributes:
        kind: ``checkpoint`` | ``gguf``.
        spec: what the user gave (path, hub id or packaged name).
        path: the checkpoint directory or the GGUF file.
        files: the weight files, for hashing.
    """

    kind: str
    spec: str
    path: Path
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Weights:
    """An opened model: its family, shape, head settings and a lazy tensor reader.

    Every tensor the accessors return is checked: floating point, of the shape the
    model's dimensions call for, and finite (see the module docstring).

    Attributes:
        source: where it came from.
        family: the adapter from families.py.
        n_layers, d_model, d_mlp, d_vocab: the model's dimensions.
        eps: the final norm's epsilon.
        softcap: the final-logit softcap, or None.
        tokens: every id's decoded string, ``len == d_vocab``.
        tokenizer: a short description of where ``tokens`` came from.
        read: name -> tensor in its stored dtype (fp32 for GGUF floats), in HF naming and ``nn.Linear`` layout.
        has: name -> whether the tensor exists.
        config: the checkpoint's config.json (for GGUF: its architecture).
        file_of: name -> the file holding the tensor, for messages (default: ``source.path``).
    """

    source: Source
    family: Family
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    eps: float
    softcap: float | None
    tokens: tuple[str, ...]
    tokenizer: str
    read: Callable[[str], torch.Tensor] = field(repr=False)
    has: Callable[[str], bool] = field(repr=False)
    config: dict = field(repr=False, default_factory=dict)
    file_of: Callable[[str], Path] | None = field(repr=False, default=None)
    letter: ClassVar[str] = "N"  # the id letter of what ``vectors`` gives (neuronmap.sources.sae: ``F``)

    def _checked(self, name: str, shape: tuple[int, ...], native: bool = False) -> torch.Tensor:
        """Read one tensor, refusing a non-float dtype, a wrong shape or a non-finite value.

        Raises:
            NeuronmapError: one line naming the tensor, its file, what it holds and the fix.
        """
        t = self.read(name)
        where = self.file_of(name) if self.file_of else self.source.path
        if not t.dtype.is_floating_point:
            raise dtype_error(name, where, INT_DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")))
        t = t if native else t.to(torch.float32)
        if tuple(t.shape) != shape:
            raise NeuronmapError(
                f"tensor {name} in {where} has shape {list(t.shape)}, expected {list(shape)} for this "
                f"{self.family.name} model (d_model={self.d_model}, d_mlp={self.d_mlp}, d_vocab={self.d_vocab}): "
                "the weights do not match the config; re-export the checkpoint"
            )
        bad = non_finite_count(t)
        if bad:
            raise NeuronmapError(
                f"tensor {name} in {where} has {bad} of {t.numel()} values non-finite (NaN or inf): "
                "decoding them would give NaN probabilities; the checkpoint is corrupt, re-export or re-download it"
            )
        return t

    def vectors(self, matrix: str, layer: int) -> torch.Tensor:
        """One vector per neuron of a layer's matrix, in residual-stream space.

        Returns:
            ``[d_mlp, d_model]`` fp32: rows of gate/up, columns of down.

        Raises:
            NeuronmapError: the tensor is missing, not float, of the wrong shape or not finite.

        Example:
            >>> open_weights(None).vectors("down", 3).shape  # doctest: +SKIP
            torch.Size([1536, 576])
        """
        fam = self.family
        if matrix == "down":
            return self._checked(fam.down.format(i=layer), (self.d_model, self.d_mlp)).T.contiguous()
        if fam.fused_gate_up:
            both = self._checked(fam.up.format(i=layer), (2 * self.d_mlp, self.d_model))
            return (both[: self.d_mlp] if matrix == "gate" else both[self.d_mlp:]).contiguous()
        name = (fam.gate if matrix == "gate" else fam.up).format(i=layer)
        return self._checked(name, (self.d_mlp, self.d_model))

    def head(self, native: bool = False) -> torch.Tensor:
        """The LM head, ``[d_vocab, d_model]`` (the embedding where tied).

        Args:
            native: keep the stored dtype (e.g. bf16, half the memory of fp32) instead of converting to fp32.
        """
        name = self.family.head if self.has(self.family.head) else self.family.embed
        return self._checked(name, (self.d_vocab, self.d_model), native)

    def head_bias(self) -> torch.Tensor | None:
        """The LM head's bias, ``[d_vocab]``, or None where the family or checkpoint has none."""
        b = self.family.head_bias
        return self._checked(b, (self.d_vocab,)) if b and self.has(b) else None

    def final_norm(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final norm's (weight, bias), as stored in HF convention (Gemma: w, not 1 + w)."""
        pre = self.family.final_norm
        w = self._checked(pre + ".weight", (self.d_model,))
        b = self._checked(pre + ".bias", (self.d_model,)) if self.has(pre + ".bias") else None
        return w, b

    def mlp_norm_gain(self, layer: int) -> torch.Tensor:
        """The gain the pre-MLP norm multiplies into what the neuron reads, ``[d_model]``."""
        w = self._checked(self.family.mlp_norm.format(i=layer), (self.d_model,))
        return 1.0 + w if self.family.norm == "rms_1p" else w
