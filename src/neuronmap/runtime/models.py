"""Load a causal LM with transformers from a neuronmap source, and find its MLP modules.

Sources are the same as ``map``'s (a checkpoint directory, a ``.gguf`` file, a
hub id in the local cache, a packaged model name). The module that holds a
neuron's activation is named by the family adapter's ``down`` tensor template:
the tensor ``model.layers.{i}.mlp.down_proj.weight`` belongs to the module
``model.layers.{i}.mlp.down_proj``, whose input is ``[..., d_mlp]``, one column
per neuron. ``find_module`` is the one place that turns a tensor name into a
module of the loaded model.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import torch

from neuronmap.decode.engine import resolve_device
from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.families import Family, family_for_model_type
from neuronmap.sources.resolve import resolve_source
from neuronmap.sources.weights import Source

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# One meaning across commands: --device auto is cuda where torch has one, else cpu; --dtype auto is the exact
# precision at the best speed here (a model runs in float32; map decodes in split or float32).
DEVICE = "auto"
DTYPE = "auto"


@dataclass(frozen=True)
class Model:
    """A loaded transformers causal LM with what interventions need.

    Attributes:
        model: the ``PreTrainedModel``, in eval mode.
        tokenizer: its tokenizer, or None where the source has none.
        family: the adapter from families.py.
        source: where it came from.
        n_layers, d_mlp: layers, and neurons per layer.
        device, dtype: where and in what precision it runs.
        downs: each layer's down projection (``fc2``, ``c_proj`` ...), by layer.
    """

    model: torch.nn.Module = field(repr=False)
    tokenizer: object | None = field(repr=False)
    family: Family
    source: Source
    n_layers: int
    d_mlp: int
    device: torch.device
    dtype: torch.dtype
    downs: tuple[torch.nn.Module, ...] = field(repr=False)

    def down_column(self, layer: int, neuron: int) -> torch.Tensor:
        """What one unit of the neuron's activation adds to the residual stream, ``[d_model]`` fp32."""
        w = self.downs[layer].weight
        # GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in].
        return (w[neuron] if self.family.conv1d else w[:, neuron]).detach().float()


def module_name(template: str, layer: int | None = None) -> str:
    """The module that owns a tensor: ``model.layers.{i}.mlp.down_proj.weight`` -> ``model.layers.3.mlp.down_proj``.

    Example:
        >>> module_name("model.layers.{i}.mlp.down_proj.weight", 3)
        'model.layers.3.mlp.down_proj'
    """
    name = template.format(i=layer) if layer is not None else template
    return name.removesuffix(".weight").removesuffix(".bias")


def find_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule ``name`` (a tensor or module name from families.py) of a loaded model.

    Causal-LM wrappers nest the decoder under different prefixes (``model.`` in
    ``LlamaForCausalLM``, ``model.language_model.`` in multimodal Gemma 3), so a
    name that is not found as is is matched by its suffix after the first part.

    Raises:
        NeuronmapError: no module, or several, match.
    """
    name = module_name(name)
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    tail = name.split(".", 1)[-1]
    hits = [m for n, m in model.named_modules() if n == tail or n.endswith("." + tail)]
    if len(hits) != 1:
        raise NeuronmapError(
            f"the loaded {type(model).__name__} has {'no' if not hits else len(hits)} module(s) named like {name!r}: "
            "its layout does not match the family adapter; fix the entry in neuronmap/sources/families.py"
        )
    return hits[0]


def _d_mlp(module: torch.nn.Module, family: Family) -> int:
    w = module.weight
    return int(w.shape[0] if family.conv1d else w.shape[1])


def wrap_model(model: torch.nn.Module, tokenizer: object | None, source: Source) -> Model:
    """A ``Model`` around an already loaded transformers causal LM.

    Raises:
        NeuronmapError: an unknown family, or modules that do not match its adapter.
    """
    family = family_for_model_type(model.config.model_type)
    n_layers = int(model.config.get_text_config().num_hidden_layers)
    downs = tuple(find_module(model, module_name(family.down, i)) for i in range(n_layers))
    p = next(model.parameters())
    return Model(model, tokenizer, family, source, n_layers, _d_mlp(downs[0], family), p.device, p.dtype, downs)


_LOADED: dict[tuple, Model] = {}
_KEEP = 2  # models kept loaded per process: a real one and a small one, without hoarding memory


def model_dtype(dtype: str) -> str:
    """The precision a model runs in: ``auto`` is ``float32`` (exact); ``split`` is a decoding precision only.

    Raises:
        NeuronmapError: ``split`` or an unknown name.
    """
    if dtype == "auto":
        return "float32"
    if dtype == "split":
        raise NeuronmapError("dtype=split is a decoding precision (map, compare): a model runs in auto, float32 or "
                             "bfloat16; use dtype=auto")
    if dtype not in MODEL_DTYPES:
        raise NeuronmapError(f"unknown dtype={dtype!r}: expected auto, float32 or bfloat16")
    return dtype


def load_model(source: Source | str | None = None, device: str = DEVICE, dtype: str = DTYPE) -> Model:
    """Load a model with transformers; the last two loaded stay in memory for reuse.

    Args:
        source: a ``Source`` or anything ``resolve_source`` takes (None: the demo model).
        device: ``auto`` (cuda if present, else cpu) | ``cpu`` | ``cuda``.
        dtype: ``auto`` (float32: exact) | ``float32`` | ``bfloat16`` (faster on a GPU, approximate).

    Returns:
        Model: in eval mode, with gradients off.

    Raises:
        NeuronmapError: bad source, device or dtype, or transformers cannot load it.

    Example:
        >>> m = load_model(None)  # doctest: +SKIP
        >>> m.family.name, m.n_layers, m.d_mlp  # doctest: +SKIP
        ('llama', 30, 1536)
    """
    src = source if isinstance(source, Source) else resolve_source(source)
    dtype = model_dtype(dtype)
    dev = resolve_device(device)
    key = (src.kind, str(src.path.resolve()), str(dev), dtype)
    if key in _LOADED:
        _LOADED[key] = _LOADED.pop(key)  # most recently used last
        return _LOADED[key]
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    where, kw = (str(src.path.parent), {"gguf_file": src.path.name}) if src.kind == "gguf" else (str(src.path), {})
    try:
        # The GGUF converter draws its own tqdm bar on stderr; errors still arrive as exceptions.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(where, dtype=MODEL_DTYPES[dtype], **kw)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise NeuronmapError(
            f"transformers cannot load {src.spec} ({type(e).__name__}: {first}): "
            "pass a checkpoint or GGUF of a supported causal LM"
        ) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except Exception:
        tokenizer = None  # commands that need text say so when they run
    if tokenizer is not None and len(tokenizer.get_vocab()) <= 1:
        tokenizer = None  # transformers builds an empty one from config.json alone
    model = model.to(dev).eval()
    model.requires_grad_(False)
    m = wrap_model(model, tokenizer, src)
    while len(_LOADED) >= _KEEP:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[key] = m
    return m


def require_tokenizer(m: Model) -> object:
    """The model's tokenizer.

    Raises:
        NeuronmapError: the source has none.
    """
    if m.tokenizer is None:
        raise NeuronmapError(
            f"{m.source.spec} has no tokenizer transformers can load: add tokenizer.json (and tokenizer_config.json) to it"
        )
    return m.tokenizer
