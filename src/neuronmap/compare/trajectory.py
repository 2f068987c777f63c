"""``trajectory``: the checkpoints ``map-many`` mapped (neuronmap.compare.series), compared along the run.

``trajectory`` compares each checkpoint with the last one at the neuron level
(``compare.compare_neurons``: the share of vectors with the same top-1 token,
the top-k overlap and the Jensen-Shannon divergence, per layer and matrix, both
poles together) and lists, between consecutive checkpoints, the concepts that
appear (some vector's confident top-1 in the later one, in no vector of the
earlier) and vanish.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from neuronmap.atlas.handle import Atlas

from neuronmap.core import fsio
from neuronmap.compare import MIN_PROB, Side, compare_neurons, select_rows, shape_differences, side_vocab, vocab_hash
from neuronmap.core.errors import NeuronmapError
from neuronmap.compare.series import SERIES

TOP = 10  # concepts listed per step and direction


@dataclass(frozen=True)
class Trajectory:
    """Each checkpoint against the last, and the concepts that appear or vanish along the run.

    Attributes:
        checkpoints: ``{"name", "spec", "atlas"}`` in run order.
        k, min_prob: tokens compared per row; the confidence threshold for concepts.
        overall: per checkpoint: ``{"checkpoint", "name", "n", "same_top1", "topk_overlap", "js"}`` against the last.
        layers: the same per checkpoint, matrix and layer (both poles), with ``"matrix"`` and ``"layer"``.
        steps: per consecutive pair: ``{"from", "to", "n_gained", "n_lost", "gained", "lost"}``, each concept a
            dict as ``compare``'s (token, n_vectors, best, matrix, pole, p).
    """

    checkpoints: list[dict]
    k: int
    min_prob: float
    overall: list[dict]
    layers: list[dict]
    steps: list[dict]

    def to_dict(self) -> dict:
        """JSON types only: every field."""
        return asdict(self)


def open_series(path: Path | str) -> list[Side]:
    """The atlases of a ``map-many`` directory, in run order (series.json; else the atlas subdirectories by name).

    Raises:
        NeuronmapError: not a directory; a series.json that cannot be read or lists an atlas outside the directory;
            fewer than two atlases, or atlases of different models.
    """
    path = Path(path)
    if not path.is_dir():
        raise NeuronmapError(f"{path} is not a directory: pass the out=... of `neuronmap map-many`")
    listed = _listed(path) if (path / SERIES).exists() else \
        [(p.name, p.name) for p in sorted(path.iterdir()) if (p / "meta.json").is_file()]
    if len(listed) < 2:
        raise NeuronmapError(f"{path} holds {len(listed)} atlas(es): a trajectory needs two or more; map the run's "
                             "checkpoints with `neuronmap map-many SOURCE... -o DIR`")
    sides = [Side(spec, path / name, Atlas.open(path / name).meta, False) for name, spec in listed]
    last = sides[-1]
    for s in sides[:-1]:
        diffs = shape_differences(s.meta, last.meta, s.meta.get("d_vocab") == last.meta.get("d_vocab")
                                  and vocab_hash(side_vocab(s)) == vocab_hash(side_vocab(last)))
        if s.meta.get("family") != last.meta.get("family"):
            diffs.insert(0, f"family {s.meta.get('family')} vs {last.meta.get('family')}")
        if diffs:
            raise NeuronmapError(f"{s.path.name} and {last.path.name} differ in {', '.join(diffs)}: a trajectory "
                                 "compares checkpoints of one model; use `neuronmap compare --level concept` across models")
    return sides


def _listed(path: Path) -> list[tuple[str, str]]:
    """``(name, spec)`` per atlas in series.json; each name one directory inside ``path``, never ``../B`` or ``/B``."""
    f = path / SERIES
    try:
        listed = [(a["name"], a["spec"]) for a in json.loads(f.read_text(encoding="utf-8"))["atlases"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NeuronmapError(f"cannot read {f} ({e.strerror if isinstance(e, OSError) else 'not a map-many listing'}): "
                             f"run map-many again, or remove it to compare the atlases in {path} by name") from e
    for name, spec in listed:
        if not isinstance(name, str) or not isinstance(spec, str) or name in ("", ".", "..") or "/" in name \
                or "\\" in name or "\0" in name:
            raise NeuronmapError(f"{f} lists atlas {name!r}, not a directory inside {path}: a trajectory reads only the "
                                 "atlases in its directory; list each by its name there (e.g. 000-step-10)")
    return listed


def trajectory(path: Path | str, matrices: str | None = None, layers: str | None = None, min_prob: float = MIN_PROB,
               top: int = TOP) -> Trajectory:
    """Compare every checkpoint of a ``map-many`` directory with the last, and each with the one before.

    Args:
        path: the directory ``map_many`` wrote.
        matrices, layers: what to compare (default: all that every atlas holds).
        min_prob: a top-1 prob above this is confident (concepts).
        top: concepts listed per step and direction (0: all).

    Returns:
        Trajectory.

    Raises:
        NeuronmapError: as ``open_series``; matrices or layers some atlas lacks.

    Example:
        >>> t = trajectory("run-atlases")  # doctest: +SKIP
        >>> [round(r["same_top1"], 2) for r in t.overall]
        [0.71, 0.83, 0.94, 1.0]
    """
    if not 0.0 <= min_prob < 1.0:
        raise NeuronmapError(f"min_prob={min_prob} is out of range: expected 0 <= p < 1")
    sides = open_series(path)
    chosen = [select_rows(s, s.path.name, matrices, layers) for s in sides]
    mats = [m for m in chosen[-1][0] if all(m in c[0] for c in chosen)]
    lays = sorted(set.intersection(*(set(c[1]) for c in chosen)))
    if not mats or not lays:
        raise NeuronmapError(f"the atlases in {path} share no {'matrix' if not mats else 'layer'}: map them with the "
                             "same matrices=... and layers=...")
    last = sides[-1]
    overall, per_layer, steps = [], [], []
    k = None
    for i, s in enumerate(sides):
        nc = compare_neurons(s, last, mats, lays, min_prob, 1)
        k = nc.k
        both = next(r for r in nc.overall if r["matrix"] == "all")
        overall.append({"checkpoint": i, "name": s.path.name, **{c: both[c] for c in ("n", "same_top1", "topk_overlap", "js")}})
        per_layer += [{"checkpoint": i, "name": s.path.name, **r} for r in _both_poles(nc.layers)]
        if i:
            step = compare_neurons(sides[i - 1], s, mats, lays, min_prob, top)
            steps.append({"from": sides[i - 1].path.name, "to": s.path.name, "n_gained": step.n_gained,
                          "n_lost": step.n_lost, "gained": step.gained, "lost": step.lost})
    checkpoints = [{"name": s.path.name, "spec": s.spec, "atlas": str(s.path)} for s in sides]
    return Trajectory(checkpoints, k, min_prob, overall, per_layer, steps)


def _both_poles(rows: list[dict]) -> list[dict]:
    """compare's per (matrix, layer, pole) rows as per (matrix, layer), both poles weighted by their counts."""
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        a = acc.setdefault((r["matrix"], r["layer"]), [0, 0.0, 0.0, 0.0])
        a[0] += r["n"]
        for j, c in enumerate(("same_top1", "topk_overlap", "js"), 1):
            a[j] += r[c] * r["n"]
    return [{"matrix": m, "layer": layer, "n": int(a[0]), "same_top1": a[1] / a[0], "topk_overlap": a[2] / a[0],
             "js": a[3] / a[0]} for (m, layer), a in acc.items()]


def plot(t: Trajectory, out: Path | str) -> Path:
    """Draw agreement with the last checkpoint along the run into a PNG: per matrix, and per layer as a heat map.

    Raises:
        NeuronmapError: ``out`` does not end in .png, or its directory does not exist.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = fsio.check_png(out)
    names = [c["name"] for c in t.checkpoints]
    fig = Figure(figsize=(10, 3.8), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    for m in dict.fromkeys(r["matrix"] for r in t.layers):
        rows = [r for r in t.layers if r["matrix"] == m]
        y = [sum(r["same_top1"] * r["n"] for r in rows if r["checkpoint"] == i) /
             sum(r["n"] for r in rows if r["checkpoint"] == i) for i in range(len(names))]
        ax1.plot(range(len(names)), [100 * v for v in y], marker=".", label=m)
    ax1.set(xlabel="checkpoint", ylabel="same top-1 as the last (%)", ylim=(0, 101), title="agreement with the last")
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax1.legend(fontsize=8)
    layers = sorted({r["layer"] for r in t.layers})
    grid = np.zeros((len(layers), len(names)))
    for j, layer in enumerate(layers):
        for i in range(len(names)):
            rows = [r for r in t.layers if r["layer"] == layer and r["checkpoint"] == i]
            grid[j, i] = 100 * sum(r["same_top1"] * r["n"] for r in rows) / sum(r["n"] for r in rows)
    im = ax2.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=100, cmap="viridis")
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax2.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax2.set(xlabel="checkpoint", ylabel="layer", title="same top-1 as the last (%), by layer")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    with fsio.atomic_file(out, "plot") as tmp:
        fig.savefig(tmp, format="png")
    return out
