"""Sources: the packaged real models through GGUF and safetensors, the hub cache, sharded checkpoints, bad input, the sha256 cache."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions
from neuronmap.sources.resolve import open_weights, packaged_gguf, resolve_source
from neuronmap.core.cache import file_sha256


def _top1(atlas: Path):
    t = pq.read_table(atlas / "neurons.parquet", columns=["matrix", "layer", "neuron", "pole", "token_ids"]).to_pandas()
    return {(r.matrix, r.layer, r.neuron, r.pole): int(r.token_ids[0]) for r in t.itertuples()}


@pytest.mark.slow  # its real-model fixtures come through request.getfixturevalue, which the auto-mark cannot see
@pytest.mark.parametrize("name, layers", [("demo", "0,14,29"), ("gemma", "17")])
def test_gguf_and_its_safetensors_export_agree(name, layers, request, tmp_path):
    gguf = request.getfixturevalue(f"{name}_gguf")
    ckpt = request.getfixturevalue(f"{name}_checkpoint")
    opts = MapOptions(layers=layers, top_k=5, dtype="float32", device="cpu")
    a = map_model(str(gguf), tmp_path / "gguf", opts)
    b = map_model(str(ckpt), tmp_path / "st", opts)
    assert a.meta["family"] == b.meta["family"]
    assert a.meta["source"]["kind"] == "gguf" and b.meta["source"]["kind"] == "checkpoint"
    ta, tb = _top1(a.path), _top1(b.path)
    assert len(ta) == len(tb) > 0
    same = sum(ta[k] == tb[k] for k in ta)
    assert same == len(ta), f"{len(ta) - same} of {len(ta)} top-1 tokens differ"
    wa, wb = open_weights(str(gguf)), open_weights(str(ckpt))
    # The GGUF's own vocabulary and tokenizer.json decode ids to the same strings.
    agree = sum(x == y for x, y in zip(wa.tokens, wb.tokens)) / wa.d_vocab
    assert agree > 0.99


@pytest.mark.slow  # loads the real demo model
def test_demo_model_shape_and_tokens():
    w = open_weights(None)
    assert (w.family.name, w.n_layers, w.d_model, w.d_mlp, w.d_vocab) == ("llama", 30, 576, 1536, 49152)
    assert " coffee" in w.tokens and " dog" in w.tokens
    assert w.vectors("down", 3).shape == (1536, 576)


def test_gemma3_family_norm_and_softcap(gemma_gguf):
    w = open_weights(str(gemma_gguf))
    assert w.family.name == "gemma3" and w.family.norm == "rms_1p"
    gain = w.final_norm()[0]
    # llama.cpp stores 1 + w; the reader hands back HF's w, which is centred near 0, not 1.
    assert abs(float(gain.mean())) < abs(float((gain + 1).mean()))


def test_sharded_checkpoint_reads_like_the_single_file(tiny_models, tmp_path):
    path = tiny_models("llama")
    sd = load_file(path / "model.safetensors")
    shard = tmp_path / "sharded"
    shard.mkdir()
    shutil.copy(path / "config.json", shard / "config.json")
    keys = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in parts.items():
        save_file({k: sd[k].contiguous() for k in ks}, shard / fname)
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    src = resolve_source(str(shard))
    assert len(src.files) == 2
    a = map_model(str(path), tmp_path / "a", MapOptions(dtype="float32", device="cpu"))
    b = map_model(str(shard), tmp_path / "b", MapOptions(dtype="float32", device="cpu"))
    assert _top1(a.path) == _top1(b.path)


def _fake_hub_cache(root: Path, repo: str, ckpt: Path) -> None:
    snap = root / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        shutil.copy(f, snap / f.name)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123456789abcdef")


def test_hub_id_resolves_offline_from_the_cache(tiny_models, tmp_path, monkeypatch):
    path = tiny_models("qwen2")
    _fake_hub_cache(tmp_path / "hf", "tiny-org/tiny-qwen", path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_source("tiny-org/tiny-qwen")
    assert src.kind == "checkpoint" and src.path.name == "0123456789abcdef"
    assert open_weights(src).family.name == "qwen2"


# ---------------------------------------------------------------- bad input, through the CLI


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _assert_nothing_left(parent: Path, name: str = "out"):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "a temporary directory was left behind"


def test_missing_path(capsys, tmp_path):
    code, err = _run(capsys, "map", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and "\n" not in err
    _assert_nothing_left(tmp_path)


def test_directory_that_is_no_checkout(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, "map", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert code == 2 and "is not a checkpoint directory: it has no config.json" in err
    _assert_nothing_left(tmp_path)


def test_unknown_family_from_config(capsys, tiny_models, tmp_path):
    path = tiny_models("llama")
    bad = tmp_path / "ck"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "map", str(bad), "-o", str(tmp_path / "out"))
    assert code == 2 and "unknown model family 'mamba'" in err and "gpt_neox" in err
    _assert_nothing_left(tmp_path)


def test_truncated_safetensors(capsys, tiny_models, tmp_path):
    path = tiny_models("llama")
    bad = tmp_path / "ck"
    shutil.copytree(path, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = _run(capsys, "map", str(bad), "-o", str(tmp_path / "out"))
    assert code == 2 and "it is truncated or not a safetensors file" in err
    _assert_nothing_left(tmp_path)


def test_truncated_gguf(capsys, demo_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    with open(demo_gguf, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    code, err = _run(capsys, "map", str(bad), "-o", str(tmp_path / "out"))
    assert code == 2 and "cannot read GGUF file" in err and "truncated or corrupt" in err
    _assert_nothing_left(tmp_path)


def test_tensor_of_the_wrong_shape(capsys, tiny_models, tmp_path):
    path = tiny_models("llama")
    bad = tmp_path / "ck"
    shutil.copytree(path, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(20, 16)
    save_file(sd, bad / "model.safetensors")
    code, err = _run(capsys, "map", str(bad), "-o", str(tmp_path / "out"))
    assert code == 2
    assert f"tensor model.layers.1.mlp.gate_proj.weight in {bad / 'model.safetensors'} has shape [20, 16], expected [24, 16]" in err
    _assert_nothing_left(tmp_path)


def test_hub_id_not_cached_while_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _run(capsys, "map", "meta-llama/Llama-3.1-8B", "-o", str(tmp_path / "out"))
    assert code == 2
    assert "'meta-llama/Llama-3.1-8B' is not a local path and is not in the Hugging Face cache" in err
    assert "hf download meta-llama/Llama-3.1-8B" in err
    _assert_nothing_left(tmp_path)


def test_pytorch_bin_only_checkpoint(capsys, tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"x")
    code, err = _run(capsys, "map", str(d), "-o", str(tmp_path / "out"))
    assert code == 2 and "holds PyTorch .bin weights only" in err


# ---------------------------------------------------------------- malformed inputs, one line each


def _copy(tiny_models, tmp_path, family: str = "llama") -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(tiny_models(family), ck)
    return ck


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _refusal(source) -> str:
    """open_weights and read every tensor the decode reads; return the one-line refusal."""
    with pytest.raises(NeuronmapError) as e:
        w = open_weights(str(source))
        w.head(native=True), w.head_bias(), w.final_norm()
        for layer in range(w.n_layers):
            [w.vectors(m, layer) for m in w.family.matrices], w.mlp_norm_gain(layer)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _with(changes: dict):
    def edit(cfg):
        cfg.update(changes)
        return {k: v for k, v in cfg.items() if v is not _DROP}
    return edit


_DROP = object()


@pytest.mark.parametrize("edit, message", [
    (lambda cfg: [cfg], "config.json holds a JSON list: expected an object; re-download the checkpoint"),
    (lambda cfg: "llama", "config.json holds a JSON str: expected an object"),
    (_with({"num_hidden_layers": _DROP}), "config.json has no num_hidden_layers: expected an integer of at least 1"),
    (_with({"num_hidden_layers": "2"}), "config.json says num_hidden_layers is '2': expected an integer of at least 1"),
    (_with({"num_hidden_layers": 2.5}), "config.json says num_hidden_layers is 2.5: expected an integer of at least 1"),
    (_with({"num_hidden_layers": True}), "config.json says num_hidden_layers is True: expected an integer"),
    (_with({"num_hidden_layers": -3}), "config.json says num_hidden_layers is -3: expected at least 1"),
    (_with({"num_hidden_layers": 0}), "config.json says num_hidden_layers is 0: expected at least 1"),
    (_with({"num_hidden_layers": 10**12}), "tensor model.layers.999999999999.mlp.up_proj.weight is missing from"),
    (_with({"rms_norm_eps": "small"}), "config.json says rms_norm_eps is 'small': expected a finite number of at least 0"),
    (_with({"rms_norm_eps": [1e-5]}), "config.json says rms_norm_eps is [1e-05]: expected a finite number"),
])
def test_malformed_config(tiny_models, tmp_path, edit, message):
    ck = _copy(tiny_models, tmp_path)
    _edit_json(ck / "config.json", edit)
    msg = _refusal(ck)
    assert message in msg and str(ck) in msg


def test_config_not_json_keeps_its_cause(tiny_models, tmp_path):
    ck = _copy(tiny_models, tmp_path)
    (ck / "config.json").write_text("{nope")
    with pytest.raises(NeuronmapError, match="config.json is not valid JSON") as e:
        open_weights(str(ck))
    assert isinstance(e.value.__cause__, json.JSONDecodeError)


def test_gpt2_config_without_its_layer_count(tiny_models, tmp_path):
    ck = _copy(tiny_models, tmp_path, "gpt2")
    _edit_json(ck / "config.json", _with({"n_layer": _DROP}))
    assert "config.json has no n_layer: expected an integer of at least 1" in _refusal(ck)


def test_zero_layer_config_through_the_cli(capsys, tiny_models, tmp_path):
    ck = _copy(tiny_models, tmp_path)
    _edit_json(ck / "config.json", _with({"num_hidden_layers": 0}))
    code, err = _run(capsys, "map", str(ck), "-o", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 0
    assert "config.json says num_hidden_layers is 0: expected at least 1" in err and "layers 0--1" not in err
    _assert_nothing_left(tmp_path)


def _shard(tiny_models, tmp_path) -> tuple[Path, dict]:
    """The tiny llama as one shard named in an index; returns (dir, index)."""
    ck = _copy(tiny_models, tmp_path)
    (ck / "model.safetensors").rename(ck / "model-00001-of-00001.safetensors")
    keys = load_file(ck / "model-00001-of-00001.safetensors").keys()
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}
    return ck, index


@pytest.mark.parametrize("edit, message", [
    (lambda ix: [ix], "model.safetensors.index.json holds a JSON list: expected an object"),
    (lambda ix: {"weight_map": ["a.safetensors"]}, "has weight_map \"['a.safetensors']\": expected an object mapping"),
    (lambda ix: {}, "has weight_map 'None': expected an object mapping tensor names to shard file names"),
    (lambda ix: {"weight_map": {**ix["weight_map"], "lm_head.weight": 3}}, "maps tensor lm_head.weight to 3: expected a shard file name"),
    (lambda ix: {"weight_map": {**ix["weight_map"], "lm_head.weight": "model-00002-of-00002.safetensors"}},
     "is missing shards model-00002-of-00002.safetensors named in its index: re-download them"),
    (lambda ix: {"weight_map": {**ix["weight_map"], "lm_head.weight": "../other/x.safetensors"}},
     "names shard '../other/x.safetensors' for tensor lm_head.weight, which is not a file in"),
    (lambda ix: {"weight_map": {**ix["weight_map"], "lm_head.weight": "/tmp/x.safetensors"}},
     "names shard '/tmp/x.safetensors' for tensor lm_head.weight, which is not a file in"),
])
def test_malformed_index(tiny_models, tmp_path, edit, message):
    ck, index = _shard(tiny_models, tmp_path)
    (ck / "model.safetensors.index.json").write_text(json.dumps(edit(index)))
    msg = _refusal(ck)
    assert message in msg


def test_index_shard_outside_the_checkpoint_is_refused_even_when_it_exists(tiny_models, tmp_path):
    ck, index = _shard(tiny_models, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (ck / "model-00001-of-00001.safetensors").rename(other / "x.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../other/x.safetensors" for k in index["weight_map"]}}))
    msg = _refusal(ck)
    assert "an atlas records file names only" in msg and f"move the shard into {ck}" in msg


def test_index_shard_named_through_its_own_directory_is_read(tiny_models, tmp_path):
    ck, index = _shard(tiny_models, tmp_path)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "./" + v for k, v in index["weight_map"].items()}}))
    w = open_weights(str(ck))
    assert resolve_source(str(ck)).files == (ck / "model-00001-of-00001.safetensors",)
    assert w.vectors("up", 1).shape == (24, 16)


@pytest.mark.parametrize("text, message", [
    ("not json", "tokenizer.json is not a valid tokenizer.json (not JSON:"),
    ("[1, 2]", "(it holds a JSON list, expected an object)"),
    ('{"model": {"type": "BPE"}}', "(model.vocab is missing, expected an object of piece: id)"),
    ('{"model": {"vocab": "abc"}}', "(model.vocab is a str, expected an object of piece: id)"),
    ('{"model": {"vocab": {"a": "3"}}}', "(token 'a' has id '3', expected a non-negative integer)"),
    ('{"model": {"vocab": {"a": -1}}}', "(token 'a' has id -1, expected a non-negative integer)"),
    ('{"model": {"vocab": [["a", 0.0], [5, 1.0]]}}', "model.vocab is a list whose entries are not [piece, score] pairs"),
    ('{"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 1}]}', "added_tokens is not a list of objects"),
])
def test_invalid_tokenizer_json(tiny_models, tmp_path, text, message):
    ck = _copy(tiny_models, tmp_path)
    (ck / "tokenizer.json").write_text(text)
    msg = _refusal(ck)
    assert message in msg and "re-download it, or remove it to show tokens as <id>" in msg


def test_tokenizer_ids_past_the_vocabulary_are_dropped(tiny_models, tmp_path):
    ck = _copy(tiny_models, tmp_path)
    (ck / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"Ġdog": 3, "far": 10**12}}, "decoder": {"type": "ByteLevel"}}))
    w = open_weights(str(ck))
    assert w.tokens[3] == " dog" and len(w.tokens) == 64 and "far" not in w.tokens


def _resave(ck: Path, edit) -> None:
    sd = load_file(ck / "model.safetensors")
    save_file({k: v.contiguous() for k, v in edit(sd).items()}, ck / "model.safetensors")


def test_safetensors_without_head_or_embedding(tiny_models, tmp_path):
    ck = _copy(tiny_models, tmp_path)
    _resave(ck, lambda sd: {k: v for k, v in sd.items() if k not in ("lm_head.weight", "model.embed_tokens.weight")})
    assert "has neither lm_head.weight nor model.embed_tokens.weight: expected the LM head or the token embedding" in _refusal(ck)


def _rewrite_header(f: Path, edit) -> None:
    """Rewrite a safetensors header through ``edit(header) -> header``, keeping the data bytes."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _entry_edit(name: str, **fields):
    def edit(h):
        h[name].update(fields)
        return h
    return edit


UP0 = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda h: [h], "its header is a JSON list, expected an object"),
    (_entry_edit(UP0, shape="24x16"), f"tensor {UP0} has shape '24x16', expected a list of non-negative integers"),
    (_entry_edit(UP0, shape=[24, 16.0]), f"tensor {UP0} has shape [24, 16.0], expected a list of non-negative integers"),
    (_entry_edit(UP0, shape=[-24, 16]), "expected a list of non-negative integers"),
    (_entry_edit(UP0, shape=[24, 8]), "bytes), expected 768 bytes for shape [24, 8] of F32"),
    (_entry_edit(UP0, dtype="F9"), f"tensor {UP0} has dtype 'F9', expected one of BOOL, U8"),
    (_entry_edit(UP0, dtype="F16"), "expected 768 bytes for shape [24, 16] of F16"),
    (_entry_edit(UP0, data_offsets=[0]), f"tensor {UP0} has data_offsets [0], expected [begin, end] as two integers"),
    (_entry_edit(UP0, data_offsets=[10**9, 10**9 + 1536]), "outside the file's"),
    (_entry_edit(UP0, data_offsets=[1536, 0]), "outside the file's"),
    (lambda h: {k: (v if k == "__metadata__" else {**v, "data_offsets": [0, v["data_offsets"][1] - v["data_offsets"][0]]})
                for k, v in h.items()}, "overlap in the file"),
    (lambda h: {**h, UP0: None}, f"tensor {UP0}'s entry is NoneType, expected an object"),
])
def test_malformed_safetensors_header(tiny_models, tmp_path, edit, message):
    ck = _copy(tiny_models, tmp_path)
    _rewrite_header(ck / "model.safetensors", edit)
    msg = _refusal(ck)
    assert message in msg and str(ck / "model.safetensors") in msg and "re-download or re-export it" in msg


@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.int8, "I8"), (torch.uint8, "U8"), (torch.bool, "BOOL"), (torch.int64, "I64")])
def test_integer_tensor_where_weights_are_expected(tiny_models, tmp_path, dtype, name):
    ck = _copy(tiny_models, tmp_path)
    _resave(ck, lambda sd: {**sd, "model.layers.1.mlp.down_proj.weight": torch.ones(16, 24, dtype=dtype)})
    msg = _refusal(ck)
    assert f"tensor model.layers.1.mlp.down_proj.weight in {ck / 'model.safetensors'} has dtype {name}: expected a float type" in msg


@pytest.mark.parametrize("tensor, at", [
    ("model.layers.1.mlp.gate_proj.weight", (3, 4)), ("lm_head.weight", (63, 0)),
    ("model.norm.weight", (5,)), ("model.layers.0.post_attention_layernorm.weight", (0,)),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tiny_models, tmp_path, tensor, at, value):
    ck = _copy(tiny_models, tmp_path)

    def poison(sd):
        t = sd[tensor].clone()
        t[at] = value
        return {**sd, tensor: t}

    _resave(ck, poison)
    msg = _refusal(ck)
    assert f"tensor {tensor} in {ck / 'model.safetensors'} has 1 of " in msg and "values non-finite (NaN or inf)" in msg
    assert "re-export or re-download it" in msg


def test_nan_checkpoint_maps_to_nothing(tiny_models, tmp_path):
    ck = _copy(tiny_models, tmp_path)

    def poison(sd):
        t = sd["model.layers.0.mlp.up_proj.weight"].clone()
        t[:2, :3] = float("nan")
        return {**sd, "model.layers.0.mlp.up_proj.weight": t}

    _resave(ck, poison)
    with pytest.raises(NeuronmapError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight in .* has 6 of 384 values non-finite \(NaN or inf\)"):
        map_model(str(ck), tmp_path / "out", MapOptions(dtype="float32", device="cpu"))
    _assert_nothing_left(tmp_path)


# ---------------------------------------------------------------- GGUF


GGUF_META = {"llama.block_count": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
             "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(64)]}


def gguf_tensors(seed: int = 0) -> dict:
    """The tiny llama's tensors in llama.cpp naming (HF layout, numpy): d_model 16, d_mlp 24, 64 tokens, 2 layers."""
    rng = np.random.default_rng(seed)
    t = {"token_embd.weight": (64, 16), "output.weight": (64, 16), "output_norm.weight": (16,)}
    for i in range(2):
        t |= {f"blk.{i}.ffn_gate.weight": (24, 16), f"blk.{i}.ffn_up.weight": (24, 16),
              f"blk.{i}.ffn_down.weight": (16, 24), f"blk.{i}.ffn_norm.weight": (16,)}
    return {k: (rng.standard_normal(s) * 0.5).astype(np.float32) for k, s in t.items()}


def write_tiny_gguf(path: Path, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """A tiny llama GGUF from ``meta`` (key -> value; None drops the key) and ``tensors`` (name -> array)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in (GGUF_META | (meta or {})).items():
        if val is None:
            continue
        if isinstance(val, bool):
            w.add_bool(key, val)
        elif isinstance(val, int):
            (w.add_uint32 if 0 <= val < 2**32 else w.add_int64)(key, val)
        elif isinstance(val, float):
            w.add_float32(key, val)
        elif isinstance(val, str):
            w.add_string(key, val)
        else:
            w.add_array(key, val)
    for name, arr in (gguf_tensors() if tensors is None else tensors).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_reads(tmp_path):
    w = open_weights(str(write_tiny_gguf(tmp_path / "t.gguf")))
    t = gguf_tensors()
    assert (w.family.name, w.n_layers, w.d_model, w.d_mlp, w.d_vocab, w.tokens[5]) == ("llama", 2, 16, 24, 64, "t5")
    assert torch.equal(w.vectors("down", 1), torch.from_numpy(t["blk.1.ffn_down.weight"]).T)
    assert torch.equal(w.head(), torch.from_numpy(t["output.weight"]))


def _drop(*names):
    return {k: v for k, v in gguf_tensors().items() if k not in names}


def _set(name, value):
    return gguf_tensors() | {name: value}


def _poisoned(name, value):
    t = gguf_tensors()
    t[name].flat[7] = value
    return t


@pytest.mark.parametrize("meta, tensors, message", [
    ({"llama.block_count": None}, None, "t.gguf has no llama.block_count: expected an integer of at least 1"),
    ({"llama.block_count": "2"}, None, "t.gguf says llama.block_count is '2': expected an integer of at least 1"),
    ({"llama.block_count": 0}, None, "t.gguf says llama.block_count is 0: expected at least 1"),
    ({"llama.block_count": 2**40}, None, "t.gguf says llama.block_count is 1099511627776, but has no tensor blk.1099511627775.ffn_up.weight"),
    ({"llama.attention.layer_norm_rms_epsilon": "tiny"}, None, "says llama.attention.layer_norm_rms_epsilon is 'tiny': expected a finite number"),
    ({"tokenizer.ggml.tokens": [1, 2, 3]}, None, "has tokenizer.ggml.tokens of type list: expected a list of strings"),
    ({"tokenizer.ggml.model": 3}, None, "has tokenizer.ggml.model 3: expected a string"),
    ({"general.architecture": "mamba"}, None, "unknown model family 'mamba' (GGUF general.architecture)"),
    ({}, _drop("output.weight", "token_embd.weight"), "has neither output.weight nor token_embd.weight: expected the LM head or the token embedding"),
    ({}, _drop("blk.0.ffn_up.weight"), "has no tensor blk.0.ffn_up.weight"),
    ({}, _set("blk.0.ffn_up.weight", np.ones(24, np.float32)), "tensor blk.0.ffn_up.weight in"),
    ({}, _set("blk.1.ffn_up.weight", np.ones((24, 16), np.int32)), "tensor model.layers.1.mlp.up_proj.weight in"),
    ({}, _set("output_norm.weight", np.ones(16, np.int16)), "has dtype I16: expected a float type"),
    ({}, _poisoned("blk.1.ffn_down.weight", np.nan), "tensor model.layers.1.mlp.down_proj.weight in"),
    ({}, _poisoned("output.weight", np.inf), "tensor lm_head.weight in"),
])
def test_malformed_gguf(tmp_path, meta, tensors, message):
    path = write_tiny_gguf(tmp_path / "t.gguf", meta, tensors)
    msg = _refusal(path)
    assert message in msg


def test_gguf_non_float_and_non_finite_messages(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", tensors=_set("blk.1.ffn_up.weight", np.ones((24, 16), np.int32)))
    assert f"tensor model.layers.1.mlp.up_proj.weight in {path} has dtype I32: expected a float type" in _refusal(path)
    path = write_tiny_gguf(tmp_path / "t.gguf", tensors=_poisoned("blk.1.ffn_down.weight", np.nan))
    assert f"tensor model.layers.1.mlp.down_proj.weight in {path} has 1 of 384 values non-finite (NaN or inf)" in _refusal(path)


# ---------------------------------------------------------------- the sha256 cache


def _edit_in_place_keeping_mtime(f: Path, offset: int) -> None:
    """Change one byte without changing the size, then put the mtime back, as `touch -r` would."""
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x40]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    # The kernel's coarse clock can give the edit the ctime the file already had (same tick);
    # a user cannot wait that out either way, so move on to the next tick as any later edit would be.
    while f.stat().st_ctime_ns == st.st_ctime_ns:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size


def test_sha256_sees_an_edit_whose_mtime_was_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * 64)
    before = file_sha256(f)
    assert json.loads((tmp_path / "cache" / "sha256.json").read_text()) != {}  # cached, so the next call could be fooled
    _edit_in_place_keeping_mtime(f, 1000)
    after = file_sha256(f)
    assert after != before and after == hashlib.sha256(f.read_bytes()).hexdigest()
    assert len(json.loads((tmp_path / "cache" / "sha256.json").read_text())) == 1  # the stale entry is gone
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "sha256.json"]  # no temporary left


def test_exact_search_refuses_weights_edited_with_mtime_restored(tiny_models, tmp_path, monkeypatch):
    from neuronmap.atlas.handle import Atlas
    from neuronmap.atlas.search import search

    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path / "cache"))
    ck = _copy(tiny_models, tmp_path)
    atlas = tmp_path / "atlas"
    map_model(str(ck), atlas, MapOptions(top_k=5, dtype="float32", device="cpu"))
    assert search(Atlas.open(atlas), ["<7>"]).method == "exact"  # the hash is cached now
    # A byte inside the last tensor's data, so the file still opens.
    _edit_in_place_keeping_mtime(ck / "model.safetensors", (ck / "model.safetensors").stat().st_size - 3)
    with pytest.raises(NeuronmapError, match=r"the weights changed since mapping: .*model\.safetensors has sha256"):
        search(Atlas.open(atlas), ["<7>"])


def test_packaged_gguf_cache_that_cannot_be_written(gemma_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "packaged").write_text("a file, not a directory")
    with pytest.raises(NeuronmapError, match=r"cannot write .*gemma-3-270m-q4_k_m\.gguf: .*packaged is a file, not a directory; choose another cache \(\$NEURONMAP_CACHE\) path"):
        packaged_gguf("gemma3-270m")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["packaged"]


def test_gguf_float_types_read_alike(tmp_path):
    t = gguf_tensors()
    for dtype in (np.float16, np.float64):
        path = write_tiny_gguf(tmp_path / f"{np.dtype(dtype).name}.gguf", tensors=t | {"blk.0.ffn_up.weight": t["blk.0.ffn_up.weight"].astype(dtype)})
        got = open_weights(str(path)).vectors("up", 0)
        assert got.dtype == torch.float32 and torch.allclose(got, torch.from_numpy(t["blk.0.ffn_up.weight"]), atol=1e-3)


def test_safetensors_header_length_past_the_format_limit(tmp_path):
    from neuronmap.sources.safetensors_io import MAX_HEADER, safetensors_header

    f = tmp_path / "big.safetensors"
    with open(f, "wb") as fh:
        fh.write((MAX_HEADER + 1).to_bytes(8, "little"))
        fh.truncate(MAX_HEADER + 100)  # sparse: no 100 MB written
    with pytest.raises(NeuronmapError, match=r"a header of 100000001 bytes, more than the format's limit of 100000000"):
        safetensors_header(f)
