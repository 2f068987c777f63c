"""neuronmap: decode every MLP neuron of a causal LM with its own final norm and LM head.

Example:
    >>> import neuronmap
    >>> result = neuronmap.map_model(None, "demo-atlas")  # doctest: +SKIP
    >>> neuronmap.Atlas.open("demo-atlas").search(["coffee"], top=5).table  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from neuronmap.core.version import VERSION as __version__

# Imported on first use: `import neuronmap` (and so the CLI's start) must not pay for torch before it is needed.
_EXPORTS = {
    "Atlas": "neuronmap.atlas.handle",
    "NeuronmapError": "neuronmap.core.errors",
    "MapOptions": "neuronmap.mapping.mapper",
    "MapResult": "neuronmap.mapping.mapper",
    "map_model": "neuronmap.mapping.mapper",
    "open_weights": "neuronmap.sources.resolve",
    "remove": "neuronmap.removal.remove",
    "RemoveOptions": "neuronmap.removal.options",
    "resolve_source": "neuronmap.sources.resolve",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neuronmap' has no attribute {name!r}")
