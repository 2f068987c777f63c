"""Stage 0, core: what every stage shares and nothing else: the error type (errors), neuron ids and option
parsing of layers/matrices/poles (ids), outputs written whole or not at all (fsio), the cache directory and the
stat-keyed sha256 of files (cache), and the version.

May import: nothing of neuronmap's.
"""
