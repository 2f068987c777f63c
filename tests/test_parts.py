"""Resumable maps (neuronmap.mapping.parts): SIGKILL at several points then --resume gives the rows of an uninterrupted map."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
N_PARTS = 6 * 3
# Each case runs real `neuronmap map` processes on a 32k-token model, some several times: minutes, not seconds.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """A random llama big enough that each (matrix, layer) takes a noticeable moment: 6 layers, 512 neurons, 32k tokens."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("medium") / "ck"
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(medium, tmp_path_factory) -> Path:
    """The uninterrupted map."""
    return map_model(str(medium), tmp_path_factory.mktemp("ref") / "atlas").path


def rows(atlas: Path):
    return pq.read_table(atlas / "neurons.parquet")


def _start(medium: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neuronmap", "map", str(medium), "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.01)


def _n_parts(out: Path) -> int:
    d = out.parent / f".{out.name}.parts"
    return len(list(d.glob("*.parquet"))) if d.is_dir() else 0


@pytest.mark.parametrize("when", ["first part", "half the parts", "assembling"])
def test_sigkill_then_resume_gives_the_same_rows(medium, reference, tmp_path, capsys, when):
    out = tmp_path / "atlas"
    proc = _start(medium, out)
    if when == "first part":
        _wait(proc, lambda: _n_parts(out) >= 1)
    elif when == "half the parts":
        _wait(proc, lambda: _n_parts(out) >= N_PARTS // 2)
    else:  # the atlas's temporary directory exists: every part is done and they are being joined
        _wait(proc, lambda: any(p.name.startswith(".atlas.") and p.name.endswith(".tmp") for p in tmp_path.iterdir()))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    kept = _n_parts(out)
    assert kept >= 1
    assert main(["map", str(medium), "-o", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"note: resuming: reusing {kept} of {N_PARTS} parts from {tmp_path / '.atlas.parts'}" in err
    if when == "assembling":
        assert "left beside atlas by a run that was killed" in err  # the dead run's temporary atlas, cleaned
    assert rows(out).equals(rows(reference))
    assert json.loads((out / "meta.json").read_text())["resumed_parts"] == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas"]  # parts and leftovers gone


def test_resume_refuses_other_options_or_weights(medium, tmp_path):
    out = tmp_path / "atlas"
    with pytest.raises(KeyboardInterrupt):
        map_model(str(medium), out, progress=lambda done, n, v: (_ for _ in ()).throw(KeyboardInterrupt()) if done == 2 else None)
    with pytest.raises(NeuronmapError, match=r"cannot resume the map into .*: the parts in .*\.atlas\.parts were made from "
                                             r"other weights or options \(top_k was 10, now 5\)"):
        map_model(str(medium), out, MapOptions(top_k=5), resume=True)
    changed = tmp_path / "changed"
    shutil.copytree(medium, changed)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(changed / "model.safetensors"))
    sd["model.layers.5.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(sd, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NeuronmapError, match=r"other weights or options \(weights was"):
        map_model(str(changed), out, resume=True)
    assert _n_parts(out) == 2  # a refused resume keeps the parts for the right command


def test_a_new_map_without_resume_removes_an_old_runs_parts_and_says_so(medium, reference, tmp_path):
    out = tmp_path / "atlas"
    with pytest.raises(KeyboardInterrupt):
        map_model(str(medium), out, progress=lambda done, n, v: (_ for _ in ()).throw(KeyboardInterrupt()) if done == 3 else None)
    r = map_model(str(medium), out)
    assert r.notes == [f"removed 3 parts of an earlier interrupted map into {out} (--resume continues one instead)"]
    assert rows(out).equals(rows(reference)) and "resumed_parts" not in r.meta
    # --resume with nothing to resume simply maps
    r = map_model(str(medium), tmp_path / "b", resume=True)
    assert r.notes == [] and rows(tmp_path / "b").equals(rows(reference))


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(medium, tmp_path):
    out = tmp_path / "atlas"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".atlas.{int(dead.stdout)}-x1y2.tmp"
    stale.mkdir()
    (stale / "neurons.parquet").write_bytes(b"half")
    live = tmp_path / f".atlas.{os.getpid()}-zz.tmp"
    live.mkdir()
    r = map_model(str(medium), out, MapOptions(layers="0", matrices="up"))
    assert r.notes == [f"removed {stale.name}, left beside atlas by a run that was killed"]
    assert not stale.exists() and live.is_dir()


def test_sigint_says_how_many_parts_are_kept_and_how_to_resume(medium, tmp_path):
    out = tmp_path / "atlas"
    proc = _start(medium, out)
    _wait(proc, lambda: _n_parts(out) >= 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    kept = _n_parts(out)
    assert proc.returncode == 130
    assert err.strip() == (f"interrupted: {kept} of {N_PARTS} parts are kept in {tmp_path / '.atlas.parts'}; run the same "
                           "command with --resume to continue")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
