"""Sources: the packaged real models through GGUF and safetensors, the hub cache, sharded checkpoints, bad input."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from neuronmap.cli import main
from neuronmap.errors import NeuronmapError
from neuronmap.mapper import MapOptions, map_model
from neuronmap.sources import open_weights, resolve_source


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
    assert "tensor model.layers.1.mlp.gate_proj.weight has shape [20, 16], expected [24, 16]" in err
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
