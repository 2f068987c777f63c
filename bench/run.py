"""Benchmarks: neuronmap's map against the hardware's limit and against the naive way, in one run.

Usage:
    python bench/run.py                 # demo model + Llama-3.2-1B shape (a few layers, extrapolated)
    python bench/run.py --llama8b       # adds the Llama-3.1-8B up matrix (long)
    python bench/run.py --case NAME     # one case, in this process (used internally)

Each case runs in its own subprocess, so its peak resident memory is its own. Results go to
bench/results/<case>.json and a table to docs/benchmarks.md. Figures are ratios measured in one process
(these machines are noisy; absolute seconds are for orientation only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# name -> (n_layers, d_model, d_mlp, d_vocab, matrices, layers actually timed)
SHAPES = {
    "llama-3.2-1b": (16, 2048, 8192, 128256, "gate,up,down", "0"),
    "llama-3.1-8b-up": (32, 4096, 14336, 128256, "up", "0"),
}


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def io_read_mb() -> float:
    import psutil

    # read_chars counts bytes read through read(); safetensors and GGUF are mmapped, so this is a lower bound.
    io = psutil.Process().io_counters()
    return getattr(io, "read_chars", io.read_bytes) / 2**20


def bare_product_seconds(n_vectors: int, d_model: int, d_vocab: int, device: str, dtype, rows: int = 512) -> float:
    """The hardware's limit for this work: the same total [n_vectors, d_model] x [d_model, d_vocab] product."""
    import torch

    g = torch.Generator().manual_seed(0)
    W = torch.randn(d_vocab, d_model, generator=g).to(device=device, dtype=dtype)
    x = torch.randn(rows, d_model, generator=g).to(device=device, dtype=dtype)
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


def make_synthetic_checkpoint(out: Path, n_layers: int, d_model: int, d_mlp: int, d_vocab: int, layers: list[int]) -> None:
    """A llama-family safetensors checkpoint of the given shape with random bf16 weights.

    Only the layers that will be read hold MLP tensors, so the file stays small; the config names all n_layers
    (the map is run with --layers and extrapolated, which is stated in the results).
    """
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    cfg = {"model_type": "llama", "num_hidden_layers": n_layers, "hidden_size": d_model, "intermediate_size": d_mlp,
           "vocab_size": d_vocab, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(cfg))
    sd = {"lm_head.weight": (torch.randn(d_vocab, d_model, generator=g) * 0.02).bfloat16(),
          "model.norm.weight": (1 + 0.1 * torch.randn(d_model, generator=g)).bfloat16()}
    for i in layers:
        for m in ("gate", "up"):
            sd[f"model.layers.{i}.mlp.{m}_proj.weight"] = (torch.randn(d_mlp, d_model, generator=g) * 0.02).bfloat16()
        sd[f"model.layers.{i}.mlp.down_proj.weight"] = (torch.randn(d_model, d_mlp, generator=g) * 0.02).bfloat16()
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(d_model).bfloat16()
    save_file(sd, out / "model.safetensors")


def naive_seconds(weights, matrices: list[str], layers: list[int], k: int = 10) -> float:
    """What a user would write: fp32, per layer log_softmax(final_norm(W) @ W_U.T) and top-k, both poles."""
    import torch

    from neuronmap.decode import apply_norm, build_head

    head = build_head(weights, "final", "cpu", "float32")
    t = time.perf_counter()
    with torch.inference_mode():
        for layer in layers:
            for m in matrices:
                W = weights.vectors(m, layer)
                for sign in (1.0, -1.0):
                    lp = torch.log_softmax(apply_norm(head, sign * W) @ head.W_U.T, -1)  # [d_mlp, d_vocab]
                    torch.topk(lp, k, -1)
    return time.perf_counter() - t


def run_case(name: str, device: str) -> dict:
    import torch

    from neuronmap.mapper import MapOptions, map_model
    from neuronmap.sources import open_weights

    res: dict = {"case": name, "machine": machine(), "device": device}
    tmp = Path(tempfile.mkdtemp(prefix="nm-bench-"))
    try:
        if name == "demo":
            src, layers_s, matrices_s, note = None, None, None, "real weights, every layer"
            weights = open_weights(None)
        else:
            n_layers, d_model, d_mlp, d_vocab, matrices_s, layers_s = SHAPES[name]
            layers = [int(x) for x in layers_s.split(",")]
            t = time.perf_counter()
            (tmp / "ckpt").mkdir()
            make_synthetic_checkpoint(tmp / "ckpt", n_layers, d_model, d_mlp, d_vocab, layers)
            res["generate_s"] = round(time.perf_counter() - t, 1)
            src = str(tmp / "ckpt")
            weights = open_weights(src)
            note = f"synthetic random bf16 weights; layers {layers_s} of {n_layers} timed, totals extrapolated x{n_layers / len(layers):g}"
        res["note"] = note
        res["shape"] = {"n_layers": weights.n_layers, "d_model": weights.d_model, "d_mlp": weights.d_mlp, "d_vocab": weights.d_vocab}
        io0 = io_read_mb()
        runs = {}
        for dtype in ("float32", "bfloat16"):
            r = map_model(src, tmp / f"atlas-{dtype}", MapOptions(matrices=matrices_s, layers=layers_s, device=device, dtype=dtype))
            runs[dtype] = {"seconds": r.seconds, "timings": r.meta["timings"], "n_vectors": r.n_vectors}
        res["io_read_mb"] = round(io_read_mb() - io0, 1)
        n_vec = runs["float32"]["n_vectors"]
        scale = weights.n_layers / len(r.meta["decode"]["layers"])
        flop = 2.0 * n_vec * weights.d_model * weights.d_vocab  # one product per vector: the - pole is free (odd head)
        res["n_vectors_timed"] = n_vec
        res["flop_timed"] = flop
        res["extrapolation"] = scale
        for dtype, tdt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            bare = bare_product_seconds(n_vec, weights.d_model, weights.d_vocab, device, tdt)
            s = runs[dtype]["seconds"]
            res[dtype] = {
                "map_s": round(s, 2), "map_s_full_model": round(s * scale, 1), "bare_product_s": round(bare, 2),
                "map_over_bare": round(s / bare, 2), "map_tflops": round(flop / s / 1e12, 3),
                "bare_tflops": round(flop / bare / 1e12, 3), "timings": runs[dtype]["timings"],
            }
        # The naive way: fp32 everything, full log_softmax; on the same vectors.
        matrices = r.meta["decode"]["matrices"]
        naive = naive_seconds(weights, matrices, r.meta["decode"]["layers"])
        res["naive_s"] = round(naive, 2)
        res["naive_over_map_fp32"] = round(naive / res["float32"]["map_s"], 2)
        res["naive_over_map_bf16"] = round(naive / res["bfloat16"]["map_s"], 2)
        res["peak_rss_mb"] = round(peak_rss_mb(), 0)
        weight_bytes = sum(f.stat().st_size for f in weights.source.files)
        res["weight_file_mb"] = round(weight_bytes / 2**20, 1)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return res


def write_markdown(results: list[dict]) -> None:
    m = results[0]["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Made by `make bench` (`python bench/run.py`; `--llama8b` adds the Llama-3.1-8B-shaped case). Raw results:",
        "bench/results/*.json. Every ratio is measured within one process run; absolute times on these shared",
        "machines vary by tens of percent from run to run.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gb']} GB, "
        f"torch {m['torch']}, Python {m['python']}, GPU: {m['gpu'] or 'none'}.",
        "",
        "| case | vectors timed | map fp32 s | map bf16 s | bare bf16 product s | map bf16 / bare | map fp32 / bare fp32 | naive s | naive / map fp32 | full model, fp32 (extrapolated) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f, b = r["float32"], r["bfloat16"]
        lines.append(
            f"| {r['case']} | {r['n_vectors_timed']:,} | {f['map_s']} | {b['map_s']} | {b['bare_product_s']} | "
            f"{b['map_over_bare']} | {f['map_over_bare']} | {r['naive_s']} | {r['naive_over_map_fp32']} | "
            f"{f['map_s_full_model']} s | {r['peak_rss_mb']:.0f} |"
        )
    lines += ["", "Notes per case:", ""]
    for r in results:
        lines.append(f"- **{r['case']}**: {r['note']}. Achieved {r['float32']['map_tflops']} TFLOP/s (fp32 map), "
                     f"{r['bfloat16']['map_tflops']} (bf16 map); bare products {r['float32']['bare_tflops']} (fp32) and "
                     f"{r['bfloat16']['bare_tflops']} (bf16) TFLOP/s. Time split (fp32): {r['float32']['timings']}.")
    (ROOT / "docs" / "benchmarks.generated.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--llama8b", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.device)))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    cases = ["demo", "llama-3.2-1b"] + (["llama-3.1-8b-up"] if args.llama8b else [])
    results = []
    for c in cases:
        print(f"bench: {c} ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--case", c, "--device", args.device], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        (RESULTS / f"{c}.json").write_text(json.dumps(r, indent=2) + "\n")
        results.append(r)
        print(json.dumps({k: r[k] for k in ("case", "naive_s", "peak_rss_mb")} | {"fp32": r["float32"], "bf16": r["bfloat16"]}), flush=True)
    write_markdown(results)
    print("wrote docs/benchmarks.generated.md and bench/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
