"""Stage 1, sources: reading a model's weights, one tensor at a time, with no model instantiated.

Owns the table of model families (families: tensor names, norm kind and conventions, tied or untied head, bias,
softcap; the only place family knowledge lives), the tokenizer's token strings (vocab), the checked lazy reader
``Weights`` and ``Source`` (weights), the formats (checkpoint + safetensors_io, gguf_io + gguf_fast) and turning what
a user typed into a ``Source`` (resolve: paths, packaged models, the local HF cache).

May import: core.
"""
