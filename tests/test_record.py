"""neuronmap record / examples: streamed evidence against a brute-force pass that keeps every activation.

The tiny llama of ``atlas_with_tokens`` has a real tokenizer (byte-level words), so
text runs through it; the brute force runs each sequence alone through
transformers with its own hooks on the down projections, with nothing of
neuronmap.evidence.record in the loop.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import neuronmap
from conftest import WORDS, atlas_with_tokens, make_tiny
from neuronmap.atlas.handle import Atlas
from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.evidence import neuron_evidence
from neuronmap.atlas.bins import N_BINS, hist_edges, positive_edges
from neuronmap.evidence.record import RecordOptions, record
from neuronmap.atlas.format import QUANTILES

ROOT = Path(__file__).resolve().parents[1]
SRC = str(Path(neuronmap.__file__).resolve().parents[1])  # the package under test, for the CLI in a subprocess
CONTEXT, EXAMPLES = 16, 5
REL = np.sqrt(33 / 32) - 1  # half a fine bin, relative (docs/method.md)
NEAR_ZERO = 2.0 ** -11


def bins_of(a: np.ndarray, per_octave: int) -> np.ndarray:
    """The bins of neuronmap.atlas.bins computed another way: a search among the edge values, by sign and magnitude."""
    j = np.searchsorted(positive_edges(per_octave), np.abs(a), side="right")
    side = len(positive_edges(per_octave))
    return np.where(np.signbit(a), side - j, side + 1 + j)


def run_cli(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _text(rng: random.Random, n: int) -> str:
    words = [w for w in WORDS if w.strip()] + [" unknownword"]
    return "".join(rng.choice(words) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A directory of three documents of the tiny vocabulary's words (one .md), lengths not multiples of CONTEXT."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (d / "a.txt").write_text(_text(rng, 203))
    (d / "sub").mkdir()
    (d / "sub" / "b.md").write_text(_text(rng, 77))
    (d / "c.txt").write_text(_text(rng, 150))
    (d / "ignored.csv").write_text("not,read\n")
    return d


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, corpus) -> Path:
    """The worded tiny atlas with evidence recorded over ``corpus`` in batches of 40 tokens (many merges)."""
    atlas = atlas_with_tokens(tmp_path_factory.mktemp("rec"), WORDS, seed=3)
    record(Atlas.open(atlas), corpus, RecordOptions(context=CONTEXT, examples=EXAMPLES, batch_tokens=40))
    return atlas


def brute_force(atlas: Path, corpus: Path) -> dict:
    """Every activation of every token: each document cut into CONTEXT-token sequences, each run alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = atlas.parent / "ck"
    tok = AutoTokenizer.from_pretrained(ck)
    model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0][0].clone()))
    acts, where, ids, nxt, end = [], [], [], [], []
    for f in sorted(p for p in corpus.rglob("*") if p.suffix in (".txt", ".md")):
        doc = tok(f.read_text(), add_special_tokens=False)["input_ids"]
        for start in range(0, len(doc), CONTEXT):
            seq = doc[start:start + CONTEXT]
            with torch.no_grad():
                model(torch.tensor([seq]))
            acts.append(torch.stack([seen[i] for i in range(len(seen))], 1).numpy())  # [seq, n_layers, d_mlp]
            where += [(str(f.relative_to(corpus)), start + p) for p in range(len(seq))]
            ids += seq
            nxt += seq[1:] + [-1]
            end += [len(ids)] * len(seq)  # where the token's sequence ends
    return {"acts": np.concatenate(acts), "where": where, "ids": np.array(ids), "next": np.array(nxt), "end": end}


@pytest.fixture(scope="module")
def brute(recorded, corpus) -> dict:
    return brute_force(recorded, corpus)


def test_top_and_bottom_examples_equal_brute_force(recorded, brute):
    files = Atlas.open(recorded)
    vocab = pq.read_table(files.vocab).column("token").to_pylist()
    acts = brute["acts"]
    index = {w: i for i, w in enumerate(brute["where"])}
    assert files.meta["evidence"]["tokens"] == len(acts) > 300
    for layer in range(2):
        for n in range(24):
            ev = neuron_evidence(files, f"L{layer}N{n}")
            a = acts[:, layer, n]
            for pole, order in (("+", np.argsort(-a, kind="stable")), ("-", np.argsort(a, kind="stable"))):
                got = ev.examples[pole]
                want = order[:EXAMPLES]
                assert [x["rank"] for x in got] == list(range(1, EXAMPLES + 1))
                np.testing.assert_allclose([x["activation"] for x in got], a[want], rtol=1e-4, atol=1e-5)
                # Each example is the token it names (ties, e.g. the same first token of two sequences, in any order).
                at = [index[(x["doc"], x["position"])] for x in got]
                assert len(set(at)) == EXAMPLES
                np.testing.assert_allclose([x["activation"] for x in got], a[at], rtol=1e-4, atol=1e-5)
                for x, i in zip(got, at):
                    assert x["token"] == vocab[brute["ids"][i]]
                    start = i - (brute["where"][i][1] % CONTEXT)  # the sequence's first token
                    assert x["before"] == [vocab[t] for t in brute["ids"][start:i]]
                    assert x["after"] == [vocab[t] for t in brute["ids"][i + 1:min(i + 5, brute["end"][i])]]


def test_quantiles_histogram_density_mean_equal_brute_force(recorded, brute):
    files = Atlas.open(recorded)
    ev = pq.read_table(files.root / "evidence.parquet").to_pandas().sort_values(["layer", "neuron"])
    acts = brute["acts"].reshape(len(brute["acts"]), -1)  # [tokens, n_layers * d_mlp], layer-major like the table
    assert files.meta["evidence"]["hist_edges"] == [float(x) for x in hist_edges()]
    for j, row in enumerate(ev.itertuples()):
        a = acts[:, j]
        exact = np.quantile(a, QUANTILES, method="inverted_cdf")
        # Within half a fine bin (1.55 % relative) for |q| in 2^-10..2^10, 2^-11 absolute next to 0: docs/method.md.
        assert np.all(np.abs(np.array(row.quantiles) - exact) <= REL * np.abs(exact) + NEAR_ZERO + 1e-5 * np.abs(exact)), (j, row.quantiles, exact)
        # The estimate lies in the fine bin of the exact value (the reading rule, bin by bin).
        assert (bins_of(np.array(row.quantiles, np.float32), 32) == bins_of(exact.astype(np.float32), 32)).all()
        want = np.bincount(bins_of(a.astype(np.float32), 4), minlength=164)
        assert list(row.hist) == want.tolist()
        assert row.density == pytest.approx((a > 0).mean(), abs=1e-6)
        assert row.mean == pytest.approx(a.mean(), rel=1e-4, abs=1e-5)
        assert (row.min, row.max) == pytest.approx((a.min(), a.max()), rel=1e-4, abs=1e-5)
    assert N_BINS == 1284 and len(hist_edges()) == 163


def _topk(atlas: Path) -> dict:
    t = pq.read_table(atlas / "neurons.parquet").to_pandas()
    return {(r.matrix, r.layer, r.neuron, r.pole): set(r.token_ids.tolist()) for r in t.itertuples()}


def test_agreement_scores_equal_brute_force(recorded, brute):
    from transformers import AutoModelForCausalLM

    files = Atlas.open(recorded)
    ag = pq.read_table(files.root / "agreement.parquet").to_pandas()
    assert len(ag) == 2 * 24 * 3 * 2
    K = _topk(recorded)
    model = AutoModelForCausalLM.from_pretrained(recorded.parent / "ck", dtype=torch.float32)
    W_U, gain = model.lm_head.weight.detach().numpy(), model.model.norm.weight.detach().numpy()
    acts = brute["acts"]
    index = {w: i for i, w in enumerate(brute["where"])}
    for r in ag.itertuples():
        a = acts[:, r.layer, r.neuron]
        # The kept examples (checked against the brute force above; ties make the choice among equals arbitrary).
        ex = neuron_evidence(files, r.id).examples
        top, bot = ([index[(x["doc"], x["position"])] for x in ex[p]] for p in "+-")
        top, bot = np.array([i for i in top if a[i] > 0], int), np.array([i for i in bot if a[i] < 0], int)
        if r.matrix == "gate":
            at = np.concatenate([top, bot]) if r.pole == "+" else np.array([], int)
        else:
            at = top if r.pole == "+" else bot
        assert r.n == len(at)
        k = K[(r.matrix, r.layer, r.neuron, r.pole)]
        nxt = [brute["next"][i] for i in at if brute["next"][i] >= 0]
        want_next = np.mean([t in k for t in nxt]) if nxt else np.nan
        want_cur = np.mean([brute["ids"][i] in k for i in at]) if len(at) else np.nan
        np.testing.assert_allclose([r.next_hit, r.current_hit], [want_next, want_cur], atol=1e-6)
        if r.matrix == "down" and len(at):
            w = model.model.layers[r.layer].mlp.down_proj.weight.detach().numpy()[:, r.neuron]
            z = W_U @ (gain * w) * (1 if r.pole == "+" else -1)
            pos = np.clip(z - z.mean(), 0, None)
            assert r.effect_share == pytest.approx(pos[list(k)].sum() / pos.sum(), rel=1e-4)
        else:
            assert np.isnan(r.effect_share)
    # The baselines are the same scores with another neuron's top-k: present wherever the score is.
    assert (ag["next_base"].isna() == ag["next_hit"].isna()).all()
    assert ag[ag.matrix == "gate"].query("pole == '-'")["n"].eq(0).all()


def test_examples_cli_json_is_the_api_payload(recorded, capsys):
    rc, out, err = run_cli(["examples", str(recorded), "L1N3", "--json"], capsys)
    assert rc == 0 and err == ""
    assert json.loads(out) == neuron_evidence(Atlas.open(recorded), "L1N3").to_dict()
    rc, out, _ = run_cli(["examples", str(recorded), "L1N3", "-n", "2"], capsys)
    assert rc == 0 and "max-activating" in out and "min-activating" in out and "quantiles: 1% " in out
    d = json.loads(run_cli(["examples", str(recorded), "L1N3", "-n", "2", "--json"], capsys)[1])
    assert [len(d["examples"][p]) for p in "+-"] == [2, 2]


def test_examples_of_an_atlas_without_evidence_says_how_to_add_it(worded, capsys):
    rc, _, err = run_cli(["examples", str(worded), "L1N3"], capsys)
    assert rc == 2 and err == (f"error: {worded} holds no activation evidence: add it with "
                               f"`neuronmap record {worded} --corpus CORPUS`\n")
    rc, _, err = run_cli(["examples", str(worded), "L7N3"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "L7N3" in err


def test_record_cli_refuses_to_replace_evidence_without_overwrite(recorded, corpus, capsys):
    rc, _, err = run_cli(["record", str(recorded), "--corpus", str(corpus)], capsys)
    assert rc == 2 and err == (f"error: {recorded} already holds activation evidence (from {corpus.name}): "
                               "pass --overwrite to replace it\n")


def test_record_refuses_another_model(recorded, corpus, tmp_path, capsys):
    other = make_tiny("llama", tmp_path / "other", seed=9)
    shutil.copy(recorded.parent / "ck" / "tokenizer.json", other)
    rc, _, err = run_cli(["record", str(recorded), "--corpus", str(corpus), "--source", str(other), "--overwrite"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {other} is not what this atlas was mapped from: none of its files has the sha256 of model.safetensors")


@pytest.mark.parametrize("make, args, message", [
    (lambda d: (d / "e.txt").write_text(""), [], "holds no text (0 bytes): give a corpus with some text"),
    (lambda d: (d / "e.txt").write_bytes(b"abc\0\x01\x02"), [], "holds NUL bytes: it is a binary file, not text"),
    (lambda d: (d / "e.txt").write_bytes(b"caf\xe9 au lait"), [], "is not UTF-8 text"),
    (lambda d: (d / "e.csv").write_text("a,b\n"), [], "unknown format '.csv': give a .txt or .md file, a directory of them, .jsonl, .parquet, a dictd .dict.dz, or hf:NAME[:CONFIG[:SPLIT]]"),
    (lambda d: (d / "e.jsonl").write_text('{"body": "x"}\n'), [], "e.jsonl:1 has no field 'text' (it has body): name the text field with --text-column"),
    (lambda d: pq.write_table(pa.table({"body": ["a dog"]}), d / "e.parquet"), ["--text-column", "content"],
     "has no column 'content' (it has body): name the text column with --text-column"),
    (lambda d: (d / "e.txt").write_text("x"), ["--text-column", "body"], "applies to .jsonl, .parquet and hf: corpora"),
    (lambda d: (d / "e").mkdir(), [], "is a directory with no .txt or .md files"),
    (lambda d: None, [], "does not exist"),
])
def test_bad_corpus_one_line(recorded, tmp_path, capsys, make, args, message):
    make(tmp_path)
    path = next(iter(sorted(tmp_path.iterdir())), tmp_path / "missing.txt")
    before = sorted(os.listdir(recorded))
    rc, _, err = run_cli(["record", str(recorded), "--corpus", str(path), "--overwrite", *args], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert sorted(os.listdir(recorded)) == before


def test_tokens_zero_is_refused_before_anything_runs(recorded, corpus, capsys):
    rc, _, err = run_cli(["record", str(recorded), "--corpus", str(corpus), "--tokens", "0"], capsys)
    assert rc == 2 and "argument --tokens: 0 is out of range: expected a whole number >= 1" in err


def test_jsonl_and_parquet_corpora_and_token_limit(tmp_path):
    atlas = atlas_with_tokens(tmp_path / "a", WORDS, seed=3)
    rng = random.Random(1)
    texts = [_text(rng, 30) for _ in range(4)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    r = record(Atlas.open(atlas), tmp_path / "c.jsonl", RecordOptions(text_column="body", tokens=50, context=8, examples=3))
    assert r.evidence["tokens"] == 50 and r.evidence["documents"] == 2 and r.evidence["corpus"]["format"] == "jsonl"
    ex = neuron_evidence(Atlas.open(atlas), "L0N0").examples["+"]
    assert {x["doc"].split(":")[0] for x in ex} == {"c.jsonl"} and all(len(x["before"]) < 8 for x in ex)
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    r = record(Atlas.open(atlas), tmp_path / "c.parquet", overwrite=True)
    assert r.evidence["tokens"] > 50 and r.evidence["documents"] == 4
    assert Atlas.open(atlas).meta["evidence"]["corpus"]["sha256"] == r.evidence["corpus"]["sha256"]


def test_damaged_evidence_file_is_caught_by_open_files(recorded, tmp_path):
    bad = tmp_path / "atlas"
    shutil.copytree(recorded, bad)
    t = pq.read_table(bad / "examples.parquet")
    pq.write_table(t.slice(0, 10), bad / "examples.parquet")
    with pytest.raises(NeuronmapError, match=r"examples.parquet has 10 rows, meta.json says .*record it again with"):
        Atlas.open(bad)
    shutil.copy(recorded / "examples.parquet", bad)
    Atlas.open(bad)
    (bad / "contexts.parquet").unlink()
    with pytest.raises(NeuronmapError, match="contexts.parquet is missing, though meta.json records activation evidence"):
        Atlas.open(bad)


def test_map_overwrite_replaces_an_atlas_with_evidence(recorded, tmp_path):
    from neuronmap.mapping.mapper import map_model

    out = tmp_path / "atlas"
    shutil.copytree(recorded, out)
    map_model(str(recorded.parent / "ck"), out, overwrite=True)
    assert "evidence" not in Atlas.open(out).meta and not (out / "examples.parquet").exists()


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_interrupted_record_leaves_the_atlas_byte_identical(recorded, tmp_path):
    atlas = tmp_path / "atlas"
    shutil.copytree(recorded, atlas)
    big = tmp_path / "big.txt"
    rng = random.Random(2)
    big.write_text("\n".join(_text(rng, 400) for _ in range(300)))
    before = _snapshot(atlas)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen([sys.executable, "-m", "neuronmap", "record", str(atlas), "--corpus", str(big), "--overwrite",
                          "--batch-tokens", "16", "--context", "16"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(n.startswith(".evidence.") for n in os.listdir(atlas)):  # recording has begun
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and err.strip().endswith("terminated: nothing was written")
    assert _snapshot(atlas) == before


def _window(x: dict) -> str:
    return "".join(x["before"] + [x["token"]] + x["after"]).lower()


def test_demo_dog_and_coffee_neurons_fire_on_their_concepts(demo_atlas, tmp_path):
    """The real demo model over tests/data/concepts.txt: three paragraphs on dogs, three on coffee, four on neither.

    L29N808 decodes to ' dog' on gate + and up -: where the text is about dogs it goes strongly negative (its
    min-activating examples); L29N750 decodes to ' coffee' on up + and fires positive in coffee paragraphs.
    """
    atlas = tmp_path / "demo"
    atlas.mkdir()
    for name in ("meta.json", "neurons.parquet", "vocab.parquet"):
        shutil.copy(demo_atlas / name, atlas)
    r = record(Atlas.open(atlas), ROOT / "tests" / "data" / "concepts.txt", RecordOptions(examples=10))
    assert r.evidence["tokens"] > 500 and r.evidence["bos"] is None  # SmolLM2's tokenizer adds no BOS to plain text
    files = Atlas.open(atlas)
    dog, coffee = neuron_evidence(files, "L29N808"), neuron_evidence(files, "L29N750")
    assert sum(any(w in _window(x) for w in ("dog", "pupp", "terrier", "beagle")) for x in dog.examples["-"]) >= 8
    assert dog.examples["-"][0]["activation"] == dog.stats["min"] < -10
    assert sum(any(w in _window(x) for w in ("coffee", "espresso", "cappuccino", "beans")) for x in coffee.examples["+"]) >= 8
    assert coffee.examples["+"][0]["activation"] > 20
    # Agreement beats the random baseline where the weights decode to the concept.
    ag = {(a["matrix"], a["pole"]): a for a in dog.agreement}
    assert ag[("up", "-")]["next_hit"] > ag[("up", "-")]["next_base"] and ag[("gate", "+")]["next_hit"] > ag[("gate", "+")]["next_base"]
    ag = {(a["matrix"], a["pole"]): a for a in coffee.agreement}
    assert ag[("up", "+")]["current_hit"] > ag[("up", "+")]["current_base"]
    for ev in (dog, coffee):
        for a in ev.agreement:
            if a["matrix"] == "down":
                assert a["effect_share"] > 5 * a["effect_base"]


def test_fast_bins_equal_the_bit_arithmetic_on_edges_and_random_bit_patterns():
    from neuronmap.atlas.bins import bin_index, bin_index_fast

    edges = torch.tensor(positive_edges(), dtype=torch.float32)
    near = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0)), torch.nextafter(edges, torch.tensor(1e9))])
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    x = torch.cat([near, -near, torch.tensor([0.0, -0.0, float("inf"), -float("inf")]),
                   bits.to(torch.int32).view(torch.float32)])
    x = x[~x.isnan()]
    assert torch.equal(bin_index_fast(x), bin_index(x))
    grid = x[:len(x) // 4 * 4].view(4, -1)  # a 2-D input comes back flattened in the same order
    assert torch.equal(bin_index_fast(grid), bin_index(grid).reshape(-1))


def _running_pair(d_mlp: int, n: int):
    from neuronmap.evidence.record import Running

    return Running(d_mlp, n, torch.device("cpu")), Running(d_mlp, n, torch.device("cpu"))


def test_native_kernel_keeps_the_same_statistics_as_the_torch_path():
    """The C kernel (csrc/record.c) against Running.add over many batches: ranks, bins, counts and sums."""
    fast, ref = _running_pair(70, 6)  # 70: one full block of 64 neurons and a partial one
    gen = torch.Generator().manual_seed(1)
    first, exact, scale = 0, np.zeros(70), np.zeros(70)
    for b in range(12):
        acts = torch.randn(3, 9, 70, generator=gen) * (0.5 + b)  # [batch, seq, d_mlp]
        if b == 0:  # the end and zero bins, once (a value repeated in later batches would tie)
            acts[0, 0, :5] = torch.tensor([0.0, -0.0, 3000.0, -3000.0, 1e-5])
        valid = torch.rand(3, 9, generator=gen) > 0.3
        rows = valid.reshape(-1).nonzero().squeeze(1)
        assert fast.add_rows(acts, rows, first) == "native"
        ref.add(acts.reshape(-1, 70)[rows].T.contiguous(), first)
        first += len(rows)
        kept = acts.reshape(-1, 70)[rows].double().numpy()
        exact, scale = exact + kept.sum(0), scale + np.abs(kept).sum(0)
    a, b = fast.finish(), ref.finish()
    for name in ("top_v", "top_i", "bot_v", "bot_i", "counts", "positive"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    # The kernel sums in double (closer than the torch path's fp32-per-batch sums): both against fp64.
    np.testing.assert_allclose(a.total, exact, rtol=0, atol=1e-12 * scale.max())
    np.testing.assert_allclose(b.total, exact, rtol=0, atol=1e-6 * scale.max())


def test_native_kernel_falls_back_with_a_reason(monkeypatch, tmp_path, recorded, corpus, capsys):
    from neuronmap.decode import native

    native.load.cache_clear()
    try:
        monkeypatch.setenv("NEURONMAP_NATIVE", "0")
        assert native.load("record") is None and native.why_not("record") == "NEURONMAP_NATIVE=0"
        atlas = tmp_path / "atlas"
        shutil.copytree(recorded, atlas)
        rc, _, err = run_cli(["record", str(atlas), "--corpus", str(corpus), "--context", str(CONTEXT), "--examples",
                              str(EXAMPLES), "--batch-tokens", "40", "--overwrite"], capsys)
        assert rc == 0 and "note: the C kernel for record was not used (NEURONMAP_NATIVE=0)" in err
        assert Atlas.open(atlas).meta["evidence"]["kernel"] == "torch"
        # The same statistics as the kernel's run (values; ties may pick another token of equal activation).
        a, b = (pq.read_table(x / "evidence.parquet").to_pandas() for x in (atlas, recorded))
        np.testing.assert_array_equal(np.stack(a["hist"]), np.stack(b["hist"]))
        np.testing.assert_array_equal(np.stack(a["quantiles"]), np.stack(b["quantiles"]))
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a["density"], b["density"])
        assert Atlas.open(recorded).meta["evidence"]["kernel"] == "native"
        native.load.cache_clear()
        monkeypatch.delenv("NEURONMAP_NATIVE")
        monkeypatch.setitem(native.KERNELS, "record", native.Kernel(needs=("no_such_isa",)))
        assert native.load("record") is None and native.why_not("record") == "this CPU lacks no_such_isa"
        monkeypatch.setitem(native.KERNELS, "record", native.Kernel())
        native.load.cache_clear()
        monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", "false")  # a compiler that always fails
        assert native.load("record") is None
        assert native.why_not("record").startswith("the C compiler failed")
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))  # nothing half-built left
        fast, ref = _running_pair(8, 3)
        acts = torch.randn(2, 4, 8)
        rows = torch.arange(8)
        assert fast.add_rows(acts, rows, 0) == "torch"  # the same statistics by the torch path
        ref.add(acts.reshape(-1, 8).T.contiguous(), 0)
        np.testing.assert_array_equal(fast.finish().counts, ref.finish().counts)
    finally:
        native.load.cache_clear()


def test_show_carries_the_evidence_examples_prints(recorded, capsys):
    from neuronmap.atlas.search import show

    files = Atlas.open(recorded)
    rep = show(files, "L1N3", stored=True, examples=2)
    assert rep.to_dict()["evidence"] == neuron_evidence(files, "L1N3", 2).to_dict()
    rc, out, _ = run_cli(["show", str(recorded), "L1N3", "--stored", "-n", "2", "--json"], capsys)
    assert rc == 0 and json.loads(out)["evidence"]["examples"]["+"] == rep.to_dict()["evidence"]["examples"]["+"]
    assert len(json.loads(out)["evidence"]["examples"]["-"]) == 2
    rc, out, _ = run_cli(["show", str(recorded), "L1N3", "--stored"], capsys)
    assert rc == 0 and "max-activating contexts" in out and "Agreement with the decoded top-k" in out


def test_search_sort_agreement_ranks_by_next_token_hits(recorded, capsys):
    from neuronmap.atlas.search import POOL, search

    files = Atlas.open(recorded)
    by_prob = search(files, ["dog"], top=200, stored=True)
    by_agree = search(files, ["dog"], top=5, stored=True, sort="agreement")
    a = by_agree.table["agreement"].fillna(-1).tolist()
    assert a == sorted(a, reverse=True) and list(by_agree.table["rank"]) == list(range(1, len(a) + 1))
    # The pool is the best POOL x top rows by probability; each hit's score is its agreement.parquet next_hit.
    pool = by_prob.table.head(5 * POOL)
    assert set(by_agree.table["id"] + by_agree.table["matrix"] + by_agree.table["pole"]) <= \
        set(pool["id"] + pool["matrix"] + pool["pole"])
    ag = pq.read_table(recorded / "agreement.parquet").to_pandas().set_index(["id", "matrix", "pole"])
    for h in by_agree.table.itertuples():
        want = ag.loc[(h.id, h.matrix, h.pole), "next_hit"]
        assert (np.isnan(want) and h.agreement is None or np.isnan(h.agreement)) or h.agreement == pytest.approx(want)
    assert max(a) >= max(by_prob.table["agreement"].fillna(-1).head(5))
    rc, out, _ = run_cli(["search", str(recorded), "dog", "--stored", "--sort", "agreement"], capsys)
    assert rc == 0 and "agreement (base)" in out


def test_search_sort_agreement_without_evidence_is_one_line(worded, capsys):
    rc, _, err = run_cli(["search", str(worded), "dog", "--sort", "agreement"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "holds no activation evidence to sort by: run `neuronmap record" in err


def test_stats_adds_agreement_against_depth(recorded, worded, tmp_path, capsys):
    from PIL import Image

    from neuronmap.atlas.stats import stats

    want = Atlas.open(recorded).meta["evidence"]["agreement"]
    assert stats(Atlas.open(recorded)).to_dict()["agreement"] == want and len(want) == 2 * 3 * 2
    assert stats(Atlas.open(worded)).to_dict()["agreement"] is None
    assert run_cli(["stats", str(recorded), "--plot", str(tmp_path / "s.png")], capsys)[0] == 0
    assert run_cli(["stats", str(worded), "--plot", str(tmp_path / "t.png")], capsys)[0] == 0
    # Agreement adds a row of panels (next- and current-token hits against depth) to the figure.
    assert Image.open(tmp_path / "s.png").size[1] > 1.3 * Image.open(tmp_path / "t.png").size[1]


def test_examples_beyond_the_limit_are_refused_before_anything_runs(recorded, corpus, capsys):
    """The probe's `--examples 100000` tried to allocate ~110 GB for the demo model."""
    from neuronmap.evidence.record import MAX_EXAMPLES

    before = _snapshot(recorded)
    rc, _, err = run_cli(["record", str(recorded), "--corpus", str(corpus), "--examples", "100000", "--overwrite"], capsys)
    assert rc == 2 and err == (f"error: --examples 100000 is out of range: expected a whole number from 1 to {MAX_EXAMPLES} "
                               "(each example kept costs 24 bytes a neuron while recording and a row a neuron and pole "
                               "in examples.parquet)\n")
    assert MAX_EXAMPLES == 100 and _snapshot(recorded) == before
    with pytest.raises(SystemExit):
        main(["record", "--help"])
    assert "kept per neuron, at most 100 (default 20)" in " ".join(capsys.readouterr().out.split())


def _republished(recorded: Path, out: Path, change) -> Path:
    """A copy of ``recorded`` whose examples.parquet is ``change``d, written by ``publish`` as record writes it."""
    from neuronmap.core import fsio
    from neuronmap.atlas.evidence import publish
    from neuronmap.atlas.format import EXAMPLES_SCHEMA, SCHEMAS

    shutil.copytree(recorded, out)
    files = Atlas.open(out)
    built = {k: pq.read_table(out / f"{k}.parquet") for k in SCHEMAS}
    df = built["examples"].to_pandas()
    change(df, (df["id"] == "L1N3") & (df["pole"] == "+") & (df["rank"] == 1))
    built["examples"] = pa.Table.from_pandas(df, schema=EXAMPLES_SCHEMA, preserve_index=False)
    tmp = fsio.temp_dir_beside(out / "evidence", "atlas")
    try:
        publish(files, tmp, built, files.meta["evidence"])
    finally:
        fsio.remove_tree(tmp)
    return out


def _past_the_end(df, at) -> None:
    df.loc[at, "position"] = 999


def _no_such_sequence(df, at) -> None:
    df.loc[at, "seq"] = 10**9


@pytest.mark.parametrize("change, where", [
    (_past_the_end, r"points to position 999 of sequence \d+, which has \d+ tokens in contexts.parquet"),
    (_no_such_sequence, r"points to position \d+ of sequence 1000000000, which has no row in contexts.parquet"),
])
def test_examples_pointing_past_their_sequences_are_one_line(recorded, tmp_path, capsys, change, where):
    atlas = _republished(recorded, tmp_path / "atlas", change)
    rc, _, err = run_cli(["examples", str(atlas), "L1N3"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert re.fullmatch(rf"error: {re.escape(str(atlas / 'examples.parquet'))}: example \+1 of L1N3 {where}: the "
                        rf"evidence files disagree; record it again with `neuronmap record {re.escape(str(atlas))} "
                        r"--corpus \S+ --overwrite`\n", err), err
    assert run_cli(["examples", str(atlas), "L1N4"], capsys)[0] == 0  # the other neurons still read


def test_a_signal_while_stderr_is_redirected_still_prints_its_line():
    """A model load redirects sys.stderr (to hide the GGUF converter's bar); SIGTERM then exited 143 with no line."""
    code = ("import contextlib, io, os, signal, time\n"
            "from neuronmap.core.fsio import exit_on_signals\n"
            "exit_on_signals()\n"
            "with contextlib.redirect_stderr(io.StringIO()):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and p.stderr == "terminated: nothing was written\n"


def test_sigterm_while_record_loads_the_demo_model_prints_one_line(demo_atlas, tmp_path):
    atlas = tmp_path / "demo"
    atlas.mkdir()
    for name in ("meta.json", "neurons.parquet", "vocab.parquet"):
        shutil.copy(demo_atlas / name, atlas)
    before = _snapshot(atlas)
    p = subprocess.Popen([sys.executable, "-m", "neuronmap", "record", str(atlas), "--corpus",
                          str(ROOT / "tests" / "data" / "concepts.txt")], env={**os.environ, "PYTHONPATH": SRC},
                         stderr=subprocess.PIPE, text=True)
    # Only the load maps the GGUF into memory (its sha256 is read with plain reads, and cached): mapped, it is loading.
    deadline = time.time() + 120
    while ".gguf" not in Path(f"/proc/{p.pid}/maps").read_text():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and err == "terminated: nothing was written\n"
    assert _snapshot(atlas) == before
