"""``map --ray``: the parts of a map as (matrix, layer-range) tasks on a Ray cluster.

Each task opens the model on its worker and reads only what it decodes: the
final norm and LM head, then its own layers' matrices, one at a time
(``part.map_part``, the code a single-process map runs). The model must be
readable at the same path on every node (a shared filesystem), or, for a hub id,
be in each node's Hugging Face cache; a worker that cannot read it says so in
one line. Tasks return their parts' rows to this process, which writes each part
into ``.NAME.parts`` as it arrives (``neuronmap.mapping.parts``: so ``--resume`` works for
cluster runs too, and the output need not be on a filesystem the workers share),
and the atlas is assembled exactly as after a single-process map.

A task whose worker process dies (killed, out of memory, a lost node) is retried
by Ray up to ``MAX_RETRIES`` times; an error in the task itself (a corrupt
tensor) is not retried and ends the map with its one-line message; a task that
still fails ends it with ``ResumableError``, keeping the finished parts. Ray is an
optional dependency: ``pip install 'neuronmap[ray]'``.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Callable

from neuronmap.core.errors import NeuronmapError, ResumableError
from neuronmap.sources.resolve import looks_like_hub_id, resolve_source
from neuronmap.sources.weights import Source

INSTALL = "pip install 'neuronmap[ray]'"
CONNECT_TIMEOUT_S = 5.0
MAX_RETRIES = 3
TASKS_PER_SLOT = 4  # small tasks balance the load and lose little to a retry; each re-reads only the head


def import_ray():
    """The ``ray`` module.

    Raises:
        NeuronmapError: Ray is not installed, with the command that installs it.
    """
    try:
        import ray
    except ImportError as e:
        raise NeuronmapError(f"ray=... needs Ray, which is not installed here: {INSTALL}") from e
    return ray


def check_address(address: str) -> tuple[str, int] | None:
    """Where a ``--ray`` address points, checked to answer within ``CONNECT_TIMEOUT_S``.

    Args:
        address: ``local``, ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``.

    Returns:
        ``(host, port)``, or None for ``local`` and ``auto``.

    Raises:
        NeuronmapError: a malformed address, or nothing answers there.

    Example:
        >>> check_address("local") is None
        True
    """
    if address in ("local", "auto"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    # isdigit() alone takes "²" and "٥" (int() then fails or reads them as ASCII); a port is at most 5 ASCII digits.
    if not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 < int(port) < 65536:
        raise NeuronmapError(f"malformed ray={address!r}: expected local, auto, HOST:PORT or ray://HOST:PORT "
                             "(the head's address from `ray start --head`)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else e.strerror or type(e).__name__
        raise NeuronmapError(f"ray={address}: cannot reach {host}:{port} ({why}; waited at most {CONNECT_TIMEOUT_S:g} s): "
                             "check the head's address and port (`ray status` on the head), or use ray=local") from e
    return host, int(port)


def connect(address: str, note: Callable[[str], None]) -> bool:
    """Connect this process to a Ray cluster, unless it already is.

    Returns:
        True when this call started or joined a cluster (the caller shuts it down), False when one was in use.

    Raises:
        NeuronmapError: Ray missing, a bad or unreachable address, no running cluster for ``auto``.
    """
    ray = import_ray()
    check_address(address)
    if ray.is_initialized():
        note("--ray: using the Ray cluster this process is already connected to")
        return False
    kw = dict(logging_level="ERROR", log_to_driver=False, configure_logging=True)
    try:
        if address == "local":
            ray.init(include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError) as e:
        raise NeuronmapError(f"ray={address}: no Ray cluster to connect to ({_first(e)}): start one with "
                             "`ray start --head`, set RAY_ADDRESS, or use ray=local") from e
    return True


def _first(e: BaseException, n: int = 160) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[-1][:n] if lines else type(e).__name__


def _worker_source(src: Source) -> Source:
    """The driver's source as this worker sees it; the files must be there, with the driver's sizes.

    Raises:
        NeuronmapError: a file is missing or differs on this node.
    """
    import ray

    node = ray.util.get_node_ip_address()
    here = src
    if not all(f.is_file() for f in src.files) and src.kind == "checkpoint" and looks_like_hub_id(src.spec):
        here = resolve_source(src.spec)  # the node's own hub cache
    for want, f in zip(src.files, here.files):
        if not f.is_file():
            raise NeuronmapError(
                f"the Ray worker on {node} cannot read {f}: every node must see the model at the same path "
                "(a shared filesystem; for a hub id, each node's Hugging Face cache); copy it there or use ray=local")
        if f.stat().st_size != want.stat().st_size if want.exists() else False:
            raise NeuronmapError(f"{f} differs on {node} ({f.stat().st_size:,} bytes) from the driver's copy "
                                 f"({want.stat().st_size:,} bytes): give every node the same model files")
    return here


def map_task(src: Source, options, dtype: str, compiled: bool, items: list[tuple[str, int]]) -> dict:
    """One Ray task: decode the parts ``items`` ((matrix, layer), one matrix, consecutive layers) on this worker.

    Returns:
        ``{"parts": [(matrix, layer, tables, best)], "device", "kernel", "timings", "pid"}``.

    Raises:
        NeuronmapError: the model is unreadable here, or a tensor is bad.
    """
    import time

    import pyarrow as pa
    import ray
    import torch

    from neuronmap.decode.engine import build_head, compiled_reduce, kernel_used, reduce_logits, resolve_device
    from neuronmap.mapping.part import map_part
    from neuronmap.sources.resolve import open_weights

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    weights = open_weights(_worker_source(src))
    device = resolve_device(options.device)
    reduce = compiled_reduce if compiled else reduce_logits
    t = time.perf_counter()
    head = build_head(weights, options.norm, device, dtype)
    timings = {"read_s": time.perf_counter() - t, "decode_s": 0.0, "write_s": 0.0}
    vocab = pa.array(list(weights.tokens), pa.string())
    done = [(m, layer, *map_part(weights, head, m, layer, options, reduce, vocab, timings)) for m, layer in items]
    return {"parts": done, "device": str(device), "timings": timings, "pid": os.getpid(),
            "kernel": kernel_used(reduce, weights.d_vocab, dtype, str(device), options.top_k)}


def plan(todo: list[tuple[str, int]], slots: int) -> list[list[tuple[str, int]]]:
    """Split the parts into tasks: one matrix each, consecutive layers, about ``TASKS_PER_SLOT`` tasks per slot.

    Example:
        >>> plan([("up", 0), ("up", 1), ("down", 0)], 1)
        [[('up', 0)], [('up', 1)], [('down', 0)]]
    """
    size = max(1, math.ceil(len(todo) / (TASKS_PER_SLOT * max(1, slots))))
    tasks = []
    for m in dict.fromkeys(mat for mat, _ in todo):
        mine = [t for t in todo if t[0] == m]
        tasks += [mine[i:i + size] for i in range(0, len(mine), size)]
    return tasks


def run(src: Source, options, dtype: str, compiled: bool, todo: list[tuple[str, int]],
        finished: Callable[..., None], address: str, notes: list[str]) -> tuple[str, str, dict, dict]:
    """Decode the parts ``todo`` as Ray tasks, handing each part to ``finished`` as its task returns.

    Args:
        src: the source as the driver resolved it (paths made absolute here).
        options: the ``MapOptions``; ``dtype`` resolved; ``compiled``: use the torch.compile kernel.
        todo: (matrix, layer) parts still to do.
        finished: called as ``finished(matrix, layer, tables, best)`` per part, in this process (it writes the part).
        address: ``--ray``'s value.
        notes: one-line notes are appended (the cluster used).

    Returns:
        ``(device, kernel, timings, cluster)``: where the workers decoded, which kernel they ran, the time of each
        stage summed over tasks, and ``{"address", "nodes", "slots", "tasks"}``.

    Raises:
        NeuronmapError: Ray missing or unreachable; a task's own error (a bad tensor, an unreadable model).
        ResumableError: a task whose worker died more than ``MAX_RETRIES`` times.

    Example:
        >>> run(src, MapOptions(), "float32", False, [("up", 0)], write, "local", [])[3]["tasks"]  # doctest: +SKIP
        1
    """
    ray = import_ray()
    started = connect(address, notes.append)
    try:
        gpu = str(options.device).startswith("cuda")
        slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1))
        src = replace(src, path=Path(src.path).resolve(), files=tuple(Path(f).resolve() for f in src.files))
        task = ray.remote(map_task).options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=MAX_RETRIES,
                                            retry_exceptions=False, name="neuronmap-map-part")
        groups = plan(todo, slots)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        notes.append(f"--ray: {len(todo)} parts in {len(groups)} tasks on {nodes} node(s), {slots} {'GPU' if gpu else 'CPU'} slots")
        pending = {task.remote(src, options, dtype, compiled, g): g for g in groups}
        timings: dict = {}
        devices, kernels = set(), set()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    out = _get(ray, ref, pending.pop(ref))
                    for part in out["parts"]:
                        finished(*part)
                    devices.add(out["device"])
                    kernels.add(out["kernel"])
                    for k, v in out["timings"].items():
                        timings[k] = timings.get(k, 0.0) + v
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        cluster = {"address": address, "nodes": nodes, "slots": slots, "tasks": len(groups)}
        return ",".join(sorted(devices)) or str(options.device), ",".join(sorted(kernels)) or "eager", timings, cluster
    finally:
        if started:
            ray.shutdown()


def _get(ray, ref, items) -> dict:
    """A task's result; its failure as one line."""
    what = f"{items[0][0]} layers {items[0][1]}-{items[-1][1]}"
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, NeuronmapError):
            raise NeuronmapError(str(e.cause)) from None
        raise NeuronmapError(f"the Ray task for {what} failed ({type(e.cause).__name__}: {_first(e.cause)})") from None
    except ray.exceptions.RayError as e:
        raise ResumableError(f"the Ray task for {what} failed after {MAX_RETRIES} retries ({type(e).__name__}: "
                             f"{_first(e)}): check the workers' memory and logs (`ray logs`)") from None
