"""Stage 4, mapping: writing an atlas from a model's weights.

Owns one part of a map, the same unit for a local run and a Ray task (part), the resumable parts kept beside the
output (parts), the run on a Ray cluster (distributed) and ``map_model``, which plans, runs the parts and assembles
the atlas (mapper).

May import: core, sources, decode, atlas.
"""
