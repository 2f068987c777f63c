"""A faster ``gguf.GGUFReader``: the same fields and tensors, its metadata parsed in a fraction of the time.

The stock reader slices an ``np.memmap`` (Python code runs per slice) once per
element of every metadata array, which is seconds for a 50k-token vocabulary
and its merges (the demo model: ~5 s of ~6 s to open). Here slices come from a
plain ndarray view of the same mapping and arrays are split in one loop.
tests/test_gguf_fast.py checks every field and tensor against the stock reader.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGUFValueType

_STRING, _ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)


class GGUFReader(gguf.GGUFReader):
    """``gguf.GGUFReader(path)``, fast; tensors' ``data`` are ndarray views of the same file mapping."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        arr = plain[offset:offset + dt.itemsize * int(count)].view(dt)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        if int(raw_type) != _ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n, offs = int(raw_itype[0]), int(alen[0]), orig_offs + 12
        # A corrupt length would otherwise loop (and allocate) once per claimed element: each takes at least a byte.
        if n > len(self._plain) - offs:
            raise ValueError(f"an array of {n} elements at offset {orig_offs} runs past the end of the file")
        if n == 0 or itype == _ARRAY:  # the stock, per-element path
            return super()._get_field_parts(orig_offs, raw_type)
        parts = [raw_itype, alen]
        if itype == _STRING:
            plain, u64 = self._plain, np.dtype(np.uint64).newbyteorder(self.byte_order)
            for _ in range(n):
                size = plain[offs:offs + 8].view(u64)
                k = int(size[0])
                parts += [size, plain[offs + 8:offs + 8 + k]]
                offs += 8 + k
            return offs - orig_offs, parts, list(range(3, 2 * n + 2, 2)), [GGUFValueType.ARRAY, GGUFValueType.STRING]
        nptype = self.gguf_scalar_to_np[GGUFValueType(itype)]
        vals = self._get(offs, nptype, n)
        if len(vals) != n:
            raise ValueError(f"an array of {n} elements at offset {orig_offs} runs past the end of the file")
        parts += [vals[i:i + 1] for i in range(n)]
        return 12 + int(vals.nbytes), parts, list(range(2, n + 2)), [GGUFValueType.ARRAY, GGUFValueType(itype)]
