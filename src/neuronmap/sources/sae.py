"""Sparse autoencoders and transcoders as saved by SAELens: ``cfg.json`` + ``sae_weights.safetensors``.

A feature is decoded like a neuron: its encoder direction (column ``W_enc[:, i]``, what it reads at its hook) and its
decoder direction (row ``W_dec[i]``, what it writes) are both ``d_model`` vectors in the residual stream, so the
atlas's two matrices for features are ``enc`` and ``dec``. The hook (a TransformerLens name) is placed in the
model's modules by the family table (``Family.hook_point``); nothing here knows a family.

Shapes: ``d_in d_sae d_out`` as SAELens names them (``d_in == d_out == d_model`` for every hook neuronmap reads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from neuronmap.core.cache import file_sha256
from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.families import HookPoint
from neuronmap.sources.safetensors_io import safetensors_reader
from neuronmap.sources.weights import INT_DTYPE_NAMES, Weights, dtype_error, non_finite_count

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "transcoder", "jumprelu_transcoder")
TRANSCODERS = ("transcoder", "jumprelu_transcoder")
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"


@dataclass(frozen=True)
class Sae:
    """One SAE or transcoder, opened lazily: its config checked, its tensors read (and checked) on demand.

    Attributes:
        path: its directory; file: ``sae_weights.safetensors``; sha256: that file's.
        architecture: one of ``ARCHITECTURES``; d_in, d_sae, d_out: its shape.
        point: where it reads (a ``HookPoint``); out_point: where a transcoder writes (else ``point``).
        k: the TopK SAE's k (None otherwise); apply_b_dec_to_input: SAELens's flag (standard/topk/jumprelu/gated).
    """

    path: Path
    file: Path
    sha256: str
    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    point: HookPoint
    out_point: HookPoint
    k: int | None
    apply_b_dec_to_input: bool
    read: Callable[[str], torch.Tensor] = field(repr=False)
    shape_of: Callable[[str], tuple | None] = field(repr=False)

    @property
    def layer(self) -> int:
        return self.point.layer

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor of the SAE as fp32, refused in one line if missing, not float, of the wrong shape or not finite."""
        want = {"W_enc": (self.d_in, self.d_sae), "W_dec": (self.d_sae, self.d_out), "b_enc": (self.d_sae,),
                "b_dec": (self.d_out,), "threshold": (self.d_sae,), "b_gate": (self.d_sae,), "b_mag": (self.d_sae,),
                "r_mag": (self.d_sae,)}[name]
        shape = self.shape_of(name)
        if shape is None:
            raise NeuronmapError(f"{self.file} has no tensor {name}, which a {self.architecture} SAE needs: "
                                 "save it with SAELens (cfg.json architecture must match the tensors)")
        if tuple(shape) != want:
            raise NeuronmapError(f"tensor {name} in {self.file} has shape {list(shape)}, expected {list(want)} from "
                                 f"cfg.json (d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}): the config "
                                 "and weights do not match; save them again together")
        t = self.read(name)
        if not t.dtype.is_floating_point:
            raise dtype_error(name, self.file, INT_DTYPE_NAMES.get(t.dtype, str(t.dtype)))
        t = t.to(torch.float32)
        if non_finite_count(t):
            raise NeuronmapError(f"tensor {name} in {self.file} has {non_finite_count(t)} non-finite values (NaN or "
                                 "inf): the SAE is corrupt; train or download it again")
        return t

    def encoder(self) -> torch.Tensor:
        """``[d_sae, d_in]``: feature i's encoder direction is row i (``W_enc`` transposed)."""
        return self.tensor("W_enc").T.contiguous()

    def decoder(self) -> torch.Tensor:
        """``[d_sae, d_out]``: feature i's decoder direction is row i of ``W_dec``."""
        return self.tensor("W_dec")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations as SAELens computes them, ``[n, d_in] -> [n, d_sae]`` fp32.

        standard/transcoder: ReLU; topk: the k largest pre-activations through a ReLU; jumprelu(_transcoder): a
        pre-activation kept where it exceeds its threshold; gated: the gate's sign times the ReLU'd magnitude path.
        SAEs subtract ``b_dec`` from the input first where ``apply_b_dec_to_input`` (transcoders never do).
        """
        x = x.float()
        if self.apply_b_dec_to_input and self.architecture not in TRANSCODERS:
            x = x - self.tensor("b_dec")
        if self.architecture == "gated":
            h = x @ self.tensor("W_enc")  # [n, d_sae]
            gate = (h + self.tensor("b_gate")) > 0
            return gate * torch.relu(h * self.tensor("r_mag").exp() + self.tensor("b_mag"))
        pre = x @ self.tensor("W_enc") + self.tensor("b_enc")  # [n, d_sae]
        if self.architecture == "topk":
            vals, idx = pre.topk(min(self.k, self.d_sae), dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        if self.architecture in ("jumprelu", "jumprelu_transcoder"):
            return pre * (pre > self.tensor("threshold"))
        return torch.relu(pre)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """The reconstruction (a transcoder's prediction), ``[n, d_sae] -> [n, d_out]``."""
        return acts @ self.tensor("W_dec") + self.tensor("b_dec")

    def to_dict(self) -> dict:
        """What meta.json records of this SAE."""
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "architecture": self.architecture,
                "hook": self.point.hook, "hook_out": self.out_point.hook, "layer": self.layer, "d_in": self.d_in,
                "d_sae": self.d_sae, "d_out": self.d_out, "k": self.k}


def _int(cfg: dict, key: str, where: Path) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise NeuronmapError(f"{where} has {key} = {v!r}, expected a positive integer: is it a SAELens cfg.json?")
    return v


def open_sae(path: Path | str, weights: Weights) -> Sae:
    """Open one SAELens directory, checked against the model it will be decoded with.

    Args:
        path: a directory holding ``cfg.json`` and ``sae_weights.safetensors``.
        weights: the model (its family places the hook, its ``d_model`` must equal ``d_in``).

    Returns:
        Sae.

    Raises:
        NeuronmapError: missing files, an unknown architecture or hook, ``d_in``/``d_out`` other than the model's
            ``d_model``, or a tensor of the wrong shape; one line naming both sides.

    Example:
        >>> open_sae("saes/layer_12", open_weights(None)).d_sae  # doctest: +SKIP
        16384
    """
    path = Path(path)
    cfg_file, file = path / CFG, path / WEIGHTS
    if not cfg_file.is_file() or not file.is_file():
        raise NeuronmapError(f"{path} is not a SAELens SAE: it lacks {CFG} or {WEIGHTS}; pass the directory "
                             "`sae.save_model(DIR)` wrote (or a directory of them, one per layer)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise NeuronmapError(f"{cfg_file} is not readable JSON ({e}): save the SAE again") from e
    if not isinstance(cfg, dict):
        raise NeuronmapError(f"{cfg_file} holds a JSON {type(cfg).__name__}, expected an object: save the SAE again")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise NeuronmapError(f"{cfg_file}: unknown architecture {arch!r}, expected one of {', '.join(ARCHITECTURES)}")
    d_in, d_sae = _int(cfg, "d_in", cfg_file), _int(cfg, "d_sae", cfg_file)
    d_out = _int(cfg, "d_out", cfg_file) if "d_out" in cfg else d_in
    hook = meta.get("hook_name", cfg.get("hook_name"))
    if not isinstance(hook, str):
        raise NeuronmapError(f"{cfg_file} names no hook (metadata.hook_name or hook_name): expected a TransformerLens "
                             "hook such as blocks.12.hook_resid_post")
    point = weights.family.hook_point(hook, weights.n_layers)
    if arch in TRANSCODERS:
        hook_out = meta.get("hook_name_out", cfg.get("hook_name_out")) or f"blocks.{point.layer}.hook_mlp_out"
        out_point = weights.family.hook_point(hook_out, weights.n_layers)
    else:
        out_point = point
    for what, n in (("d_in", d_in), ("d_out", d_out)):
        if n != weights.d_model:
            raise NeuronmapError(f"{cfg_file}: {what} is {n} but the {weights.family.name} model's d_model is "
                                 f"{weights.d_model} (hook {hook}): this SAE was trained on another model")
    k = None
    if arch == "topk":
        kw = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
        k = _int({"k": cfg.get("k", kw.get("k"))}, "k", cfg_file)
    read, entry = safetensors_reader((file,))
    sae = Sae(path, file, file_sha256(file), arch, d_in, d_sae, d_out, point, out_point, k,
              bool(cfg.get("apply_b_dec_to_input", arch not in TRANSCODERS)), read,
              lambda n: (entry(n).shape if entry(n) is not None else None))
    for name in ("W_enc", "W_dec"):  # shapes from the header now: a mismatch is refused before any decode
        sae.tensor(name)
    return sae


def open_saes(path: Path | str, weights: Weights) -> list[Sae]:
    """One SAELens directory, or a directory of them (one per layer), sorted by layer.

    Raises:
        NeuronmapError: nothing SAE-like under ``path``; two SAEs at one layer; SAEs of different ``d_sae``.
    """
    path = Path(path)
    if not path.exists():
        raise NeuronmapError(f"sae={path} does not exist: pass a SAELens directory (cfg.json + {WEIGHTS})")
    if (path / CFG).exists():
        return [open_sae(path, weights)]
    subs = sorted(p for p in path.iterdir() if (p / CFG).is_file()) if path.is_dir() else []
    if not subs:
        raise NeuronmapError(f"{path} holds no SAE: expected {CFG} + {WEIGHTS} in it or in its subdirectories")
    saes = sorted((open_sae(p, weights) for p in subs), key=lambda s: s.layer)
    for a, b in zip(saes, saes[1:]):
        if a.layer == b.layer:
            raise NeuronmapError(f"{a.path} and {b.path} are both at layer {a.layer} ({a.point.hook}, {b.point.hook}): "
                                 "one atlas holds one SAE per layer; map them into two atlases")
        if a.d_sae != b.d_sae:
            raise NeuronmapError(f"{a.path} has d_sae {a.d_sae} but {b.path} has {b.d_sae}: one atlas holds SAEs of "
                                 "one width; map them into separate atlases")
    return saes


class FeatureWeights:
    """The model's ``Weights`` with its MLP vectors replaced by the features of SAEs: what ``map --sae`` decodes.

    Everything but ``vectors``, ``d_mlp`` (``d_sae``) and ``family.matrices`` is the model's own (head, final norm,
    vocabulary), so features are decoded by the same head as neurons.
    """

    letter: ClassVar[str] = "F"
    matrices: ClassVar[tuple[str, ...]] = ("enc", "dec")

    def __init__(self, weights: Weights, saes: list[Sae]):
        self.model, self.saes = weights, {s.layer: s for s in saes}
        self.d_mlp = saes[0].d_sae

    def __getattr__(self, name):  # head(), final_norm(), tokens, d_vocab ... are the model's
        return getattr(self.model, name)

    def vectors(self, matrix: str, layer: int) -> torch.Tensor:
        """``[d_sae, d_model]``: encoder (``enc``) or decoder (``dec``) directions of the SAE at ``layer``."""
        sae = self.saes[layer]
        return sae.encoder() if matrix == "enc" else sae.decoder()


def reopen_saes(entries: list[dict], weights: Weights) -> FeatureWeights:
    """The SAEs a feature atlas's meta.json records (``sae``), opened again over ``weights``.

    Raises:
        NeuronmapError: an SAE moved, or its weights changed since the atlas was mapped (sha256).
    """
    saes = []
    for e in entries:
        sae = open_sae(e["path"], weights)
        if sae.sha256 != e["sha256"]:
            raise NeuronmapError(f"{sae.file} has changed since the atlas was mapped (its sha256 is {sae.sha256[:12]}..., "
                                 f"meta.json records {e['sha256'][:12]}...): map the SAE again with `neuronmap map --sae`")
        saes.append(sae)
    return FeatureWeights(weights, saes)
