"""``map``: decode every chosen (matrix, layer) into a part, here or on Ray (neuronmap.mapping.distributed), then the atlas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from neuronmap.core.version import VERSION
from neuronmap.atlas import format as atlas_io
from neuronmap.atlas import writer as atlas_out
from neuronmap.core import fsio
from neuronmap.decode.engine import build_head, choose_reducer, compiled_reduce, kernel_used, resolve_device, resolve_dtype
from neuronmap.decode.head import NORM_MODES
from neuronmap.core.errors import NeuronmapError, ResumableError
from neuronmap.core.ids import FEATURE_MATRICES, format_ranges, parse_layers, parse_matrices
from neuronmap.mapping.part import MapOptions, highlights, map_part
from neuronmap.mapping.parts import assemble, open_parts, read_best, write_part
from neuronmap.sources.resolve import Weights, open_weights, resolve_source
from neuronmap.sources.sae import FeatureWeights, open_saes
from neuronmap.sources.weights import Source
from neuronmap.core.cache import file_sha256



@dataclass(frozen=True)
class MapResult:
    """What ``map`` did.

    Attributes:
        path: the atlas directory.
        meta: its meta.json.
        n_vectors: vectors decoded (each gives two rows, one per pole).
        seconds: wall time, end to end.
        highlights: confident content-word rows, best first (dicts with id, matrix, pole, token, prob).
        notes: one line each about what the run found and did besides mapping (parts resumed, leftovers removed).
    """

    path: Path
    meta: dict
    n_vectors: int
    seconds: float
    highlights: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The serialized form (``--json``, the viewer's API), JSON types only.

        Returns:
            ``{"path", "n_vectors", "n_rows", "seconds", "vectors_per_s", "family", "dtype", "device",
            "highlights", "notes"}``; each highlight ``{"id", "matrix", "pole", "token", "prob"}``.

        Example:
            >>> map_model(None, "demo-atlas", MapOptions(layers="29")).to_dict()["n_rows"]  # doctest: +SKIP
            9216
        """
        m = self.meta
        return {"path": str(self.path), "n_vectors": self.n_vectors, "n_rows": m["n_rows"],
                "seconds": round(self.seconds, 3), "vectors_per_s": m["timings"]["vectors_per_s"],
                "family": m["family"], "dtype": m["dtype"], "device": m["device"],
                "highlights": [dict(h) for h in self.highlights], "notes": list(self.notes)}


def map_model(
    source: Source | str | None,
    out: Path | str,
    options: MapOptions = MapOptions(),
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    resume: bool = False,
    ray: str | None = None,
) -> MapResult:
    """Decode every neuron vector of a model into an atlas.

    Each finished (matrix, layer) is kept as a part in ``.NAME.parts`` beside ``out``
    (neuronmap.mapping.parts) until the atlas is assembled, so a map that is stopped can resume.

    Args:
        source: anything ``resolve_source`` takes (None: the demo model).
        out: atlas directory to create.
        options: matrices, layers, top-k, device, dtype, norm options.
        overwrite: replace an existing ``out``.
        progress: called as ``progress(parts_done, n_parts, vectors_done)``.
        resume: reuse the parts an interrupted map with the same weights and options left.
        ray: decode the parts as tasks on a Ray cluster (neuronmap.mapping.distributed): ``local`` (start one here),
            ``auto`` (the running one, or ``$RAY_ADDRESS``), ``HOST:PORT`` or ``ray://HOST:PORT``; None: here.

    Returns:
        MapResult.

    Raises:
        NeuronmapError: bad source, options or output; ``resume`` with other weights or options; Ray missing,
            unreachable, or a task failing. No atlas is left half-written; the finished parts stay for ``resume``.

    Example:
        >>> r = map_model(None, "demo-atlas", MapOptions(layers="29", matrices="up"))  # doctest: +SKIP
        >>> r.n_vectors
        1536
    """
    t0 = time.perf_counter()
    plan = plan_map(source, out, options, overwrite, resume, ray)
    timings = {"read_s": 0.0, "decode_s": 0.0, "write_s": 0.0}
    parts = open_parts(plan.out, plan.manifest, resume)  # after every option is checked: a refused map leaves nothing
    notes = plan.notes + resume_notes(parts, plan)
    done = set(parts.done)

    def note() -> str:
        return (f"{len(done)} of {len(plan.order)} parts are kept in {parts.path}; run the same command with --resume "
                "to continue")

    with fsio.interrupt_note(note):  # until the atlas is in place, an interrupted map says how to resume it
        ran = run_parts(plan, parts, done, timings, progress, notes)
        meta, best = assemble_atlas(plan, parts, ran, timings, t0)
    return MapResult(plan.out, meta, plan.n_vectors, meta["timings"]["total_s"], highlights(best), notes)


@dataclass(frozen=True)
class Plan:
    """A map checked and resolved before any vector is decoded.

    Attributes:
        src, weights: the model; out: the atlas directory; protect: the model's own paths, never written over.
        options: as given; matrices, layers: resolved; device, dtype: resolved (on Ray the workers resolve the device).
        order: (matrix, layer) parts in the order a single pass writes rows; reduce, kernel: the reduction chosen.
        manifest: what a part's rows depend on (a resume compares it); notes: what the run found before it began.
    """

    src: Source
    weights: Weights
    out: Path
    protect: tuple[Path, ...]
    options: MapOptions
    overwrite: bool
    ray: str | None
    matrices: list[str]
    layers: list[int]
    device: object
    dtype: str
    order: list[tuple[str, int]]
    reduce: Callable
    kernel: str
    manifest: dict
    notes: list[str]

    @property
    def n_vectors(self) -> int:
        return len(self.order) * self.weights.d_mlp


def plan_map(source: Source | str | None, out: Path | str, options: MapOptions, overwrite: bool, resume: bool,
             ray: str | None) -> Plan:
    """Check every input (output first, then Ray, weights and options) and resolve what the map will do.

    Raises:
        NeuronmapError: a bad source, output or option; Ray missing or a bad address.
    """
    src = source if isinstance(source, Source) else resolve_source(source)
    # The model's own files are never written over, whatever -o and --overwrite say.
    protect = (src.path, *src.files, *((Path(options.sae),) if options.sae else ()))
    out = atlas_out.check_output(Path(out), overwrite, protect)  # fail before reading any weights
    if ray is not None:  # before minutes of hashing: Ray missing or a bad address is one line at once
        from neuronmap.mapping.distributed import check_address, import_ray

        import_ray()
        check_address(ray)
    notes = [f"removed {p.name}, left beside {out.name} by a run that was killed" for p in fsio.remove_stale(out)]
    weights = open_weights(src)
    saes = []
    if options.sae is not None:
        weights, saes = sae_weights(weights, options, ray)
        matrices = parse_matrices(options.matrices, FEATURE_MATRICES)
        layers = sae_layers(options.layers, weights)
    else:
        matrices = parse_matrices(options.matrices, weights.family.matrices)
        layers = parse_layers(options.layers, weights.n_layers)
    if not 1 <= options.top_k <= weights.d_vocab:
        raise NeuronmapError(f"top_k={options.top_k} is out of range: expected 1 to {weights.d_vocab} (the vocabulary size)")
    if options.norm not in NORM_MODES:
        raise NeuronmapError(f"unknown norm={options.norm!r}: expected final or none")
    # On Ray the workers resolve the device: a driver without a GPU may drive GPU workers.
    device = resolve_device(options.device) if ray is None else options.device
    dtype = resolve_dtype(options.dtype, device)
    order = [(m, layer) for layer in layers for m in matrices]  # the order a single pass writes rows in
    reduce = choose_reducer(options.kernel, len(layers) * len(matrices) * weights.d_mlp * weights.d_vocab)
    kernel = kernel_used(reduce, weights.d_vocab, dtype, str(device), options.top_k)
    # What a part's rows depend on, and nothing else: the resolved matrices and layers (not the option text), and
    # the precision class rather than the kernel or device, since every exact kernel gives the same atlas to ~1e-6.
    manifest = {"weights": [{"name": f.name, "sha256": file_sha256(f)} for f in src.files],
                "matrices": matrices, "layers": layers, "top_k": options.top_k, "norm": options.norm,
                "fold_input_norm": options.fold_input_norm, "precision": precision(dtype, options.n_candidates),
                "format": atlas_io.VERSION, "sae": [s.sha256 for s in saes]}
    return Plan(src, weights, out, protect, options, overwrite, ray, matrices, layers, device, dtype, order, reduce,
                kernel, manifest, notes)


def sae_weights(weights: Weights, options: MapOptions, ray: str | None) -> tuple[FeatureWeights, list]:
    """The model's weights with the features of the SAEs at ``options.sae`` in place of its neurons.

    Raises:
        NeuronmapError: ``--ray`` or ``--fold-input-norm`` with ``--sae``; a bad SAE (neuronmap.sources.sae).
    """
    if ray is not None:
        raise NeuronmapError("sae=... cannot run on Ray yet: drop ray=... (an SAE's features map in seconds to minutes here)")
    if options.fold_input_norm:
        raise NeuronmapError("fold_input_norm=True applies to MLP neurons, not SAE features: drop it with sae=...")
    saes = open_saes(options.sae, weights)
    return FeatureWeights(weights, saes), saes


def sae_layers(text: str | None, weights: FeatureWeights) -> list[int]:
    """--layers for a feature map: the SAEs' layers (None: all of them), refusing a layer with no SAE."""
    have = sorted(weights.saes)
    layers = parse_layers(text, weights.n_layers) if text is not None else have
    missing = [x for x in layers if x not in weights.saes]
    if missing:
        raise NeuronmapError(f"layers={text!r}: there is no SAE at layer {missing[0]}; the SAEs given are at layers "
                             f"{format_ranges(have)}")
    return layers


def resume_notes(parts, plan: Plan) -> list[str]:
    """One line each for parts removed, reused or decoded again."""
    notes = []
    if parts.removed:
        notes.append(f"removed {parts.removed} parts of an earlier interrupted map into {plan.out} (--resume continues one instead)")
    if parts.reused:
        notes.append(f"resuming: reusing {parts.reused} of {len(plan.order)} parts from {parts.path}")
    if parts.redone:
        n = len(parts.redone)
        notes.append(f"decoding again {n} part{'s' if n > 1 else ''} of {parts.path} that failed their check: "
                     + "; ".join(parts.redone[:3]) + (f" and {len(parts.redone) - 3} more" if len(parts.redone) > 3 else ""))
    return notes


@dataclass(frozen=True)
class Ran:
    """Where the parts were decoded: the device and kernel that ran, and the Ray cluster (None: here)."""

    device: object
    kernel: str
    cluster: dict | None = None


def run_local(plan: Plan, todo: list[tuple[str, int]], finished: Callable, timings: dict, notes: list[str]) -> Ran:
    """Decode the parts ``todo`` in this process, handing each to ``finished(matrix, layer, tables, best)``."""
    t = time.perf_counter()
    head = build_head(plan.weights, plan.options.norm, plan.device, plan.dtype)
    vocab = pa.array(list(plan.weights.tokens), pa.string())
    timings["read_s"] += time.perf_counter() - t
    for matrix, layer in todo:
        finished(matrix, layer, *map_part(plan.weights, head, matrix, layer, plan.options, plan.reduce, vocab, timings))
    return Ran(plan.device, plan.kernel)


def run_ray(plan: Plan, todo: list[tuple[str, int]], finished: Callable, timings: dict, notes: list[str]) -> Ran:
    """Decode the parts ``todo`` as tasks on a Ray cluster (neuronmap.mapping.distributed), the same interface."""
    from neuronmap.mapping.distributed import run

    device, kernel, worked, cluster = run(plan.src, plan.options, plan.dtype, plan.reduce is compiled_reduce, todo,
                                          finished, plan.ray, notes)
    for k, v in worked.items():
        timings[k] += v
    return Ran(device, kernel, cluster)


def run_parts(plan: Plan, parts, done: set, timings: dict, progress: Callable | None, notes: list[str]) -> Ran:
    """Decode every part not in ``done``, writing each as it finishes (and adding it to ``done``); on failure keep
    what can be resumed.

    Raises:
        NeuronmapError: a part fails; where the failure can pass (a full disk, a lost cluster) the finished parts are
            kept and the message says to resume, else they are removed.
    """
    d_mlp = plan.weights.d_mlp

    def finished(matrix: str, layer: int, tables: list[pa.Table], best: dict) -> None:
        t = time.perf_counter()
        write_part(parts, matrix, layer, tables, best)
        timings["write_s"] += time.perf_counter() - t
        done.add((matrix, layer))
        if progress:
            progress(len(done), len(plan.order), len(done) * d_mlp)

    todo = [(m, layer) for m, layer in plan.order if (m, layer) not in done]
    if progress:
        progress(len(done), len(plan.order), len(done) * d_mlp)  # parts reused, before any work
    runner = run_local if plan.ray is None else run_ray
    try:
        return runner(plan, todo, finished, timings, notes)
    except NeuronmapError as e:
        # A write that failed (disk full) or a cluster that failed can go on once fixed; a model that cannot be
        # read would fail again.
        if done and (isinstance(e.__cause__, OSError) or isinstance(e, ResumableError)):
            raise NeuronmapError(f"{e}; the {len(done)} finished parts are kept in {parts.path}: add resume=True "
                                 "when you run it again") from e
        fsio.remove_tree(parts.path)
        raise
    except BaseException:
        if not done:  # nothing to resume from
            fsio.remove_tree(parts.path)
        raise


def assemble_atlas(plan: Plan, parts, ran: Ran, timings: dict, t0: float) -> tuple[dict, dict[str, dict]]:
    """Join the parts into the atlas directory, written whole or not at all, then remove the parts.

    Returns:
        ``(meta, best)``: meta.json as written, and the most confident row per content word.
    """
    best: dict[str, dict] = {}
    for matrix, layer in plan.order:
        for key, row in read_best(parts.path, matrix, layer).items():
            if key not in best or best[key]["prob"] < row["prob"]:  # first seen wins ties, as in one pass
                best[key] = row
    with atlas_out.atlas_writer(plan.out, plan.overwrite, plan.protect) as tmp:
        t = time.perf_counter()
        assemble(parts, plan.order, tmp / "neurons.parquet", plan.weights.d_mlp)
        atlas_out.write_vocab(tmp / "vocab.parquet", plan.weights.tokens)
        sums = atlas_out.seal(tmp, ("neurons.parquet", "vocab.parquet"))
        timings["write_s"] += time.perf_counter() - t
        meta = atlas_meta(plan, ran.device, timings, time.perf_counter() - t0)
        # Which kernel ran (a failed compile falls back to eager): the numbers agree to ~1e-6.
        meta["kernel"] = ran.kernel
        meta["sha256"] = sums  # checked by every reader (atlas.format.verify_file)
        if ran.cluster is not None:
            meta["ray"] = ran.cluster  # timings are summed over the workers
        if parts.reused:
            meta["resumed_parts"] = parts.reused  # their decode time is not in `timings`
        atlas_out.write_json(tmp / "meta.json", meta)
    fsio.remove_tree(parts.path)
    return meta, best


def precision(dtype: str, n_candidates: int) -> str:
    """The precision class of a decode, what a resume compares: ``exact`` (``split`` and ``float32``, whatever the
    kernel or device), or ``bfloat16 screening, N candidates``, whose tail probabilities are rounded."""
    return f"bfloat16 screening, {n_candidates} candidates" if dtype == "bfloat16" else "exact"


def atlas_meta(plan: Plan, device, timings: dict, seconds: float) -> dict:
    """meta.json of the atlas ``plan`` made (the kernel, sha256, Ray and resume entries are added by the caller)."""
    weights, src, options, dtype, n_vectors = plan.weights, plan.src, plan.options, plan.dtype, plan.n_vectors
    return {
        "format": atlas_io.FORMAT,
        "version": atlas_io.VERSION,
        "neuronmap_version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "spec": src.spec,
            "kind": src.kind,
            "path": str(src.path.resolve()),
            "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in src.files],
        },
        "family": weights.family.name,
        "n_layers": weights.n_layers,
        "d_model": weights.d_model,
        "d_mlp": weights.d_mlp,
        "d_vocab": weights.d_vocab,
        "tokenizer": weights.tokenizer,
        "decode": {
            "norm": options.norm,
            "final_norm": weights.family.norm if options.norm == "final" else "none",
            "eps": weights.eps,
            "softcap": weights.softcap,
            "fold_input_norm": options.fold_input_norm,
            "top_k": options.top_k,
            "matrices": list(plan.matrices),
            "layers": list(plan.layers),
            "poles": ["+", "-"],
            "screen_candidates": options.n_candidates if dtype == "bfloat16" else None,
        },
        "dtype": dtype,
        "device": str(device),
        "n_vectors": n_vectors,
        "n_rows": 2 * n_vectors,
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "total_s": round(seconds, 3),
                    "vectors_per_s": round(n_vectors / max(seconds, 1e-9), 1)},
        # An atlas of SAE features (ids L{layer}F{index}, matrices enc/dec; d_mlp is d_sae): each SAE decoded.
        **({"sae": [weights.saes[x].to_dict() for x in plan.layers], "d_sae": weights.d_mlp}
           if isinstance(weights, FeatureWeights) else {}),
    }
