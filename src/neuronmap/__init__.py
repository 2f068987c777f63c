"""neuronmap: decode every MLP neuron of a causal LM with its own final norm and LM head.

Example:
    >>> import neuronmap
    >>> result = neuronmap.map_model(None, "demo-atlas")  # doctest: +SKIP
    >>> neuronmap.Atlas.open("demo-atlas").search("coffee", top=5)  # doctest: +SKIP
"""

__version__ = "0.1.0"

from neuronmap.errors import NeuronmapError  # noqa: E402
from neuronmap.mapper import MapOptions, MapResult, map_model  # noqa: E402
from neuronmap.atlasdb import Atlas  # noqa: E402
from neuronmap.sources import open_weights, resolve_source  # noqa: E402

__all__ = ["Atlas", "NeuronmapError", "MapOptions", "MapResult", "map_model", "open_weights", "resolve_source", "__version__"]
