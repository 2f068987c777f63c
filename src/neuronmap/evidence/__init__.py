"""Stage 6, evidence: what neurons fire on in real text.

Owns reading corpora (corpus, corpus_sources), recording activations into an atlas's evidence files (record) and the
agreement of decoded tokens with activations (agreement). Reading the evidence back is the atlas package's.

May import: core, sources, decode, atlas, mapping, runtime.
"""
