"""Benchmarks: neuronmap against the hardware's limit and against the naive way, each ratio measured in one run.

Usage:
    python bench/run.py                 # demo model, Llama-3.2-1B shape (layer 0 timed), 8B-sized atlases (search, compare,
                                        # viewer pages), steering in the viewer
    python bench/run.py --llama8b       # adds the whole Llama-3.1-8B up matrix, end to end (long)
    python bench/run.py --case NAME     # one case, in this process (used internally)

Each case runs in its own subprocess, so its peak resident memory is its own; synthetic checkpoints are written by
yet another subprocess first (their generation would otherwise count). Results go to bench/results/<case>.json,
and the table between the bench markers of docs/benchmarks.md is rebuilt from every result there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# name -> model shape, matrices, layers mapped in bf16 (None: all), layers for the fp32, split, bare and naive figures;
# `dtypes`: the maps run (default all three); `repeat`: matrices and layers of the split-vs-bare-bf16 repeats.
SHAPES = {
    "llama-3.2-1b": dict(n_layers=16, d_model=2048, d_mlp=8192, d_vocab=128256, tied=True, heads=32, kv_heads=8,
                         matrices="gate,up,down", bf16_layers="0", timed_layers="0", repeat=("up", "0")),
    "llama-3.1-8b-up": dict(n_layers=32, d_model=4096, d_mlp=14336, d_vocab=128256, tied=False, heads=32, kv_heads=8,
                            matrices="up", bf16_layers=None, timed_layers="0"),
    # The 8B up matrix's layer 0 only, split against the bare bf16 product: the whole map extrapolated by 32 layers.
    "llama-3.1-8b-up-l0": dict(n_layers=32, d_model=4096, d_mlp=14336, d_vocab=128256, tied=False, heads=32, kv_heads=8,
                               matrices="up", bf16_layers="0", timed_layers="0", dtypes=("split",), repeat=None),
    # The default map alone on the 1B shape (`--only llama-3.2-1b-split`): a quick check when the machine is busy.
    "llama-3.2-1b-split": dict(n_layers=16, d_model=2048, d_mlp=8192, d_vocab=128256, tied=True, heads=32, kv_heads=8,
                               matrices="gate,up,down", bf16_layers="0", timed_layers="0", dtypes=("split",),
                               repeat=("up", "0")),
}
DEMO_REPEAT = ("up", "0-9")  # the demo's split-vs-bare-bf16 repeats


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "date": time.strftime("%Y-%m-%d"),
    }


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def io_read_mb() -> float:
    import psutil

    # read_chars counts bytes through read(); neuronmap reads safetensors that way (GGUF is mmapped: a lower bound).
    io = psutil.Process().io_counters()
    return getattr(io, "read_chars", io.read_bytes) / 2**20


def bare_product_seconds(n_vectors: int, d_model: int, d_vocab: int, device: str, dtype, rows: int = 256) -> float:
    """The hardware's limit for this work: the same total ``[n_vectors, d_model] x [d_model, d_vocab]`` product."""
    import torch

    g = torch.Generator().manual_seed(0)
    W = (torch.randn(d_vocab, d_model, generator=g) * 0.02).to(device=device, dtype=dtype)  # [d_vocab, d_model]
    x = torch.randn(rows, d_model, generator=g).to(device=device, dtype=dtype)  # [rows, d_model]
    x @ W.T  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    done = 0
    while done < n_vectors:
        x @ W.T
        done += rows
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * n_vectors / done


def make_checkpoint(out: Path, shape: dict, layers: list[int]) -> None:
    """A llama-family safetensors checkpoint of ``shape`` with random bf16 MLP weights in ``layers``.

    Attention weights are left out (map never reads them; transformers initialises them when the naive way
    loads the model); where only some layers are timed, the checkpoint stops after the last of them.
    """
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    d, f, v = shape["d_model"], shape["d_mlp"], shape["d_vocab"]
    # Only the layers written: the checkpoint must be complete to open; figures are extrapolated to shape["n_layers"].
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": max(layers) + 1,
           "hidden_size": d, "intermediate_size": f, "vocab_size": v, "num_attention_heads": shape["heads"],
           "num_key_value_heads": shape["kv_heads"], "head_dim": d // shape["heads"], "rms_norm_eps": 1e-5,
           "hidden_act": "silu", "max_position_embeddings": 8192, "rope_theta": 500000.0,
           "tie_word_embeddings": shape["tied"], "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg))
    sd = {"model.embed_tokens.weight": (torch.randn(v, d, generator=g) * 0.02).bfloat16(),
          "model.norm.weight": (1 + 0.1 * torch.randn(d, generator=g)).bfloat16()}
    if not shape["tied"]:
        sd["lm_head.weight"] = (torch.randn(v, d, generator=g) * 0.02).bfloat16()
    for i in layers:
        for m in ("gate", "up"):
            sd[f"model.layers.{i}.mlp.{m}_proj.weight"] = (torch.randn(f, d, generator=g) * 0.02).bfloat16()
        sd[f"model.layers.{i}.mlp.down_proj.weight"] = (torch.randn(d, f, generator=g) * 0.02).bfloat16()
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(d).bfloat16()
    save_file(sd, out / "model.safetensors")


def naive(source, layers: list[int], matrices: list[str], k: int = 10) -> dict:
    """What a user would write: load with transformers in fp32, then per layer and matrix
    ``log_softmax(final_norm(W) @ W_U.T)`` and top-k, for both poles."""
    import torch
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)
    load_s = time.perf_counter() - t
    norm, W_U = model.model.norm, model.lm_head.weight  # [d_vocab, d_model]
    t = time.perf_counter()
    with torch.inference_mode():
        for layer in layers:
            mlp = model.model.layers[layer].mlp
            for m in matrices:
                W = getattr(mlp, f"{m}_proj").weight  # [d_mlp, d_model]; down is [d_model, d_mlp]
                W = W.T if m == "down" else W
                for sign in (1.0, -1.0):
                    lp = torch.log_softmax(norm(sign * W) @ W_U.T, -1)  # [d_mlp, d_vocab]
                    torch.topk(lp, k, -1)
    return {"load_s": round(load_s, 1), "decode_s": round(time.perf_counter() - t, 2)}


def _map(src, out: Path, dtype: str, kernel: str, layers: str | None, matrices: str | None, device: str) -> dict:
    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions

    io0 = io_read_mb()
    r = map_model(src, out, MapOptions(matrices=matrices, layers=layers, device=device, dtype=dtype, kernel=kernel))
    return {"seconds": round(r.seconds, 2), "n_vectors": r.n_vectors, "dtype": r.meta["dtype"], "kernel": r.meta["kernel"],
            "layers": layers or "all",
            "timings": r.meta["timings"], "read_mb": round(io_read_mb() - io0), "peak_rss_mb_so_far": peak_rss_mb()}


def _warm_compile(d_vocab: int) -> float:
    """Compile the fused kernel before timing (cached on disk afterwards), so subset timings are steady-state."""
    import torch

    from neuronmap.decode.engine import compiled_reduce

    t = time.perf_counter()
    for minus in (True, False):
        compiled_reduce(torch.randn(16, d_vocab), minus)
    return round(time.perf_counter() - t, 1)


def case_map(name: str, device: str, tmp: Path) -> dict:
    """Map fp32 and bf16, against bare products of the same shape and the naive way."""
    import torch

    from neuronmap.sources.resolve import open_weights, resolve_source

    res: dict = {"case": name, "machine": machine(), "device": device}
    if name == "demo":
        src = resolve_source(None)
        matrices, bf16_layers, timed = None, None, None
        res["note"] = "real weights (SmolLM2-135M-Instruct GGUF), every layer and matrix"
    else:
        shape = SHAPES[name]
        src = resolve_source(str(tmp / "ckpt"))
        matrices, bf16_layers, timed = shape["matrices"], shape["bf16_layers"], shape["timed_layers"]
        res["note"] = (f"synthetic random bf16 weights; bf16 map over layers {bf16_layers or 'all'}; fp32 map, bare "
                       f"products and naive way over layers {timed}; full-model figures extrapolated by layer count")
    weights = open_weights(src)
    res["shape"] = {k: getattr(weights, k) for k in ("n_layers", "d_model", "d_mlp", "d_vocab")}
    n_layers = SHAPES[name]["n_layers"] if name in SHAPES else weights.n_layers  # the model's, not the checkpoint's
    res["shape"]["n_layers"] = n_layers
    res["weight_file_mb"] = round(sum(f.stat().st_size for f in src.files) / 2**20)
    # The kernel `auto` would pick for the whole model (a subset alone would fall under its threshold).
    from neuronmap.decode.engine import choose_reducer, kernel_used

    n_mat = len(matrices.split(",")) if matrices else len(weights.family.matrices)
    kernel = kernel_used(choose_reducer("auto", n_layers * n_mat * weights.d_mlp * weights.d_vocab), weights.d_vocab)
    res["kernel"] = kernel
    dtypes = SHAPES[name].get("dtypes", ("bfloat16", "float32", "split")) if name in SHAPES else ("bfloat16", "float32", "split")
    if dtypes == ("split",):
        res["note"] = f"synthetic random bf16 weights; the default (split) map over layers {timed}, extrapolated by layer count"
    if kernel == "compiled" and bf16_layers is not None and dtypes != ("split",):  # split compiles nothing
        res["compile_s"] = _warm_compile(weights.d_vocab)
    runs = {}
    # split (the default) first: its peak memory is then its own; then bf16 (the 8B target), before fp32 holds a 2 GB head.
    if "split" in dtypes:
        runs["split"] = _map(src, tmp / "asp", "auto", kernel, timed, matrices, device)
    if "bfloat16" in dtypes:
        runs["bfloat16"] = _map(src, tmp / "a16", "bfloat16", kernel, bf16_layers, matrices, device)
    if kernel == "compiled" and bf16_layers is None:
        res["compile_s"] = _warm_compile(weights.d_vocab)  # already paid inside the end-to-end run
    if "float32" in dtypes:
        runs["float32"] = _map(src, tmp / "a32", "float32", kernel, timed, matrices, device)
        if name == "demo":
            res["search"] = bench_exact_search(tmp / "a32")
    flop_per_vector = 2.0 * weights.d_model * weights.d_vocab  # one product per vector: the - pole is free (odd head)
    full_vectors = n_layers * n_mat * weights.d_mlp
    bare_bf16: dict[int, float] = {}
    for dtype, r in runs.items():
        tdt = torch.float32 if dtype == "float32" else torch.bfloat16
        bare = bare_product_seconds(r["n_vectors"], weights.d_model, weights.d_vocab, device, tdt)
        if tdt == torch.bfloat16:
            bare_bf16.setdefault(r["n_vectors"], bare)  # the first timing: the default map's ratio is then one pair
        r.update(bare_s=round(bare, 2), map_over_bare=round(r["seconds"] / bare, 2),
                 map_tflops=round(flop_per_vector * r["n_vectors"] / r["seconds"] / 1e12, 3),
                 bare_tflops=round(flop_per_vector * r["n_vectors"] / bare / 1e12, 3),
                 full_model_s=round(r["seconds"] * full_vectors / r["n_vectors"]))
    if "split" in runs:  # the exactness floor of this CPU (issue 26): the cheapest exact products, torch's kernels
        sp = runs["split"]
        sp["floor"] = floor_seconds(sp["n_vectors"], weights.d_model, weights.d_vocab,
                                    weights.head(native=True).dtype == torch.bfloat16)
        sp["map_over_floor"] = round(sp["seconds"] / sp["floor"]["floor_s"], 2)
    for r in runs.values():  # every map against the bf16 product of its own vectors (the hardware's limit)
        if r["n_vectors"] not in bare_bf16:
            bare_bf16[r["n_vectors"]] = bare_product_seconds(r["n_vectors"], weights.d_model, weights.d_vocab, device,
                                                             torch.bfloat16)
        r["bare_bf16_s"] = round(bare_bf16[r["n_vectors"]], 2)
        r["map_over_bare_bf16"] = round(r["seconds"] / bare_bf16[r["n_vectors"]], 2)
    res.update(runs)
    rep = DEMO_REPEAT if name == "demo" else SHAPES[name].get("repeat")
    if rep and "split" in runs:
        res["split_repeats"] = _split_repeats(src, tmp, rep, weights, device)
    need_gb = 4 * _param_count(weights) / 2**30
    avail_gb = res["machine"]["memory_gb"] * 0.8
    if "float32" not in runs:
        res["naive"] = {"skipped": "this case times the split map only"}
    elif need_gb < avail_gb:
        layers = [int(x) for x in timed.split(",")] if timed else list(range(weights.n_layers))
        nv = naive(src, layers, (matrices or ",".join(weights.family.matrices)).split(","))
        nv["over_map_fp32"] = round(nv["decode_s"] / runs["float32"]["seconds"], 2)
        if "split" in runs and runs["split"]["n_vectors"] == runs["float32"]["n_vectors"]:
            nv["over_map_split"] = round(nv["decode_s"] / runs["split"]["seconds"], 2)
        res["naive"] = nv
    else:
        res["naive"] = {"skipped": f"the model in fp32 needs ~{need_gb:.0f} GB, more than this machine's {res['machine']['memory_gb']} GB"}
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def _split_repeats(src, tmp: Path, rep: tuple[str, str], weights, device: str, n: int = 3) -> dict:
    """The split map of a few layers and the bare bf16 product of the same vectors, alternately, ``n`` times:
    the spread of their ratio on a shared machine."""
    import torch

    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions

    ratios = []
    for i in range(n):
        r = map_model(src, tmp / f"rep{i}", MapOptions(matrices=rep[0], layers=rep[1], device=device))
        bare = bare_product_seconds(r.n_vectors, weights.d_model, weights.d_vocab, device, torch.bfloat16)
        ratios.append(round(r.seconds / bare, 2))
        shutil.rmtree(tmp / f"rep{i}", ignore_errors=True)
    return {"matrices": rep[0], "layers": rep[1], "n_vectors": r.n_vectors, "ratios": ratios}


def instruction_set(flags) -> str:
    """The instruction set that sets this CPU's exactness floor: ``amx-bf16``, ``avx512-bf16``, ``avx2`` or ``other``."""
    if "amx_bf16" in flags:
        return "amx-bf16"
    return "avx512-bf16" if "avx512_bf16" in flags else ("avx2" if "avx2" in flags else "other")


def floor_seconds(n_vectors: int, d_model: int, d_vocab: int, bf16_head: bool, sample: int = 16384) -> dict:
    """The cheapest products that give an exact atlas, each with torch's own kernel, for ``n_vectors`` vectors.

    Exact (top-10 order as fp64, |dp| <= 1e-5) takes either one fp32 product or the split's bf16 products with
    fp32 accumulation: ``hi.W + lo.W`` for a bf16 head (2), ``+ hi.W_lo`` for any other (3). The floor is the
    cheaper of the two here (on AVX2 alone torch's bf16 product is emulated, so fp32 wins).
    """
    import torch

    # Timed over at most `sample` vectors and scaled: the rate is steady after a few blocks, and a loaded machine
    # could not otherwise time the floor twice around a whole map in one session.
    n = min(n_vectors, sample)
    fp32 = bare_product_seconds(n, d_model, d_vocab, "cpu", torch.float32) * n_vectors / n
    bf16 = bare_product_seconds(n, d_model, d_vocab, "cpu", torch.bfloat16) * n_vectors / n
    n_split = 2 if bf16_head else 3
    split = n_split * bf16
    return {"fp32_product_s": round(fp32, 2), "bf16_product_s": round(bf16, 2), "split_products": n_split,
            "split_floor_s": round(split, 2), "floor_s": round(min(fp32, split), 2),
            "floor": "one fp32 product" if fp32 <= split else f"the split's {n_split} bf16 products"}


def reduction_seconds(n_vectors: int, d_vocab: int, k: int = 10, rows: int = 256) -> dict:
    """What the reductions would cost as separate torch passes over the logits of both poles: exp and top-k."""
    import torch

    z = torch.randn(rows, d_vocab)  # [rows, d_vocab]
    out = {}
    for name, f in (("exp_s", lambda: (z.exp(), z.neg().exp())),
                    ("topk_s", lambda: (torch.topk(z, k), torch.topk(z.neg(), k)))):
        f()
        t = time.perf_counter()
        for _ in range(4):
            f()
        out[name] = round((time.perf_counter() - t) / 4 * n_vectors / rows, 2)
    return out


def _cli_map(out: Path) -> dict:
    """The default map of the whole demo model as a user runs it (a fresh process): wall and its own timer."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neuronmap", "map", "-o", str(out), "--json"], check=True,
                   capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - t
    meta = json.loads((out / "meta.json").read_text())
    return {"wall_s": round(wall, 2), "map_s": meta["timings"]["total_s"], "timings": meta["timings"],
            "dtype": meta["dtype"], "kernel": meta.get("kernel"), "n_vectors": meta["n_vectors"]}


def case_default_ratio(tmp: Path, n: int = 3) -> dict:
    """Issue 26 wherever this runs: the default map (``--dtype auto``) of the whole demo model, end to end in a fresh
    process, against this CPU's exactness floor (``floor_seconds``) timed in the same run, before and after it;
    what each part costs; then (issue 13) the map of the demo's up layers 0-9 against the bare bf16 and fp32
    products of the same vectors, in turn ``n`` times. The machine's flags say which path ran."""
    import torch

    from neuronmap.decode import native
    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions
    from neuronmap.sources.resolve import open_weights, resolve_source

    src = resolve_source(None)
    weights = open_weights(src)
    flags = native.cpu_flags()
    d, v = weights.d_model, weights.d_vocab
    bf16_head = weights.head(native=True).dtype == torch.bfloat16
    res = {"case": "default-ratio", "machine": machine(), "matrices": DEMO_REPEAT[0], "layers": DEMO_REPEAT[1],
           "avx512_bf16": "avx512_bf16" in flags, "avx2": "avx2" in flags, "amx_bf16": "amx_bf16" in flags,
           "instruction_set": instruction_set(flags), "bf16_head": bf16_head, "runs": []}
    n_full = weights.n_layers * len(weights.family.matrices) * weights.d_mlp
    before = floor_seconds(n_full, d, v, bf16_head)
    full = _cli_map(tmp / "full")
    after = floor_seconds(n_full, d, v, bf16_head)
    floor = min(before["floor_s"], after["floor_s"])  # the floor's best timing: the ratio is then an upper bound
    parts = {"product_floor_s": floor, **reduction_seconds(n_full, v), "write_s": full["timings"]["write_s"],
             "read_s": full["timings"]["read_s"], "startup_s": round(full["wall_s"] - full["map_s"], 2)}
    res["full"] = {**full, "floor_before": before, "floor_after": after, "floor_s": floor, "parts": parts,
                   "wall_over_floor": round(full["wall_s"] / floor, 2), "map_over_floor": round(full["map_s"] / floor, 2)}
    shutil.rmtree(tmp / "full", ignore_errors=True)
    for i in range(n):
        r = map_model(src, tmp / f"d{i}", MapOptions(matrices=DEMO_REPEAT[0], layers=DEMO_REPEAT[1]))
        b16 = bare_product_seconds(r.n_vectors, d, v, "cpu", torch.bfloat16)
        b32 = bare_product_seconds(r.n_vectors, d, v, "cpu", torch.float32)
        res["runs"].append({"map_s": round(r.seconds, 2), "bare_bf16_s": round(b16, 2), "bare_fp32_s": round(b32, 2),
                            "map_over_bare_bf16": round(r.seconds / b16, 2), "map_over_bare_fp32": round(r.seconds / b32, 2)})
        res["dtype"], res["kernel"], res["n_vectors"] = r.meta["dtype"], r.meta.get("kernel"), r.n_vectors
        shutil.rmtree(tmp / f"d{i}", ignore_errors=True)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def _param_count(weights) -> int:
    d, f, v, n = weights.d_model, weights.d_mlp, weights.d_vocab, weights.n_layers
    return 2 * v * d + n * (3 * d * f + 4 * d * d)  # embed + head, layers (attention as d x d blocks: an upper bound)


def bench_exact_search(atlas: Path) -> dict:
    """Exact search over every vector of an atlas, from its weights (issue: under 5 s on the demo model)."""
    from neuronmap.atlas.handle import Atlas

    a = Atlas.open(atlas)
    out = {}
    for concept in (" coffee", " water"):
        t = time.perf_counter()
        r = a.search([concept], top=10)
        out[concept.strip()] = {"seconds": round(time.perf_counter() - t, 2), "method": r.method,
                                "n_scored": r.n_scored, "first": r.table.iloc[0]["id"]}
    return out


def case_atlas_8b(tmp: Path) -> dict:
    """Search and compare on Llama-3.1-8B-sized synthetic atlases (32 x 14336 x 3 matrices x 2 poles = 2.75M rows)."""
    from neuronmap.compare import compare
    from neuronmap.atlas.handle import Atlas
    from neuronmap.testing.synthetic import synthetic_atlas

    res: dict = {"case": "atlas-8b", "machine": machine(), "note": "synthetic atlases, Llama-3.1-8B-shaped, 128,256 tokens"}
    t = time.perf_counter()
    synthetic_atlas(tmp / "a", 32, 14336, 128256, seed=0)
    synthetic_atlas(tmp / "b", 32, 14336, 128256, seed=0, change_rate=0.25)
    res["generate_s"] = round(time.perf_counter() - t, 1)
    a = Atlas.open(tmp / "a")
    runs = []
    for concept in ("tok123", "tok4567", "tok123"):  # the first query builds the token index; later ones use it
        t = time.perf_counter()
        r = a.search([concept], stored=True, top=10)
        runs.append({"concept": concept, "seconds": round(time.perf_counter() - t, 2), "method": r.method,
                     "n_scored": r.n_scored, "n_hits": len(r.table)})
    res["stored_search"] = runs
    res["rows"] = a.meta["n_rows"]
    for level in ("neuron", "concept"):
        t = time.perf_counter()
        c = compare(str(tmp / "a"), str(tmp / "b"), level=level)
        res[f"compare_{level}_s"] = round(time.perf_counter() - t, 2)
        if level == "neuron":
            res["same_top1"] = c.neuron.overall[-1]["same_top1"]
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def _timed_get(client, path: str, warm: int = 5) -> dict:
    t = time.perf_counter()
    r = client.get(path)
    cold = time.perf_counter() - t
    assert r.status_code == 200, (path, r.status_code, r.text[:200])
    times = []
    for _ in range(warm):
        t = time.perf_counter()
        client.get(path)
        times.append(time.perf_counter() - t)
    return {"path": path, "cold_s": round(cold, 3), "warm_median_s": round(sorted(times)[len(times) // 2], 3),
            "warm_max_s": round(max(times), 3)}


def case_viewer(tmp: Path) -> dict:
    """Viewer pages on 8B-sized synthetic atlases (in-process ASGI client), and steering on the demo model."""
    from starlette.testclient import TestClient

    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions
    from neuronmap.testing.synthetic import synthetic_atlas
    from neuronmap.viewer import create_app

    res: dict = {"case": "viewer", "machine": machine(),
                 "note": "Starlette TestClient in the same process (server time, no network); 8B-sized synthetic atlases"}
    synthetic_atlas(tmp / "a", 32, 14336, 128256, seed=0)
    synthetic_atlas(tmp / "b", 32, 14336, 128256, seed=0, change_rate=0.25)
    c = TestClient(create_app([tmp / "a", tmp / "b"]), base_url="http://127.0.0.1")
    paths = ["/", "/search?q=tok123", "/search?q=tok4567&matrices=up&layers=20-31", "/neuron/L29N808", "/neuron/L0N0",
             "/layer/29?matrix=up", "/layer/29?matrix=down&sort=entropy&page=3", "/api/search?q=tok99", "/api/neuron/L31N14335",
             "/compare"]
    res["pages"] = [_timed_get(c, p) for p in paths]
    # Steering: the demo model, mapped at one layer (steering needs only the atlas's source and its sha256).
    map_model(None, tmp / "demo", MapOptions(layers="29"))
    c = TestClient(create_app([tmp / "demo"]), base_url="http://127.0.0.1")
    steer = []
    for attempt in ("cold (loads the model)", "warm"):
        t = time.perf_counter()
        job = c.post("/api/steer", json={"neuron": "L29N808", "value": "20x", "concept": "dog", "n": 3}).json()
        first = None
        while True:
            s = c.get(f"/api/jobs/{job['id']}").json()
            if first is None and "clamp" in s["results"]:
                first = time.perf_counter() - t
            if s["state"] in ("done", "error"):
                break
            time.sleep(0.05)
        assert s["state"] == "done", s
        steer.append({"run": attempt, "clamp_result_s": round(first, 2), "done_s": round(time.perf_counter() - t, 2),
                      "ratio": s["results"]["clamp"]["settings"][0]["ratio"]})
    res["steer"] = steer
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def case_ray_overhead(tmp: Path) -> dict:
    """The same map (4 layers of the demo model, 12 parts) in one process and as tasks on a 2-worker local Ray cluster.

    The cluster's start is timed apart; the Ray map reuses it, as a long map would (a one-time cost).
    """
    import pyarrow.parquet as pq
    import ray

    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions

    opts = MapOptions(layers="0-3", kernel="eager")
    map_model(None, tmp / "warm", MapOptions(layers="0", matrices="up"))  # imports and the GGUF's page cache
    t = time.perf_counter()
    single = map_model(None, tmp / "single", opts)
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    start_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        on_ray = map_model(None, tmp / "ray", opts, ray="local")
        ray_s = time.perf_counter() - t
    finally:
        ray.shutdown()
    same = pq.read_table(single.path / "neurons.parquet").equals(pq.read_table(on_ray.path / "neurons.parquet"))
    return {"case": "ray-overhead", "machine": machine(), "layers": "0-3", "parts": 12, "n_vectors": single.n_vectors,
            "single_s": round(single_s, 2), "single_threads": __import__("torch").get_num_threads(),
            "ray_s": round(ray_s, 2), "ray_start_s": round(start_s, 2), "ray_over_single": round(ray_s / single_s, 2),
            "tasks": on_ray.meta["ray"]["tasks"], "identical": same, "peak_rss_mb": peak_rss_mb()}
def case_record(tmp: Path) -> dict:
    """``record`` on the demo model against a plain forward pass of the same batches, in this one process."""
    import torch

    from neuronmap.evidence.corpus import open_corpus, sequences
    from neuronmap.runtime.models import load_model
    from neuronmap.evidence.record import BATCH_TOKENS, CONTEXT, EXAMPLES, Running, batches, bos_token, encode, record_batch

    m = load_model(None)
    (tmp / "c.txt").write_text((ROOT / "tests" / "data" / "concepts.txt").read_text() * 40)
    c = open_corpus(tmp / "c.txt")
    base = m.model.base_model
    res: dict = {"case": "record", "machine": machine(), "batch_tokens": BATCH_TOKENS, "context": CONTEXT,
                 "note": "demo model, fp32; tests/data/concepts.txt repeated; each batch run twice in turn: a plain decoder "
                         "forward (no hooks), then record's step (the forward with every layer's top-N, bins and "
                         "counts kept by the hooks as the pass goes)"}
    layers = [Running(m.d_mlp, EXAMPLES, m.device) for _ in range(m.n_layers)]
    plain = rec = 0.0
    n = 0
    with torch.no_grad():
        for b in batches(sequences(c, m.tokenizer, CONTEXT), BATCH_TOKENS, 16384):
            ids, valid, mask = encode(b, bos_token(m.tokenizer), 0)
            t = time.perf_counter()
            base(input_ids=ids, attention_mask=mask, use_cache=False)
            plain += time.perf_counter() - t
            t = time.perf_counter()
            kernel = record_batch(m, layers, ids, valid, mask, n)
            rec += time.perf_counter() - t
            n += int(valid.sum())
    state = sum(x.counts.numel() * 4 + x.top_v.numel() * 24 + x.positive.numel() * 16 for x in layers)
    res.update({"tokens": n, "plain_s": round(plain, 2), "record_s": round(rec, 2),
                "plain_tokens_per_s": round(n / plain, 1), "record_tokens_per_s": round(n / rec, 1),
                "record_over_plain": round(rec / plain, 2), "kernel": kernel, "state_mb": round(state / 2**20, 1), "peak_rss_mb": peak_rss_mb()})
    return res


def case_trace(tmp: Path, n: int = 7) -> dict:
    """``trace`` of a 64-token text on the demo model against a plain forward pass of the same ids, in turn, n times."""
    import torch

    from neuronmap.intervene.trace import trace
    from neuronmap.runtime.hooks import bundled_text
    from neuronmap.runtime.models import load_model

    m = load_model(None)
    ids = m.tokenizer(bundled_text("reference.txt"), return_tensors="pt")["input_ids"][:, :64]
    text = m.tokenizer.decode(ids[0])
    ids = m.tokenizer(text, return_tensors="pt")["input_ids"]  # what trace encodes
    plain, traced = [], []
    with torch.no_grad():
        m.model(input_ids=ids)
        trace(m, text)  # warm both
        for _ in range(n):
            t = time.perf_counter()
            m.model(input_ids=ids)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            trace(m, text)
            traced.append(time.perf_counter() - t)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"case": "trace", "machine": machine(), "tokens": int(ids.shape[1]), "runs": n,
            "note": "demo model, fp32; the first 64 tokens of the bundled reference text; in turn: a plain forward "
                    "(model(input_ids), logits included) and `trace` at the last position (its forward with hooks, the "
                    "decomposition, the logit lens, the top-20 contributors' target ranks), no atlas, median of each",
            "plain_s": round(med(plain), 4), "trace_s": round(med(traced), 4),
            "trace_over_plain": round(med(traced) / med(plain), 2),
            "ratios": [round(b / a, 2) for a, b in zip(plain, traced)], "peak_rss_mb": peak_rss_mb()}


def case_record_memory(tmp: Path) -> dict:
    """Peak memory of ``record`` at 1M and at 10M tokens of GCIDE, each in a fresh process, on a small model.

    The model has the demo's tokenizer and vocabulary but 4 layers, d_model 64, d_mlp 512 (random weights): the
    recorder's state is fixed by n_layers x d_mlp, so what is measured is whether anything grows with the corpus.
    """
    import transformers as T

    from neuronmap.mapping.mapper import map_model

    gcide = Path("/usr/share/dictd/gcide.dict.dz")
    demo = ROOT / ".cache" / "test-models" / "smollm2-135m"
    ck = tmp / "ck"
    cfg = T.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(ck)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / f, ck / f)
    map_model(str(ck), tmp / "atlas")
    res: dict = {"case": "record-memory", "machine": machine(), "corpus": "GCIDE (/usr/share/dictd/gcide.dict.dz)",
                 "model": "llama, demo tokenizer (49,152), 4 layers, d_model 64, d_mlp 512, random", "runs": []}
    code = ("import resource, sys, time; from neuronmap.atlas.handle import Atlas; from neuronmap.evidence.record import RecordOptions, record; t = time.perf_counter(); "
            "r = record(Atlas.open(sys.argv[1]), sys.argv[2], RecordOptions(tokens=int(sys.argv[3])), overwrite=True); "
            "print(r.evidence['tokens'], r.evidence['sequences'], round(time.perf_counter() - t, 1), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    for n in (1_000_000, 10_000_000):
        out = subprocess.run([sys.executable, "-c", code, str(tmp / "atlas"), str(gcide), str(n)],
                             capture_output=True, text=True, check=True).stdout.split()
        res["runs"].append({"tokens_asked": n, "tokens": int(out[0]), "sequences": int(out[1]), "seconds": float(out[2]),
                            "peak_rss_mb": int(out[3])})
    a, b = res["runs"]
    res["rss_ratio_10m_over_1m"] = round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)
    return res


def case_sae(tmp: Path, d_sae: int = 16384, layer: int = 20) -> dict:
    """``map --sae``: a 16,384-feature SAE (random unit decoder rows; the decode does not depend on training) at the
    demo model's layer 20, end to end (read, decode both matrices and poles, write), against the bare product of the
    same shape in the same dtype; then a Llama-3.1-8B-shaped 131,072-feature decoder estimated from a measured slice
    of its bare product times the ratio measured here."""
    import torch

    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions
    from neuronmap.sources.resolve import open_weights, resolve_source
    from neuronmap.testing.sae import save_sae

    src = resolve_source(None)
    w = open_weights(src)
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(d_sae, w.d_model, generator=g)
    dec /= dec.norm(dim=1, keepdim=True)
    sae = save_sae(tmp / "sae", {"W_enc": dec.T.contiguous(), "W_dec": dec, "b_enc": torch.zeros(d_sae),
                                 "b_dec": torch.zeros(w.d_model)}, "standard", f"blocks.{layer}.hook_resid_post")
    r = map_model(src, tmp / "fa", MapOptions(sae=str(sae)))
    dt = {"split": torch.bfloat16, "bfloat16": torch.bfloat16}.get(r.meta["dtype"], torch.float32)
    bare = bare_product_seconds(r.n_vectors, w.d_model, w.d_vocab, "cpu", dt)
    # The same engine on neurons, about as many vectors, right after: on a shared machine this separates what the
    # feature path costs from what the machine's load costs.
    nm = map_model(src, tmp / "na", MapOptions(matrices="down", layers="9-29"))
    ratio = r.seconds / bare
    slice_n = 512  # of the 8B shape: d_model 4096, d_vocab 128256; both matrices of 131,072 features
    big = bare_product_seconds(slice_n, 4096, 128256, "cpu", dt)
    est_bare = big * 2 * 131072 / slice_n
    return {"case": "sae", "machine": machine(), "d_sae": d_sae, "layer": layer, "n_vectors": r.n_vectors,
            "dtype": r.meta["dtype"], "kernel": r.meta["kernel"], "map_s": round(r.seconds, 2),
            "timings": r.meta["timings"], "bare_s": round(bare, 2), "map_over_bare": round(ratio, 2),
            "neuron_map_vectors": nm.n_vectors, "neuron_map_s": round(nm.seconds, 2),
            "feature_over_neuron_per_vector": round((r.seconds / r.n_vectors) / (nm.seconds / nm.n_vectors), 2),
            "llama8b_slice_vectors": slice_n, "llama8b_bare_est_s": round(est_bare, 1),
            "llama8b_map_est_s": round(est_bare * ratio, 1), "peak_rss_mb": peak_rss_mb()}


def run_case(name: str, device: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nm-bench-"))
    try:
        if name == "atlas-8b":
            return case_atlas_8b(tmp)
        if name == "viewer":
            return case_viewer(tmp)
        if name == "ray-overhead":
            return case_ray_overhead(tmp)
        if name == "record":
            return case_record(tmp)
        if name == "record-memory":
            return case_record_memory(tmp)
        if name == "trace":
            return case_trace(tmp)
        if name == "default-ratio":
            return case_default_ratio(tmp)
        if name == "sae":
            return case_sae(tmp)
        if name in SHAPES:
            # Written by a separate process, so the generator's memory is not this case's.
            (tmp / "ckpt").mkdir()
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--make-checkpoint", name, str(tmp / "ckpt")], check=True)
            gen = round(time.perf_counter() - t, 1)
            res = case_map(name, device, tmp)
            res["generate_s"] = gen
            return res
        return case_map(name, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fmt_s(x) -> str:
    return "-" if x is None else (f"{x / 60:.1f} min" if x >= 600 else f"{x:g} s")


def write_markdown() -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    order = [c for c in ("demo", "llama-3.2-1b", "llama-3.2-1b-split", "llama-3.1-8b-up", "llama-3.1-8b-up-l0", "atlas-8b",
                         "viewer", "ray-overhead", "record", "record-memory", "default-ratio", "trace", "sae") if c in results]
    lines = [START, ""]
    machines = {json.dumps({k: v for k, v in r["machine"].items() if k != "date"}, sort_keys=True) for r in results.values()}
    for m in map(json.loads, sorted(machines)):
        lines.append(f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gb']} GB, "
                     f"torch {m['torch']}, Python {m['python']}, GPU: {m['gpu'] or 'none'}.")
    lines += ["", "| case | dtype | kernel | layers timed | vectors | map | bare product, same dtype | map / bare | "
              "map / bare bf16 | map TFLOP/s | whole model (extrapolated where a subset) | naive (transformers, fp32) | "
              "naive / map | read MB | peak RSS MB |", "|" + "---|" * 15]
    for c in order:
        r = results[c]
        if c in ("atlas-8b", "viewer", "ray-overhead", "record", "record-memory", "default-ratio", "trace", "sae"):
            continue
        for dtype in ("split", "bfloat16", "float32"):
            if dtype not in r:
                continue
            x = r[dtype]
            nv = r.get("naive", {})
            naive_s = nv.get("decode_s") if dtype == "float32" else None
            ratio_bf16 = round(x["seconds"] / x["bare_bf16_s"], 2) if "bare_bf16_s" in x else x["map_over_bare"]
            label = dtype if dtype != "split" else f"auto ({x.get('dtype', 'split')})"
            lines.append(
                f"| {c} | {label} | {x['kernel']} | {x['layers']} | {x['n_vectors']:,} | {_fmt_s(x['seconds'])} | "
                f"{_fmt_s(x['bare_s'])} | {x['map_over_bare']} | {ratio_bf16} | {x['map_tflops']} | {_fmt_s(x['full_model_s'])} | "
                f"{_fmt_s(naive_s) if naive_s is not None else ('skipped' if dtype == 'float32' and 'skipped' in nv else '')} | "
                f"{nv.get('over_map_fp32', '') if dtype == 'float32' else ''} | {x['read_mb']} | {x['peak_rss_mb_so_far']} |")
    lines += ["", "Per case:", ""]
    for c in order:
        r = results[c]
        if c == "atlas-8b":
            s = r["stored_search"]
            lines.append(f"- **atlas-8b** ({r['machine']['date']}): {r['note']}, {r['rows']:,} rows each. Stored top-k search: "
                         + ", ".join(f"{x['seconds']} s ({x['concept']})" for x in s)
                         + f" (the first query builds the token index). Compare, neuron level: {r['compare_neuron_s']} s "
                         f"(same top-1 {r['same_top1']:.3f}); concept level: {r['compare_concept_s']} s. "
                         f"Peak RSS {r['peak_rss_mb']} MB.")
            continue
        if c == "ray-overhead":
            lines.append(f"- **ray-overhead** ({r['machine']['date']}): the demo model, layers {r['layers']} ({r['parts']} "
                         f"parts, {r['n_vectors']:,} vectors), exact fp32: one process ({r['single_threads']} torch threads) "
                         f"{r['single_s']} s; `--ray` on a 2-worker local cluster (one CPU, one torch thread per task, "
                         f"{r['tasks']} tasks) {r['ray_s']} s = **{r['ray_over_single']}x** (starting the cluster, once: "
                         f"{r['ray_start_s']} s more); atlases identical: {r['identical']}.")
            continue
        if c == "viewer":
            pages = "; ".join(f"`{x['path']}` {x['warm_median_s'] * 1000:.0f} ms warm (max {x['warm_max_s'] * 1000:.0f}, "
                              f"first {x['cold_s']:g} s)" for x in r["pages"])
            st = "; ".join(f"{x['run']}: clamp result after {x['clamp_result_s']} s, generations done after {x['done_s']} s "
                           f"(ratio {x['ratio']:.1f}x)" for x in r["steer"])
            lines.append(f"- **viewer** ({r['machine']['date']}): {r['note']}. Pages: {pages}. Steering L29N808=20x, concept "
                         f"dog, 3 samples a side, on the demo model: {st}. Peak RSS {r['peak_rss_mb']} MB.")
            continue
        if c == "record":
            lines.append(f"- **record** ({r['machine']['date']}): {r['note']}; batches of {r['batch_tokens']} tokens, sequences "
                         f"of {r['context']}. {r['tokens']:,} tokens: record {r['record_s']} s ({r['record_tokens_per_s']:,} "
                         f"tokens/s), plain forward {r['plain_s']} s ({r['plain_tokens_per_s']:,} tokens/s), record / plain "
                         f"{r['record_over_plain']}. Running state {r['state_mb']} MB whatever the corpus size (histograms, "
                         f"top and bottom N, counts); peak RSS {r['peak_rss_mb']} MB.")
            continue
        if c == "sae":
            lines.append(f"- **sae** ({r['machine']['date']}): `map --sae` of a {r['d_sae']:,}-feature SAE at layer "
                         f"{r['layer']} of the demo model ({r['n_vectors']:,} vectors: enc and dec), {r['dtype']}, "
                         f"{r['kernel']} kernel: {r['map_s']} s end to end against {r['bare_s']} s for the bare product "
                         f"of the same shape = **{r['map_over_bare']}x**; the same engine on {r['neuron_map_vectors']:,} "
                         f"neurons (down, layers 9-29) right after: {r['neuron_map_s']} s, so a feature costs "
                         f"{r['feature_over_neuron_per_vector']}x a neuron per vector. A Llama-3.1-8B-shaped 131,072-feature SAE "
                         f"(both matrices, d_model 4096, d_vocab 128,256), estimated from a measured "
                         f"{r['llama8b_slice_vectors']}-vector slice of its bare product: bare "
                         f"{_fmt_s(r['llama8b_bare_est_s'])}, map at the ratio above {_fmt_s(r['llama8b_map_est_s'])} "
                         f"(an estimate, not a run). Peak RSS {r['peak_rss_mb']} MB.")
            continue
        if c == "default-ratio" and "full" in r:
            f, pt = r["full"], r["full"]["parts"]
            fb = f["floor_before"]
            lines.append(f"- **default-ratio, whole demo model** ({r['machine']['date']}, {r['machine']['cpu']}, "
                         f"instruction set {r['instruction_set']}; head {'bf16' if r['bf16_head'] else 'not bf16'}): "
                         f"`neuronmap map` (`auto` = {f['dtype']}, kernel {f['kernel']}, {f['n_vectors']:,} vectors) "
                         f"{f['wall_s']} s end to end in a fresh process ({f['map_s']} s by its own timer) against the "
                         f"exactness floor {f['floor_s']} s ({fb['floor']}; one fp32 product {fb['fp32_product_s']} s, "
                         f"one bf16 product {fb['bf16_product_s']} s before the map, "
                         f"{f['floor_after']['fp32_product_s']} s and {f['floor_after']['bf16_product_s']} s after): "
                         f"**{f['wall_over_floor']}x** end to end, {f['map_over_floor']}x by the map's timer. Parts: "
                         f"the products {pt['product_floor_s']} s; exp of both poles as a torch pass {pt['exp_s']} s and "
                         f"top-10 of both {pt['topk_s']} s (inside the fused kernel these run on hot tiles); reading "
                         f"{pt['read_s']} s; writing Parquet {pt['write_s']} s; start-up (imports, opening and packing "
                         f"the head, highlights) {pt['startup_s']} s.")
        if c == "default-ratio":
            runs = "; ".join(f"{x['map_s']} s against bf16 {x['bare_bf16_s']} s and fp32 {x['bare_fp32_s']} s "
                             f"(**{x['map_over_bare_bf16']}x** bf16, {x['map_over_bare_fp32']}x fp32)" for x in r["runs"])
            lines.append(f"- **default-ratio** ({r['machine']['date']}, {r['machine']['cpu']}, AVX512-BF16: "
                         f"{'yes' if r['avx512_bf16'] else 'no'}, AVX2: {'yes' if r['avx2'] else 'no'}): the default map "
                         f"(`auto` = {r['dtype']}, kernel {r['kernel']}) of the demo's {r['matrices']} layers {r['layers']} "
                         f"({r['n_vectors']:,} vectors) and the bare products of the same vectors, in turn: {runs}. "
                         f"Peak RSS {r['peak_rss_mb']} MB.")
            continue
        if c == "trace":
            lines.append(f"- **trace** ({r['machine']['date']}): {r['note']}; {r['tokens']} tokens, {r['runs']} runs: plain "
                         f"{r['plain_s']} s, trace {r['trace_s']} s = **{r['trace_over_plain']}x** (each run's ratio: "
                         f"{', '.join(map(str, r['ratios']))}). Peak RSS {r['peak_rss_mb']} MB.")
            continue
        if c == "record-memory":
            runs = "; ".join(f"{x['tokens']:,} tokens ({x['sequences']:,} sequences) in {x['seconds']} s, peak RSS "
                             f"{x['peak_rss_mb']} MB" for x in r["runs"])
            lines.append(f"- **record-memory** ({r['machine']['date']}): `record` of {r['corpus']} on a {r['model']} model, "
                         f"each run a fresh process: {runs}; 10M / 1M peak RSS = **{r['rss_ratio_10m_over_1m']}**.")
            continue
        extra = []
        if "compile_s" in r:
            extra.append(f"torch.compile of the fused kernel {r['compile_s']} s (outside the subset timings; inside the "
                         "end-to-end ones)")
        if "naive" in r:
            nv = r["naive"]
            extra.append(f"naive: {nv['skipped']}" if "skipped" in nv else f"naive model load {nv['load_s']} s (not counted)")
        if "search" in r:
            extra.append("exact search over every vector: " + ", ".join(
                f"'{k}' {v['seconds']} s ({v['method']}, {v['n_scored']:,} rows, first {v['first']})" for k, v in r["search"].items()))
        if "generate_s" in r:
            extra.append(f"checkpoint generated in {r['generate_s']} s ({r['weight_file_mb']} MB)")
        if "split_repeats" in r:
            sr = r["split_repeats"]
            extra.append(f"default (split) map / bare bf16 product, repeated in turn over {sr['matrices']} layers "
                         f"{sr['layers']} ({sr['n_vectors']:,} vectors): {', '.join(map(str, sr['ratios']))}")
        if "split" in r and "floor" in r["split"]:
            fl = r["split"]["floor"]
            extra.append(f"default map / exactness floor **{r['split']['map_over_floor']}x** (floor {fl['floor_s']} s: "
                         f"{fl['floor']}; one fp32 product {fl['fp32_product_s']} s, one bf16 {fl['bf16_product_s']} s)")
        for dt in ("split", "bfloat16"):
            if dt in r:
                extra.append(f"stage times ({dt}): {r[dt]['timings']}")
        lines.append(f"- **{c}** ({r['machine']['date']}): {r['note']}. " + "; ".join(extra) + ".")
    lines += ["", END]
    doc = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in doc:
        doc += f"\n{START}\n{END}\n"
    head, rest = doc.split(START, 1)
    doc = head + "\n".join(lines) + rest.split(END, 1)[1]
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(doc)
    tmp.replace(DOC)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--make-checkpoint", nargs=2, metavar=("SHAPE", "DIR"))
    ap.add_argument("--llama8b", action="store_true")
    ap.add_argument("--only", help="comma list of cases to run (default: all but the 8B map)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.make_checkpoint:
        name, out = args.make_checkpoint
        s = SHAPES[name]
        layers = range(s["n_layers"]) if s["bf16_layers"] is None else [int(x) for x in s["timed_layers"].split(",")]
        make_checkpoint(Path(out), s, list(layers))
        return 0
    if args.case:
        print(json.dumps(run_case(args.case, args.device)))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    cases = args.only.split(",") if args.only else ["demo", "llama-3.2-1b", "llama-3.1-8b-up-l0", "atlas-8b", "viewer",
                                                    "ray-overhead", "record", "record-memory", "default-ratio", "trace"] + (["llama-3.1-8b-up"] if args.llama8b else [])
    for c in cases:
        print(f"bench: {c} ...", flush=True)
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--case", c, "--device", args.device], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        tmp = RESULTS / f"{c}.json.tmp"
        tmp.write_text(json.dumps(r, indent=2) + "\n")
        tmp.replace(RESULTS / f"{c}.json")
        print(f"bench: {c} done in {time.perf_counter() - t:.0f} s", flush=True)
        write_markdown()
    print(f"wrote {DOC.relative_to(ROOT)} and bench/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
