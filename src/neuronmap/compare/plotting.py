"""Agreement against depth, drawn into a PNG."""

from __future__ import annotations

from pathlib import Path
import pandas as pd

from neuronmap.core.fsio import atomic_file, check_png


def plot(c: Comparison, out: Path | str) -> Path:  # noqa: F821 (importing Comparison would close a circle)
    """Draw agreement against depth into a PNG (written to a temp file, then renamed).

    Neuron level: same top-1 share and mean JS per layer, one line per matrix (both poles).
    Concept level: per layer, the share of its confident concepts the other model also has.

    Raises:
        NeuronmapError: ``out`` does not end in .png, or its directory does not exist.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = check_png(out)
    title = f"A: {c.a.spec}   B: {c.b.spec}"
    if c.neuron is not None:
        fig = Figure(figsize=(9, 3.4), dpi=100)
        ax1, ax2 = fig.subplots(1, 2)
        df = pd.DataFrame(c.neuron.layers)
        for mat, g in df.groupby("matrix", sort=False):
            g = g.assign(w_same=g["same_top1"] * g["n"], w_js=g["js"] * g["n"]).groupby("layer")[["n", "w_same", "w_js"]].sum()
            ax1.plot(g.index, 100 * g["w_same"] / g["n"], marker=".", label=mat)
            ax2.plot(g.index, g["w_js"] / g["n"], marker=".", label=mat)
        ax1.set(xlabel="layer", ylabel="same top-1 token (%)", ylim=(0, 101), title="agreement")
        ax2.set(xlabel="layer", ylabel="mean JS divergence (bits)", ylim=(0, None), title="divergence")
        ax1.legend(fontsize=8)
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        fig = Figure(figsize=(6, 3.6), dpi=100)
        ax1 = fig.subplots()
        df = pd.DataFrame(c.concept.by_layer)
        for s, label in (("a", "A's concepts found in B"), ("b", "B's concepts found in A")):
            g = df[df["side"] == s]
            ax1.plot(g["depth"], 100 * g["shared_share"], marker=".", label=label)
        ax1.set(xlabel="relative depth (layer / (n_layers - 1))", ylabel="shared concepts (%)", ylim=(0, 101), title="concept overlap")
        ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    with atomic_file(out, "plot") as tmp:
        fig.savefig(tmp, format="png")
    return out
