"""map --ray on a real local Ray cluster (2 CPUs, one per module): the same atlas, retries, one-line failures."""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray

from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.mapping.mapper import map_model
from neuronmap.mapping.part import MapOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: starting one costs seconds; map --ray uses the connection it finds."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def rows(atlas: Path):
    return pq.read_table(atlas / "neurons.parquet")


def test_tiny_model_on_ray_gives_the_single_process_atlas(cluster, ckpt, atlas, tmp_path):
    r = map_model(str(ckpt), tmp_path / "a", ray="local")
    assert r.notes == ["--ray: using the Ray cluster this process is already connected to",
                       "--ray: 6 parts in 6 tasks on 1 node(s), 2 CPU slots"]
    assert r.meta["ray"] == {"address": "local", "nodes": 1, "slots": 2, "tasks": 6}
    assert rows(r.path).equals(rows(atlas))
    assert [h["id"] for h in r.highlights] == [h["id"] for h in map_model(str(ckpt), tmp_path / "b").highlights]


def test_map_many_on_ray(cluster, tiny_models, tmp_path):
    from neuronmap.compare.series import map_many

    run = [str(tiny_models("llama", seed=1)), str(tiny_models("llama", seed=0))]
    here = map_many(run, tmp_path / "here", MapOptions(layers="1"))
    there = map_many(run, tmp_path / "there", MapOptions(layers="1"), ray="local")
    assert there.notes[0] == "--ray: using the Ray cluster this process is already connected to"
    for a, b in zip(here.atlases, there.atlases):
        assert a["name"] == b["name"] and rows(Path(a["path"])).equals(rows(Path(b["path"])))


def _kill_first_task(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first worker process of this cluster seen running a map task (its title names the task)."""
    me = psutil.Process()
    while not stop.is_set() and not killed:
        for p in me.children(recursive=True):
            try:
                if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::neuronmap-map-part"):
                    p.kill()
                    killed.append(p.pid)
                    return
            except psutil.Error:
                pass
        time.sleep(0.02)


@pytest.mark.slow
def test_two_demo_layers_on_ray_with_a_worker_killed_mid_task(cluster, tmp_path):
    ref = map_model(None, tmp_path / "ref", MapOptions(layers="0-1"))
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_task, args=(killed, stop))
    killer.start()
    try:
        r = map_model(None, tmp_path / "a", MapOptions(layers="0-1"), ray="local")
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1 and not psutil.pid_exists(killed[0])  # a worker died mid-task; Ray ran its task again
    assert r.meta["ray"]["tasks"] == 6 and r.meta["n_rows"] == ref.meta["n_rows"] == 2 * 2 * 3 * 1536
    assert rows(r.path).equals(rows(ref.path))
    assert r.highlights == ref.highlights


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", "--ray 127.0.0.1:1: cannot reach 127.0.0.1:1 (Connection refused; waited at most 5 s): "
                    "check the head's address and port (`ray status` on the head), or use --ray local"),
    ("nohost", "malformed --ray 'nohost': expected local, auto, HOST:PORT or ray://HOST:PORT"),
    ("ray://10.0.0.1:x", "malformed --ray 'ray://10.0.0.1:x'"),
])
def test_bad_address_is_one_line(address, says, cluster, ckpt, tmp_path, capsys):
    assert main(["map", str(ckpt), "-o", str(tmp_path / "a"), "--ray", address]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {says}") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_unroutable_address_fails_within_the_connect_timeout(ckpt, tmp_path):
    """192.0.2.1 (TEST-NET-1) never answers: the check gives up after its 5 s instead of Ray's minute of retries."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "neuronmap", "map", str(ckpt), "-o", str(tmp_path / "a"), "--ray",
                        "192.0.2.1:6379"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: --ray 192.0.2.1:6379: cannot reach 192.0.2.1:6379 (")
    assert len(p.stderr.strip().splitlines()) == 1


def test_without_ray_installed_says_how_to_install(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the package is absent
    assert main(["map", str(ckpt), "-o", str(tmp_path / "a"), "--ray", "local"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --ray needs Ray, which is not installed here: "
                                               "pip install 'neuronmap[ray]'")


def test_a_source_the_workers_cannot_read(cluster, tiny_models, tmp_path, capsys):
    """The driver reads the model; then it vanishes from where the workers look (a path not shared with them)."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_models("llama"), ck)

    def hide(done: int, total: int, vectors: int) -> None:  # called once before the tasks start
        ck.rename(tmp_path / "elsewhere")

    with pytest.raises(NeuronmapError) as e:
        map_model(str(ck), tmp_path / "a", ray="local", progress=hide)
    assert str(e.value).startswith(f"the Ray worker on {ray.util.get_node_ip_address()} cannot read "
                                   f"{ck / 'model.safetensors'}: every node must see the model at the same path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]
