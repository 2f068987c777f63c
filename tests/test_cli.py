"""The command's error path: one line and a non-zero exit for bad options, unwritable outputs, limits and signals."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from neuronmap.cli import main


def _run(*argv: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "neuronmap", *argv], capture_output=True, text=True, cwd=cwd, env=env, **kw)


def _one_line(text: str, *fragments: str) -> None:
    text = text.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    for f in fragments:
        assert f in text, text


# ------------------------------------------------------------------ options: refused at parse time, in one line


@pytest.mark.parametrize("argv, says", [
    (["map", "-o", "x", "--top-k", "0"], "argument --top-k: 0 is out of range: expected a whole number >= 1"),
    (["map", "-o", "x", "--top-k", "ten"], "argument --top-k: 'ten' is not an integer"),
    (["show", "a", "L0N1", "--tokens", "-3"], "argument --tokens: -3 is out of range"),
    (["compare", "a", "b", "--top", "-1"], "argument --top: -1 is out of range: expected a whole number >= 0"),
    (["compare", "a", "b", "--min-prob", "nan"], "argument --min-prob: nan is out of range: expected a number from 0 to 1"),
    (["search", "a", "dog", "--min-prob", "2"], "argument --min-prob: 2 is out of range"),
    (["generate", "--clamp", "L0N1=1", "--prompt", "hi", "-n", "0"], "argument -n: 0 is out of range"),
    (["generate", "--clamp", "L0N1=1", "--prompt", "hi", "--temperature", "nan"], "argument --temperature: nan is out of range"),
    (["generate", "--clamp", "L0N1=1", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: -1 is out of range"),
    (["verify", "a", "dog", "--min-ratio", "inf"], "argument --min-ratio: inf is out of range"),
    (["clamp", "--concept", "dog", "--neuron"], "argument --neuron: expected one argument"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
])
def test_bad_options_one_line_before_any_work(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, says, "see `neuronmap")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, says", [
    (["--matrices", ","], "--matrices ',' names no matrix"),
    (["--layers", "1-0"], "the range 1-0 is reversed; write it low-high, e.g. 0-1"),
])
def test_map_options_checked_against_the_model(argv, says, ckpt, tmp_path, capsys):
    assert main(["map", str(ckpt), "-o", str(tmp_path / "o"), *argv]) == 2
    _one_line(capsys.readouterr().err, says)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ outputs that cannot be written


@pytest.mark.parametrize("out, says", [
    ("/proc/neuronmap-x", "cannot write /proc/neuronmap-x"),
    ("{tmp}/file/sub", "{tmp}/file is a file, not a directory"),
    (".", "is not a neuronmap atlas"),
])
def test_unwritable_atlas_output(out, says, ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert main(["map", str(ckpt), "-o", out.format(tmp=tmp_path), "--overwrite"]) == 2
    _one_line(capsys.readouterr().err, says.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("cmd", ["stats", "compare"])
def test_unwritable_plot(cmd, atlas, tmp_path, capsys):
    argv = ["stats", str(atlas)] if cmd == "stats" else ["compare", str(atlas), str(atlas)]
    assert main([*argv, "--plot", "/proc/neuronmap-x.png"]) == 2
    _one_line(capsys.readouterr().err, "cannot write /proc/neuronmap-x.png")


@pytest.mark.parametrize("typed", [":dog:", "[bold]L1N2[/bold]", "[/]", ":thumbs_up: [red]x"])
def test_user_input_is_echoed_as_typed(typed, atlas, capsys):
    """Rich would turn ':dog:' into an emoji and '[bold]' into style, so a message showed something else than typed."""
    assert main(["show", str(atlas), typed]) == 2
    assert capsys.readouterr().err.strip() == (f"error: malformed neuron id {typed!r}: expected L{{layer}}N{{index}} in "
                                               "ASCII digits, e.g. L29N808")


def test_file_size_limit_while_writing(ckpt, tmp_path):
    """A disk that fills up mid-write: one line, exit 2, and no half-written atlas or temporary directory."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    r = _run("map", str(ckpt), "-o", str(tmp_path / "a"), cwd=tmp_path, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    # The first part it writes hits the limit; with no part finished there is nothing to resume, so nothing is kept.
    _one_line(r.stderr, f"cannot write {tmp_path / '.a.parts' / 'gate-L0.parquet'}: ", "File too large",
              "raise the file-size limit")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ signals


def _wait_for_tmp(parent: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not any(p.name.endswith(".tmp") for p in parent.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, says", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_map_keeps_the_finished_parts_and_says_how_to_resume(sig, code, says, tmp_path):
    """The real demo model: a signal once a part is finished leaves no atlas, keeps the parts and names --resume."""
    work = tmp_path / "w"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    argv = [sys.executable, "-m", "neuronmap", "map", "-o", str(work / "a"), "--layers", "0-9"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    while not list((work / ".a.parts").glob("*.parquet")) if (work / ".a.parts").is_dir() else True:
        assert proc.poll() is None and time.monotonic() - t0 < 300, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    kept = sorted(p.name for p in (work / ".a.parts").glob("*.parquet"))
    assert 1 <= len(kept) < 30
    assert err.strip() == (f"{says}: {len(kept)} of 30 parts are kept in {work / '.a.parts'}; run the same command with "
                           "--resume to continue")
    assert sorted(p.name for p in work.iterdir()) == [".a.parts"]  # no atlas, no temporary beside it


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3, 0.6])
def test_ctrl_c_at_start_up_gives_no_traceback(delay, atlas):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "neuronmap", "stats", str(atlas)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if "Traceback" in err:
        # On a loaded machine the signal can land while CPython is still importing its own start-up modules
        # (runpy and importlib for `-m`, and the standard library modules they import, such as contextlib), before
        # any line of neuronmap runs: CPython prints that traceback itself, and no program can intercept it. Every
        # frame is then CPython's own start-up code; a frame of ours (neuronmap/__main__.py installs the handler first
        # thing) or of any installed package would be our bug.
        stdlib = sysconfig.get_paths()["stdlib"]
        frames = re.findall(r'File "([^"]+)"', err)
        assert frames and "KeyboardInterrupt" in err, err
        assert all(f.startswith("<frozen") or (f.startswith(stdlib) and "site-packages" not in f) for f in frames), err
        return
    # Killed before Python set up its handler (-2), interrupted (130), or already done (0).
    assert proc.returncode in (0, 130, -signal.SIGINT), err
    if proc.returncode == 130:
        assert err.strip() == "interrupted: nothing was written"
