"""Fuzz the weight readers: a tiny safetensors checkpoint and a tiny GGUF, mutated a few hundred ways.

Every case must either be refused with one line (``NeuronmapError``) or read whole,
every tensor the decode reads being finite and of the shape the model's dimensions
call for. Any other exception, a message of more than one line, or a poisoned
tensor read as if it were fine, fails. The seed is fixed, so a failure names a case
that can be replayed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.sources.resolve import open_weights
from test_sources import write_tiny_gguf

SEED = 15
# Tensors the decode reads, in each naming, with how the reader names them back.
READ_ST = ["lm_head.weight", "model.norm.weight"] + [
    f"model.layers.{i}.{t}" for i in range(2) for t in
    ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight")]
READ_GGUF = {"output.weight": "lm_head.weight", "output_norm.weight": "model.norm.weight"} | {
    f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for i in range(2) for g, h in
    (("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
     ("ffn_norm", "post_attention_layernorm"))}
ODD_VALUES = [None, "2", "", 2.5, -1, 0, 1, 2, 3, 10**12, 2**64, True, [], [2], {}, {"a": 1}, float("nan"), 1e308, -1e-5]


def _read_everything(w) -> None:
    """Every tensor the decode reads, checked for shape and finiteness."""
    assert isinstance(w.n_layers, int) and w.n_layers >= 1
    assert len(w.tokens) == w.d_vocab and all(isinstance(t, str) and t for t in w.tokens)
    assert np.isfinite(w.eps) and (w.softcap is None or np.isfinite(w.softcap))
    got = [(w.head(native=True), (w.d_vocab, w.d_model)), (w.final_norm()[0], (w.d_model,))]
    for layer in range(w.n_layers):
        got += [(w.vectors(m, layer), (w.d_mlp, w.d_model)) for m in w.family.matrices]
        got.append((w.mlp_norm_gain(layer), (w.d_model,)))
    for t, shape in got:
        assert tuple(t.shape) == shape and bool(torch.isfinite(t.float()).all())


def _outcome(source: Path, case: str) -> str:
    """``read`` or the one-line refusal; any other exception fails the test, naming the case."""
    try:
        _read_everything(open_weights(str(source)))
    except NeuronmapError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"{case}: a message of {msg.count(chr(10)) + 1} lines"
        return msg
    except Exception as e:
        pytest.fail(f"{case}: {type(e).__name__}: {e}")
    return "read"


def _tally(outcomes: list[str]) -> tuple[int, int]:
    read = sum(o == "read" for o in outcomes)
    return read, len(outcomes) - read


# ---------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def base(tiny_models, tmp_path_factory):
    """(case directory, config, model.safetensors bytes, header, header length) of the tiny llama."""
    src = tiny_models("llama")
    d = tmp_path_factory.mktemp("fuzz") / "ck"
    shutil.copytree(src, d)
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return d, json.loads((d / "config.json").read_text()), raw, json.loads(raw[8:8 + n]), n


def _write(d: Path, config, raw: bytes) -> Path:
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (d / "model.safetensors").write_bytes(raw)
    return d


def _with_header(raw: bytes, n: int, header) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def _mutate_entry(rng, entry):
    """One field of a header entry changed: a shape, a dtype string, an offset, a deleted key, a type."""
    e = dict(entry)
    op = rng.integers(7)
    if op == 0:
        shape = list(e["shape"])
        i = rng.integers(len(shape))
        shape[i] = int(rng.choice([0, 1, shape[i] - 1, shape[i] + 1, shape[i] * 2, -shape[i]]))
        e["shape"] = shape
    elif op == 1:
        e["shape"] = [[*e["shape"], 1], e["shape"][::-1], e["shape"][:1], str(e["shape"]), [float(x) for x in e["shape"]], None][rng.integers(6)]
    elif op == 2:
        e["dtype"] = str(rng.choice(["F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "I64", "U16", "F8_E4M3", "F9", "f32", ""]))
    elif op == 3:
        lo, hi = e["data_offsets"]
        shift = int(rng.choice([-4096, -64, -4, -1, 1, 4, 64, 4096, 10**9]))
        e["data_offsets"] = [[lo + shift, hi + shift], [lo, hi + shift], [lo + shift, hi], [hi, lo], [lo]][rng.integers(5)]
    elif op == 4:
        e["data_offsets"] = [None, "0,4", [float(x) for x in e["data_offsets"]], {"lo": 0}][rng.integers(4)]
    elif op == 5:
        del e[str(rng.choice(["dtype", "shape", "data_offsets"]))]
    else:
        return [None, [], "x", 3][rng.integers(4)]
    return e


def test_truncated_safetensors(base):
    d, config, raw, _, _ = base
    rng = np.random.default_rng(SEED)
    cuts = [0, 1, 7, 8, 9] + sorted(int(x) for x in rng.integers(10, len(raw), 40))
    outcomes = [_outcome(_write(d, config, raw[:c]), f"truncated to {c} of {len(raw)} bytes") for c in cuts]
    assert _tally(outcomes) == (0, len(cuts))  # every cut loses a tensor's bytes


def test_byte_flips_in_the_safetensors_header(base):
    d, config, raw, _, n = base
    rng = np.random.default_rng(SEED + 1)
    outcomes = []
    for case in range(80):
        b = bytearray(raw)
        for pos in rng.integers(0, 8 + n, rng.integers(1, 4)):
            b[pos] = int(rng.integers(256))
        outcomes.append(_outcome(_write(d, config, bytes(b)), f"header flip case {case}"))
    read, refused = _tally(outcomes)
    assert refused > 40 and read + refused == 80


def test_field_mutations_of_the_safetensors_header(base):
    d, config, raw, header, n = base
    rng = np.random.default_rng(SEED + 2)
    names = sorted(k for k in header if k != "__metadata__")
    outcomes = []
    for case in range(80):
        h = json.loads(json.dumps(header))
        name = str(rng.choice(names))
        if rng.random() < 0.1:
            h.pop(name)
        else:
            h[name] = _mutate_entry(rng, h[name])
        outcomes.append(_outcome(_write(d, config, _with_header(raw, n, h)), f"field case {case}: {name} -> {h.get(name)}"))
    read, refused = _tally(outcomes)
    assert refused > 40 and read + refused == 80


def test_poisoned_values_in_tensors_the_decode_reads(base):
    d, config, raw, header, n = base
    rng = np.random.default_rng(SEED + 3)
    for case in range(30):
        name = str(rng.choice(READ_ST))
        lo, hi = header[name]["data_offsets"]
        at = 8 + n + lo + 4 * int(rng.integers((hi - lo) // 4))
        value = float(rng.choice([np.nan, np.inf, -np.inf]))
        b = bytearray(raw)
        b[at:at + 4] = np.float32(value).tobytes()
        msg = _outcome(_write(d, config, bytes(b)), f"poison case {case}: {value} in {name}")
        assert f"tensor {name} in " in msg and "has 1 of " in msg and "values non-finite (NaN or inf)" in msg, msg


def test_config_mutations(base):
    d, config, raw, _, _ = base
    rng = np.random.default_rng(SEED + 4)
    keys = ["num_hidden_layers", "rms_norm_eps", "model_type", "hidden_size", "vocab_size", "text_config"]
    outcomes = []
    for case in range(50):
        if case < 4:
            cfg = [[config], "llama", 3, None][case]
        else:
            cfg = dict(config)
            key = str(rng.choice(keys))
            value = ODD_VALUES[rng.integers(len(ODD_VALUES))]
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        outcomes.append(_outcome(_write(d, cfg, raw), f"config case {case}: {cfg if case < 4 else (key, value)}"))
    read, refused = _tally(outcomes)
    assert read > 5 and refused > 15
    _write(d, config, raw)


def test_tokenizer_json_mutations(base):
    d, config, raw, _, _ = base
    rng = np.random.default_rng(SEED + 5)
    good = {"model": {"type": "BPE", "vocab": {f"Ġw{i}": i for i in range(64)}}, "added_tokens": [{"id": 0, "content": "<s>"}],
            "decoder": {"type": "ByteLevel"}}
    text = json.dumps(good)
    outcomes = []
    for case in range(40):
        op = case % 4
        if op == 0:
            t = text[: int(rng.integers(len(text)))]
        elif op == 1:
            b = bytearray(text.encode())
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
            t = b.decode("utf-8", errors="replace")
        elif op == 2:
            vocab = dict(good["model"]["vocab"])
            vocab[f"Ġw{rng.integers(64)}"] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
            t = json.dumps({**good, "model": {"vocab": vocab}})
        else:
            t = json.dumps({**good, str(rng.choice(["model", "added_tokens"])): ODD_VALUES[rng.integers(len(ODD_VALUES))]})
        _write(d, config, raw)
        (d / "tokenizer.json").write_text(t)
        outcomes.append(_outcome(d, f"tokenizer case {case}: {t[:80]!r}"))
    (d / "tokenizer.json").unlink()
    read, refused = _tally(outcomes)
    assert read > 0 and refused > 20


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    """(case path, bytes, where the tensor data begins, {name: (data offset, bytes)}) of a tiny llama GGUF."""
    from neuronmap.sources.gguf_fast import GGUFReader

    d = tmp_path_factory.mktemp("fuzz-gguf")
    path = write_tiny_gguf(d / "base.gguf")
    reader = GGUFReader(str(path))
    spans = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    return d / "case.gguf", path.read_bytes(), int(reader.data_offset), spans


def test_truncated_gguf(gguf_base):
    case, raw, _, _ = gguf_base
    rng = np.random.default_rng(SEED + 6)
    cuts = [0, 3, 4, 8, 24] + sorted(int(x) for x in rng.integers(25, len(raw), 40))
    outcomes = []
    for c in cuts:
        case.write_bytes(raw[:c])
        outcomes.append(_outcome(case, f"GGUF truncated to {c} of {len(raw)} bytes"))
    assert _tally(outcomes) == (0, len(cuts))


def test_byte_flips_in_the_gguf_metadata(gguf_base):
    case, raw, data_start, _ = gguf_base
    rng = np.random.default_rng(SEED + 7)
    outcomes = []
    for i in range(120):
        b = bytearray(raw)
        for pos in rng.integers(0, data_start, rng.integers(1, 4)):
            b[pos] = int(rng.integers(256))
        case.write_bytes(bytes(b))
        outcomes.append(_outcome(case, f"GGUF metadata flip case {i}"))
    read, refused = _tally(outcomes)
    assert read > 0 and refused > 60


def test_field_mutations_of_the_gguf(gguf_base, tmp_path):
    from test_sources import GGUF_META, gguf_tensors

    rng = np.random.default_rng(SEED + 8)
    keys = list(GGUF_META) + ["general.architecture", "llama.attention.layer_norm_epsilon"]
    outcomes = []
    for i in range(40):
        meta, tensors = {}, gguf_tensors()
        if i % 2 == 0:
            value = ODD_VALUES[rng.integers(len(ODD_VALUES))]
            if isinstance(value, (list, dict)) or (isinstance(value, int) and not isinstance(value, bool) and value >= 2**63):
                value = str(value)  # the writer cannot store these as scalars
            meta[str(rng.choice(keys))] = value
        else:
            name = str(rng.choice(sorted(tensors)))
            op = rng.integers(4)
            if op == 0:
                tensors.pop(name)
            elif op == 1:
                tensors[name] = tensors[name].astype(rng.choice([np.float16, np.float64, np.int32, np.int8]))
            elif op == 2:
                tensors[name] = tensors[name].T.copy() if tensors[name].ndim == 2 else tensors[name][:-1]
            else:
                tensors[name] = tensors[name].reshape(-1)
        path = write_tiny_gguf(tmp_path / f"f{i}.gguf", meta, tensors)
        outcomes.append(_outcome(path, f"GGUF field case {i}: {meta or name}"))
    read, refused = _tally(outcomes)
    assert read > 3 and refused > 15


def test_poisoned_gguf_tensors(gguf_base):
    case, raw, _, spans = gguf_base
    rng = np.random.default_rng(SEED + 9)
    for i in range(20):
        name = str(rng.choice(sorted(READ_GGUF)))
        start, size = spans[name]
        at = start + 4 * int(rng.integers(size // 4))
        value = float(rng.choice([np.nan, np.inf, -np.inf]))
        b = bytearray(raw)
        b[at:at + 4] = np.float32(value).tobytes()
        case.write_bytes(bytes(b))
        msg = _outcome(case, f"GGUF poison case {i}: {value} in {name}")
        assert f"tensor {READ_GGUF[name]} in {case} has 1 of " in msg and "values non-finite (NaN or inf)" in msg, msg
