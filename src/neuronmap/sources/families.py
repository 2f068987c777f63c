"""All model-family knowledge, in one table of adapters.

Adding a family is one entry in ``FAMILIES`` plus a tiny-checkpoint test in
tests/test_families.py. Nothing else in neuronmap branches on a family name.

Tensor names are templates over the layer index ``{i}``. Every reader returns
matrices in ``nn.Linear`` layout, ``[out_features, in_features]``:
``gate``/``up`` are ``[d_mlp, d_model]`` and ``down`` is ``[d_model, d_mlp]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neuronmap.core.errors import NeuronmapError

# The norm kinds neuronmap can reproduce exactly, as the model computes them.
#   rms:    x / sqrt(mean(x^2) + eps) * w
#   rms_1p: x / sqrt(mean(x^2) + eps) * (1 + w)   (Gemma stores w - 1)
#   layer:  (x - mean) / sqrt(var + eps) * w + b
NORM_KINDS = ("rms", "rms_1p", "layer")


@dataclass(frozen=True)
class Family:
    """How one model family lays out its MLP, final norm and LM head.

    Attributes:
        name: our name for the family (``llama``, ``gpt2`` ...).
        model_types: ``config.json`` ``model_type`` values that use it.
        gguf_archs: ``general.architecture`` values of GGUF files that use it.
        gate, up, down: Hugging Face tensor-name templates (``gate`` is None
            for non-gated MLPs).
        fused_gate_up: ``up`` holds ``[gate; up]`` stacked on dim 0 (Phi-3).
        conv1d: the HF checkpoint stores MLP weights transposed (GPT-2's Conv1D).
        mlp_norm: the pre-MLP norm's gain, per layer (``--fold-input-norm``).
        final_norm: the final norm's prefix; ``.weight`` and ``.bias`` follow.
        norm: one of ``NORM_KINDS``.
        head: untied LM-head weight; ``embed`` is used where it is absent (tied).
        head_bias: LM-head bias, if the family has one.
        layers_keys: config keys holding the number of layers, first found wins.
        eps_keys: config keys holding the final norm's epsilon, first found wins.
        default_eps: epsilon when no key is present (OPT hard-codes 1e-5).
        softcap_key: config key of the final-logit softcap, if the family has one.
        block: the decoder layer's module (``model.named_modules()`` name template): TransformerLens's
            ``hook_resid_pre`` is its input, ``hook_resid_post`` its output.
        mlp_module: the MLP's module; ``mlp_out``: the module whose output TransformerLens calls ``hook_mlp_out``
            (Gemma 2/3 normalise the MLP's output before adding it; None: the MLP itself).
        mlp_out_norm: a norm of the MLP's output before it joins the residual stream (Gemma 2 and 3's
            ``post_feedforward_layernorm``), of kind ``norm``; None where the MLP writes its output as is.
    """

    name: str
    model_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    gate: str | None
    up: str
    down: str
    mlp_norm: str
    final_norm: str
    norm: str
    head: str
    embed: str
    layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    eps_keys: tuple[str, ...] = ("rms_norm_eps",)
    default_eps: float = 1e-5
    softcap_key: str | None = None
    fused_gate_up: bool = False
    conv1d: bool = False
    head_bias: str | None = None
    block: str = "model.layers.{i}"
    mlp_module: str = "model.layers.{i}.mlp"
    mlp_out: str | None = None
    mlp_out_norm: str | None = None

    def __post_init__(self):
        # A table entry with a norm the decoder cannot reproduce would decode silently wrong: refuse it at import.
        if self.norm not in NORM_KINDS:
            raise ValueError(f"family {self.name!r}: norm {self.norm!r} is not one of {', '.join(NORM_KINDS)}")

    @property
    def matrices(self) -> tuple[str, ...]:
        """The matrix names this family has, in map order."""
        return ("gate", "up", "down") if self.gated else ("up", "down")

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up

    def vector_slot(self, matrix: str, layer: int, neuron: int, d_mlp: int) -> tuple[str, int, int]:
        """Where one neuron's vector lies in the stored tensor (HF layout, as saved and as the module holds it).

        Returns:
            ``(tensor name, axis, index)``: axis 0 is a row, axis 1 a column of the 2-D tensor.

        Example:
            >>> family_for_model_type("llama").vector_slot("down", 3, 7, 24)
            ('model.layers.3.mlp.down_proj.weight', 1, 7)
        """
        if matrix == "down":
            # nn.Linear stores [d_model, d_mlp] (a column per neuron); Conv1D stores [d_mlp, d_model].
            return self.down.format(i=layer), 0 if self.conv1d else 1, neuron
        if self.fused_gate_up:
            return self.up.format(i=layer), 0, neuron + (d_mlp if matrix == "up" else 0)
        name = (self.gate if matrix == "gate" else self.up).format(i=layer)
        return name, 1 if self.conv1d else 0, neuron


    def hook_point(self, hook: str, n_layers: int) -> "HookPoint":
        """Where a TransformerLens hook name (``blocks.12.hook_resid_post``) lies in this family's modules.

        Raises:
            NeuronmapError: a name outside ``HOOKS``, or a block outside ``0..n_layers-1``.

        Example:
            >>> family_for_model_type("llama").hook_point("blocks.3.hook_mlp_out", 30)
            HookPoint(hook='blocks.3.hook_mlp_out', layer=3, module='model.layers.3.mlp', side='output')
        """
        m = _TL_HOOK.fullmatch(hook.strip()) if isinstance(hook, str) else None
        if m is None or m.group(2) not in HOOKS:
            raise NeuronmapError(f"unknown hook {hook!r}: expected blocks.{{layer}}.{{point}} with point one of "
                                 f"{', '.join(HOOKS)} (TransformerLens names), e.g. blocks.12.hook_resid_post")
        layer, (role, side) = int(m.group(1)), HOOKS[m.group(2)]
        if layer >= n_layers:
            raise NeuronmapError(f"hook {hook}: block {layer} is out of range, this {self.name} model has blocks "
                                 f"0-{n_layers - 1}")
        template = {"block": self.block, "mlp": self.mlp_module, "mlp_out": self.mlp_out or self.mlp_module,
                    "ln2": self.mlp_norm.removesuffix(".weight")}[role]
        return HookPoint(hook.strip(), layer, template.format(i=layer), side)


@dataclass(frozen=True)
class HookPoint:
    """A TransformerLens hook as a module of the Hugging Face model.

    Attributes:
        hook: the TransformerLens name; layer: its block.
        module: the ``model.named_modules()`` name; side: ``input`` or ``output`` of that module. Every hook in
            ``HOOKS`` holds a ``d_model`` vector per token.
    """

    hook: str
    layer: int
    module: str
    side: str


# TransformerLens hook point -> (the family's module role, which side of it). ``ln2.hook_normalized`` is the pre-MLP
# norm's output with its gain: TransformerLens folds that gain into the MLP (fold_ln), so an SAE trained there saw
# the activation divided by the gain; docs/features.md says so.
HOOKS = {
    "hook_resid_pre": ("block", "input"),
    "hook_resid_post": ("block", "output"),
    "hook_mlp_out": ("mlp_out", "output"),
    "ln2.hook_normalized": ("ln2", "output"),
    "hook_mlp_in": ("mlp", "input"),
}
_TL_HOOK = re.compile(r"blocks\.([0-9]{1,6})\.(.+)")


def _llama_like(name: str, model_types: tuple[str, ...], gguf_archs: tuple[str, ...], **kw) -> Family:
    base = dict(
        gate="model.layers.{i}.mlp.gate_proj.weight",
        up="model.layers.{i}.mlp.up_proj.weight",
        down="model.layers.{i}.mlp.down_proj.weight",
        mlp_norm="model.layers.{i}.post_attention_layernorm.weight",
        final_norm="model.norm",
        norm="rms",
        head="lm_head.weight",
        embed="model.embed_tokens.weight",
    )
    base.update(kw)
    return Family(name=name, model_types=model_types, gguf_archs=gguf_archs, **base)


FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", ("llama", "mistral"), ("llama", "mistral")),
    _llama_like("qwen2", ("qwen2",), ("qwen2",)),
    _llama_like("qwen3", ("qwen3",), ("qwen3",)),
    _llama_like("gemma", ("gemma",), ("gemma",), norm="rms_1p"),
    _llama_like(
        "gemma2", ("gemma2",), ("gemma2",), norm="rms_1p",
        mlp_norm="model.layers.{i}.pre_feedforward_layernorm.weight",
        softcap_key="final_logit_softcapping", mlp_out="model.layers.{i}.post_feedforward_layernorm",
        mlp_out_norm="model.layers.{i}.post_feedforward_layernorm",
    ),
    _llama_like(
        "gemma3", ("gemma3_text", "gemma3"), ("gemma3",), norm="rms_1p",
        mlp_norm="model.layers.{i}.pre_feedforward_layernorm.weight",
        softcap_key="final_logit_softcapping", mlp_out="model.layers.{i}.post_feedforward_layernorm",
        mlp_out_norm="model.layers.{i}.post_feedforward_layernorm",
    ),
    _llama_like(
        "phi3", ("phi3",), ("phi3",), gate=None, fused_gate_up=True,
        up="model.layers.{i}.mlp.gate_up_proj.weight",
    ),
    Family(
        name="gpt2", model_types=("gpt2",), gguf_archs=("gpt2",),
        gate=None, up="transformer.h.{i}.mlp.c_fc.weight", down="transformer.h.{i}.mlp.c_proj.weight",
        mlp_norm="transformer.h.{i}.ln_2.weight", final_norm="transformer.ln_f", norm="layer",
        head="lm_head.weight", embed="transformer.wte.weight",
        layers_keys=("n_layer", "num_hidden_layers"), eps_keys=("layer_norm_epsilon",), conv1d=True,
        block="transformer.h.{i}", mlp_module="transformer.h.{i}.mlp",
    ),
    Family(
        name="gpt_neox", model_types=("gpt_neox",), gguf_archs=("gptneox",),
        gate=None, up="gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight",
        down="gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
        mlp_norm="gpt_neox.layers.{i}.post_attention_layernorm.weight",
        final_norm="gpt_neox.final_layer_norm", norm="layer",
        head="embed_out.weight", embed="gpt_neox.embed_in.weight", eps_keys=("layer_norm_eps",),
        block="gpt_neox.layers.{i}", mlp_module="gpt_neox.layers.{i}.mlp",
    ),
    Family(
        name="opt", model_types=("opt",), gguf_archs=(),
        gate=None, up="model.decoder.layers.{i}.fc1.weight", down="model.decoder.layers.{i}.fc2.weight",
        mlp_norm="model.decoder.layers.{i}.final_layer_norm.weight",
        final_norm="model.decoder.final_layer_norm", norm="layer",
        head="lm_head.weight", embed="model.decoder.embed_tokens.weight", eps_keys=(),
        # OPT has no MLP module: fc1 and fc2 sit in the layer, and fc2's output is what the MLP adds.
        block="model.decoder.layers.{i}", mlp_module="model.decoder.layers.{i}.fc1",
        mlp_out="model.decoder.layers.{i}.fc2",
    ),
)

# llama.cpp's tensor names are shared by every architecture it converts.
GGUF_NAMES = {
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "final_norm": "output_norm",
    "head": "output.weight",
    "embed": "token_embd.weight",
}


def known_names() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_for_model_type(model_type: str | None) -> Family:
    """The adapter for a ``config.json`` ``model_type``.

    Raises:
        NeuronmapError: the family is unknown; the message lists the known ones.

    Example:
        >>> family_for_model_type("mistral").name
        'llama'
    """
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise NeuronmapError(
        f"unknown model family {model_type!r} (config.json model_type); "
        f"known families: {known_names()}. Add an entry to neuronmap/sources/families.py to support it."
    )


def family_for_gguf_arch(arch: str | None) -> Family:
    """The adapter for a GGUF ``general.architecture``.

    Raises:
        NeuronmapError: the architecture is unknown; the message lists the known ones.
    """
    for fam in FAMILIES:
        if arch in fam.gguf_archs:
            return fam
    raise NeuronmapError(
        f"unknown model family {arch!r} (GGUF general.architecture); "
        f"known families: {known_names()}. Add an entry to neuronmap/sources/families.py to support it."
    )
