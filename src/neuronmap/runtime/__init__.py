"""Stage 5, runtime: running the model itself: loading it with transformers from the same sources (models), and the
hooks that read or set MLP activations (hooks: ``recording``, ``intervene``, the ``L29N808=20x`` spec grammar).

May import: core, sources, decode, atlas, mapping.
"""
