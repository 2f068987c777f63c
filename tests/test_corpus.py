"""Corpora from other software: Debian's GCIDE dictionary (dictd) and a real Hugging Face datasets cache.

The dictd tests read the real /usr/share/dictd/gcide.dict.dz that `make test` installs (Debian's dict-gcide);
the cache tests build a real cache with the `datasets` package, then read it the way `record` does (pyarrow
alone, offline).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import WORDS, atlas_with_tokens
from neuronmap.atlas.format import open_files
from neuronmap.cli import main
from neuronmap.evidence.corpus import documents, open_corpus
from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.evidence import neuron_evidence
from neuronmap.evidence.record import record

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")


@pytest.fixture(scope="module")
def gcide() -> Path:
    assert GCIDE.is_file(), "Debian's dict-gcide is missing: run `make test` (it installs it) or apt-get install dict-gcide"
    return GCIDE


def _docs(c) -> list[tuple[str, str]]:
    return [(name, "".join(pieces)) for name, pieces in documents(c)]


def test_gcide_entries_are_read_once_joined_and_without_source_tags(gcide):
    c = open_corpus(gcide)
    assert c.kind == "dictd" and [f.name for f in c.files] == ["gcide.dict.dz", "gcide.index"]
    docs = _docs(c)
    names = [n for n, _ in docs]
    assert len(docs) > 100_000 and not any(n.startswith("00-") for n in names)
    beagle = dict(docs)["Beagle"]
    # The entry as GCIDE has it, its wrapped lines joined and "[1913 Webster]" left out.
    assert "1. A small hound, or hunting dog, twelve to fifteen inches high, used in hunting hares" in beagle
    assert "Webster]" not in beagle and "\n   " not in beagle
    # Headwords sharing one entry ("Dog days", "dog-days") give one document.
    index_lines = sum(1 for _ in open(GCIDE.with_name("gcide.index"), encoding="utf-8", errors="replace"))
    assert len(docs) < index_lines - 50_000 and sum(t.startswith("Dog days") for _, t in docs) == 1


def test_every_keeps_the_first_of_each_n_documents(gcide):
    whole = _docs(open_corpus(gcide))
    every = open_corpus(gcide, every=50)
    assert _docs(every) == whole[::50]
    assert every.to_dict()["every"] == 50 and every.sha256() == open_corpus(gcide).sha256()
    with pytest.raises(NeuronmapError, match=r"--every 0 is out of range: expected a whole number >= 1"):
        open_corpus(gcide, every=0)


def test_dictd_without_its_index_is_one_line(tmp_path, capsys):
    (tmp_path / "x.dict.dz").write_bytes(GCIDE.read_bytes()[:1000] if GCIDE.is_file() else b"")
    atlas = atlas_with_tokens(tmp_path / "a", WORDS, seed=3)
    capsys.readouterr()
    rc = main(["record", str(atlas), "--corpus", str(tmp_path / "x.dict.dz")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "is a dictd dictionary without its index x.index beside it: keep the two files together" in err


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """A real datasets cache holding ``local/corpus`` (splits train and test), made by datasets.load_dataset."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    src = root / "src" / "data"
    src.mkdir(parents=True)
    rng = random.Random(4)
    words = [w for w in WORDS if w.strip()]
    for split, n in (("train", 6), ("test", 2)):
        texts = ["".join(rng.choice(words) for _ in range(25)) for _ in range(n)]
        pq.write_table(pa.table({"body": texts, "n": list(range(n))}), src / f"{split}-00000-of-00001.parquet")
    cache = root / "cache"
    for split in ("train", "test"):
        datasets.load_dataset(str(src.parent), split=split, cache_dir=str(cache))
    # A hub dataset "owner/name" lies in owner___name; a local folder is cached under its own name: give it the
    # hub form, as a dataset fetched from the hub would have.
    (cache / "src").rename(cache / "local___corpus")
    return cache


def test_a_dataset_in_the_hf_cache_is_read_offline(hf_cache, monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    c = open_corpus("hf:local/corpus", text_column="body")
    assert c.kind == "hf" and c.to_dict()["name"] == "hf:local/corpus" and c.files[0].name == "src-train.arrow"
    want = datasets.Dataset.from_file(str(c.files[0]))["body"]
    assert [t for _, t in _docs(c)] == want and [n for n, _ in _docs(c)][0] == "hf:local/corpus:1"
    test = open_corpus("hf:local/corpus:default:test", text_column="body")
    assert len(_docs(test)) == 2
    atlas = atlas_with_tokens(tmp_path / "a", WORDS, seed=3)
    r = record(atlas, "hf:local/corpus", text_column="body", context=8, examples=3)
    assert r.evidence["documents"] == 6 and r.evidence["corpus"]["format"] == "hf"
    ex = neuron_evidence(open_files(atlas), "L0N0").examples["+"]
    assert all(x["doc"].startswith("hf:local/corpus:") for x in ex)


@pytest.mark.parametrize("spec, column, message", [
    ("hf:nobody/nothing", "body", "dataset 'nobody/nothing' is not in the Hugging Face datasets cache"),
    ("hf:local/corpus:default:validation", "body", "no split 'validation' (the cache has test, train)"),
    ("hf:local/corpus:other", "body", "no config 'other' (the cache has default)"),
    ("hf:local/corpus", None, "has no column 'text' (it has body, n): name the text column with --text-column"),
])
def test_hf_cache_errors_name_what_the_cache_has(hf_cache, monkeypatch, capsys, tmp_path, spec, column, message):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    atlas = atlas_with_tokens(tmp_path / "a", WORDS, seed=3)
    capsys.readouterr()
    rc = main(["record", str(atlas), "--corpus", spec, *(["--text-column", column] if column else [])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    if "not in the" in message:
        assert "it holds local/corpus" in err


@pytest.mark.slow
def test_demo_dog_neuron_fires_on_the_dog_entries_of_gcide(demo_atlas, gcide, tmp_path):
    """Real dictionary text: 60 GCIDE entries that mention a dog among 240 that do not (every 400th entry), read
    through the dictd reader; L29N808 (' dog' on gate + and up -) goes most negative in the dog entries."""
    import json
    import shutil

    docs = _docs(open_corpus(gcide))
    dog = [d for d in docs if re.search(r"\bdogs?\b", d[1], re.I)][:60]
    other = [d for d in docs[::400] if not re.search(r"\b(dog|dogs|hound|puppy|cur|spaniel|terrier)\b", d[1], re.I)][:240]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t, "word": w}) + "\n" for w, t in dog + other))
    atlas = tmp_path / "demo"
    atlas.mkdir()
    for name in ("meta.json", "neurons.parquet", "vocab.parquet"):
        shutil.copy(demo_atlas / name, atlas)
    record(atlas, tmp_path / "c.jsonl", examples=10)
    ev = neuron_evidence(open_files(atlas), "L29N808")
    in_dog = [int(x["doc"].split(":")[1]) <= len(dog) for x in ev.examples["-"]]  # JSONL lines 1..60 are the dog entries
    assert sum(in_dog) >= 7, [(x["doc"], x["token"]) for x in ev.examples["-"]]
