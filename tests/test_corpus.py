"""Corpora from other software: Debian's GCIDE dictionary (dictd) and a real Hugging Face datasets cache.

The dictd tests read the real /usr/share/dictd/gcide.dict.dz that `make test` installs (Debian's dict-gcide);
the cache tests build a real cache with the `datasets` package, then read it the way `record` does (pyarrow
alone, offline).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import neuronmap
from conftest import WORDS, atlas_with_tokens
from neuronmap.atlas.handle import Atlas
from neuronmap.cli import main
from neuronmap.evidence.corpus import documents, open_corpus
from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.evidence import neuron_evidence
from neuronmap.evidence.record import RecordOptions, record

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
SRC = str(Path(neuronmap.__file__).resolve().parents[1])  # the package under test, for the CLI in a subprocess


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
    with pytest.raises(NeuronmapError, match=r"every=0 is out of range: expected a whole number >= 1"):
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
    r = record(Atlas.open(atlas), "hf:local/corpus", RecordOptions(text_column="body", context=8, examples=3))
    assert r.evidence["documents"] == 6 and r.evidence["corpus"]["format"] == "hf"
    ex = neuron_evidence(Atlas.open(atlas), "L0N0").examples["+"]
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
    record(Atlas.open(atlas), tmp_path / "c.jsonl", RecordOptions(examples=10))
    ev = neuron_evidence(Atlas.open(atlas), "L29N808")
    in_dog = [int(x["doc"].split(":")[1]) <= len(dog) for x in ev.examples["-"]]  # JSONL lines 1..60 are the dog entries
    assert sum(in_dog) >= 7, [(x["doc"], x["token"]) for x in ev.examples["-"]]


# ------------------------------------------------------------------ bounded reading, refused files, early checks


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory) -> Path:
    """The worded tiny llama, mapped: its checkpoint (``../ck``) has a real tokenizer."""
    return atlas_with_tokens(tmp_path_factory.mktemp("small"), WORDS, seed=3)


def _one_line(rc: int, err: str) -> str:
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def _long_line(seed: int) -> str:
    """20,000,000 characters of the tiny vocabulary's words, no line end."""
    words = [w for w in WORDS if w.strip()]
    line = "".join(random.Random(seed).choices(words, k=5_000_000))[:20_000_000]
    assert len(line) == 20_000_000
    return line


def test_a_20_mb_line_reaches_the_tokenizer_in_bounded_pieces(small_atlas, tmp_path):
    """One line of 20 MB: the tokenizer sees at most PIECE_CHARS characters at once, cut before a space, and the
    pieces put back together are the line."""
    from transformers import AutoTokenizer

    from neuronmap.evidence.corpus import PIECE_CHARS, sequences

    line = _long_line(5)
    (tmp_path / "long.txt").write_text(line)
    c = open_corpus(tmp_path / "long.txt")
    [(name, pieces)] = list(documents(c))
    pieces = list(pieces)
    assert name == "long.txt" and "".join(pieces) == line and len(pieces) > 20_000_000 // PIECE_CHARS
    assert max(map(len, pieces)) <= PIECE_CHARS and all(p[0] == " " for p in pieces[1:])
    tok = AutoTokenizer.from_pretrained(small_atlas.parent / "ck")
    seen = []

    def counting(text, **kw):  # the real tokenizer; only the length of what it is given is noted
        seen.append(len(text))
        return tok(text, **kw)

    first = [s for _, s in zip(range(10), sequences(c, counting, 16))]
    assert [len(s.token_ids) for s in first] == [16] * 10 and [s.start for s in first] == list(range(0, 160, 16))
    assert seen == [len(pieces[0])]  # one piece held the 160 tokens
    assert first[0].token_ids == tok(pieces[0], add_special_tokens=False)["input_ids"][:16]


def test_record_of_a_20_mb_line_stays_small(small_atlas, tmp_path):
    """The probe's case: `record --corpus` of one 20 MB line with --tokens 100 took 4.0 GB and 75 s (with the
    demo model; 3.1 GB and 98 s with this one before the line was read in pieces). The time is the bench's business;
    the memory bound is what reading in pieces guarantees."""
    atlas = tmp_path / "atlas"
    shutil.copytree(small_atlas, atlas)
    (tmp_path / "long.txt").write_text(_long_line(6))
    env = {**os.environ, "PYTHONPATH": SRC}
    # The child reports its own high-water mark (VmHWM of its own address space) as it exits: the rusage of a child
    # counts the parent's pages from before exec, which grow with everything the test session loaded before.
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: sys.stderr.write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]))\n"
            f"sys.argv = ['neuronmap', 'record', {str(atlas)!r}, '--corpus', {str(tmp_path / 'long.txt')!r}, "
            "'--tokens', '100', '--json']\n"
            "runpy.run_module('neuronmap', run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["tokens"] == 100
    peak_mb = int(p.stderr.rsplit("VmHWM:", 1)[1].split()[0]) / 1024
    assert peak_mb < 1024, peak_mb  # about 600 MB here (3.1 GB before the line was read in pieces)


def _fifo(d: Path) -> Path:

    os.mkfifo(d / "pipe.txt")
    return d / "pipe.txt"


def _link(name: str, to: str):
    def link(d: Path) -> Path:
        (d / name).symlink_to(to)
        return d / name
    return link


_zero = _link("zero.txt", "/dev/zero")


def _dir_with(make):
    def build(d: Path) -> Path:
        (d / "c").mkdir()
        (d / "c" / "a.txt").write_text(" dog dog")
        make(d / "c")
        return d / "c"
    return build


@pytest.mark.parametrize("make, message", [
    (_fifo, "pipe.txt is a named pipe, not a regular file"),
    (_zero, "zero.txt (a symlink to /dev/zero) is a device, not a regular file"),
    (_dir_with(_fifo), "pipe.txt is a named pipe, not a regular file"),
    (_dir_with(_zero), "zero.txt (a symlink to /dev/zero) is a device, not a regular file"),
    (_link("x.dict.dz", "/dev/zero"), "is a device, not a regular file"),
    (_dir_with(_link("gone.md", "nowhere")), "gone.md is a broken symlink (to nowhere)"),
])
def test_pipes_devices_and_broken_links_are_refused_in_one_line(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(NeuronmapError, match=re.escape(message)) as e:
        open_corpus(path)
    assert "\n" not in str(e.value) and "save the text to a file" in str(e.value) or "broken" in message


def test_record_of_a_named_pipe_is_one_line_not_a_hang(small_atlas, tmp_path):

    pipe = _fifo(tmp_path)
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.run([sys.executable, "-m", "neuronmap", "record", str(small_atlas), "--corpus", str(pipe),
                        "--overwrite"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr == (
        f"error: --corpus {pipe} is a named pipe, not a regular file: record reads regular files only (a pipe or "
        "device may block or never end); save the text to a file and give that\n")


def test_symlinked_folders_are_followed_each_real_folder_once(tmp_path):
    root, outside = tmp_path / "c", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.txt").write_text(" dog")
    (root / "sub" / "b.md").write_text(" tea")
    (outside / "c.txt").write_text(" river")
    (root / "linked").symlink_to(outside)
    (root / "again").symlink_to(root / "sub")  # the same folder twice: read once, under its real name
    (root / "sub" / "up").symlink_to(root)  # a loop
    c = open_corpus(root)
    assert [str(f.relative_to(root)) for f in c.files] == ["a.txt", "linked/c.txt", "sub/b.md"]
    assert dict(_docs(c)) == {"a.txt": " dog", "linked/c.txt": " river", "sub/b.md": " tea"}


def _file(name: str, data: bytes):
    def write(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return write


def _latin1(d: Path) -> Path:
    (d / "c").mkdir()
    (d / "c" / "a.txt").write_text(" dog" * 10)
    (d / "c" / "b.txt").write_bytes(b"caf\xe9 au lait")
    return d / "c"


def _parquet_ints(d: Path) -> Path:
    pq.write_table(pa.table({"text": [1, 2]}), d / "c.parquet")
    return d / "c.parquet"


@pytest.mark.parametrize("make, args, message", [
    (_file("c.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), [],
     "holds NUL bytes: it is a binary file, not text"),
    (_latin1, [], "b.txt is not UTF-8 text (it holds the byte b'\\xe9'): it is binary or in another encoding"),
    (_file("c.jsonl", b'{"body": "a dog"}\n'), [],
     "c.jsonl:1 has no field 'text' (it has body): name the text field with --text-column"),
    (_file("c.jsonl", b'{"text": 3}\n'), [],
     "field 'text' is a int, expected a string"),
    (_file("c.jsonl", b"\n\n"), [], "holds no documents: give a corpus with some text"),
    (_parquet_ints, [], "column 'text' holds int values, expected strings"),
])
def test_corpus_problems_are_found_before_the_model_loads(small_atlas, tmp_path, capsys, make, args, message):
    """--source names a model that does not exist: a corpus checked first is what the one line is about."""
    path = make(tmp_path)
    capsys.readouterr()
    rc = main(["record", str(small_atlas), "--corpus", str(path), "--overwrite", "--source", str(tmp_path / "no-model"),
               *args])
    err = _one_line(rc, capsys.readouterr().err)
    assert message in err


def test_a_damaged_corpus_parquet_is_blamed_on_the_corpus_not_the_atlas(small_atlas, tmp_path, capsys):
    rng = random.Random(7)
    words = [w for w in WORDS if w.strip()]
    texts = ["".join(rng.choice(words) for _ in range(40)) for _ in range(40)]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=20, compression="zstd")
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + 30, start + col.total_compressed_size - 10, 7):  # the second row group's pages
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert pq.ParquetFile(path).schema_arrow.names == ["text"]  # the footer still reads
    capsys.readouterr()
    err = _one_line(main(["record", str(small_atlas), "--corpus", str(path), "--overwrite"]), capsys.readouterr().err)
    assert err.startswith(f"error: --corpus {path} is damaged: its Parquet data after row ") and "Data corruption" in err
    assert "it is the corpus file that is damaged, not the atlas: replace it with a good copy" in err
    assert "map" not in err.replace("damaged", "")


def test_a_jsonl_line_longer_than_the_limit_is_refused(tmp_path):
    from neuronmap.evidence.corpus import JSONL_LINE_CHARS

    path = tmp_path / "c.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "a dog"}\n{"text": "')
        f.write("a" * JSONL_LINE_CHARS)
        f.write('"}\n')
    c = open_corpus(path)  # the first line is fine
    with pytest.raises(NeuronmapError, match=re.escape(f"c.jsonl:2 is longer than {JSONL_LINE_CHARS:,} characters, the "
                                                       "most a JSONL line may hold")):
        [list(pieces) for _, pieces in documents(c)]
