"""The fast GGUF reader gives exactly the stock reader's fields and tensors."""

from __future__ import annotations

import gguf
import numpy as np

from neuronmap.sources.gguf_fast import GGUFReader


def _same(path) -> None:
    fast = GGUFReader(str(path))
    stock = gguf.GGUFReader(str(path))
    assert list(fast.fields) == list(stock.fields)
    for key, b in stock.fields.items():
        a = fast.fields[key]
        assert (a.offset, a.name, a.types, a.data) == (b.offset, b.name, b.types, b.data), key
        assert len(a.parts) == len(b.parts), key
        assert all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a.parts, b.parts)), key
        assert a.contents() == b.contents(), key
    assert len(fast.tensors) == len(stock.tensors)
    for a, b in zip(fast.tensors, stock.tensors):
        assert (a.name, a.tensor_type, a.n_elements, a.data_offset) == (b.name, b.tensor_type, b.n_elements, b.data_offset)
        assert np.array_equal(a.shape, b.shape) and np.array_equal(a.data, b.data)



def test_every_value_type(tmp_path):
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("strings", ["", " dog", "ü", "a" * 300])
    w.add_array("ints", [1, -2, 3])
    w.add_array("floats", [0.5, 1.5])
    w.add_array("empty", [])
    w.add_array("nested", [[1, 2], [3]])
    w.add_array("bools", [True, False])
    w.add_string("name", "tiny")
    w.add_uint32("n", 7)
    w.add_tensor("weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("half", np.ones((2, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same(path)
    assert GGUFReader(str(path)).fields["strings"].contents() == ["", " dog", "ü", "a" * 300]


# Speed is a benchmark matter, not a test's: here only identity with the stock reader is checked.
def test_demo_model_same_as_stock_reader(demo_gguf):
    _same(demo_gguf)
