"""neuronmap: decode every MLP neuron of a causal LM with its own final norm and LM head.

Example:
    >>> import neuronmap
    >>> result = neuronmap.map_model(None, "demo-atlas")  # doctest: +SKIP
    >>> neuronmap.Atlas.open("demo-atlas").search("coffee", top=5)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Imported on first use: `import neuronmap` (and so the CLI's start) must not pay for torch before it is needed.
_EXPORTS = {
    "Atlas": "neuronmap.atlasdb",
    "NeuronmapError": "neuronmap.errors",
    "MapOptions": "neuronmap.mapper",
    "MapResult": "neuronmap.mapper",
    "map_model": "neuronmap.mapper",
    "open_weights": "neuronmap.sources",
    "remove": "neuronmap.edited",
    "RemoveOptions": "neuronmap.removal",
    "resolve_source": "neuronmap.sources",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neuronmap' has no attribute {name!r}")
