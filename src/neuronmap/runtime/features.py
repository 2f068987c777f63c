"""Steer an SAE or transcoder feature: add a multiple of its decoder direction where the SAE writes.

The hook is the SAE's output hook (``Sae.out_point``: its own hook for an SAE, ``hook_name_out`` for a transcoder),
placed in the model by the family table. Shapes: ``batch seq d_model``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.models import Model, find_module
from neuronmap.sources.sae import Sae


@contextmanager
def steer_feature(m: Model, sae: Sae, index: int, amount: float) -> Iterator[None]:
    """Add ``amount * W_dec[index]`` to the activation at the SAE's output hook, at every position, inside the block.

    Args:
        m: the loaded model (of the family the SAE was opened against).
        sae: the SAE; index: the feature; amount: the multiple (the activation the feature would have to have).

    Raises:
        NeuronmapError: ``index`` outside ``0..d_sae-1``.

    Example:
        >>> with steer_feature(m, sae, 885, 100.0):  # doctest: +SKIP
        ...     logits = m.model(ids).logits
    """
    if not 0 <= index < sae.d_sae:
        raise NeuronmapError(f"feature {index} is out of range: the SAE at {sae.path} has features 0-{sae.d_sae - 1}")
    direction = (amount * sae.decoder()[index]).to(device=m.device, dtype=m.dtype)  # [d_model]
    point = sae.out_point
    mod = find_module(m.model, point.module)

    def pre(module, args):
        return (args[0] + direction, *args[1:])

    def post(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + direction, *output[1:])
        return output + direction

    h = mod.register_forward_pre_hook(pre) if point.side == "input" else mod.register_forward_hook(post)
    try:
        yield
    finally:
        h.remove()
