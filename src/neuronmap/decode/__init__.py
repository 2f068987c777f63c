"""Stage 2, decode: vectors in the residual stream's space -> token distributions, through the model's own final norm
and LM head.

Owns the head as data and its exact fp32 maths (head), blocked decoding to top-k, log-sum-exp and entropy with the
precision and kernel choices (engine), the fused AVX512-BF16 kernel's wrapper (fused) and the C kernels, built once
into the cache (native, csrc/).

May import: core, sources.
"""
