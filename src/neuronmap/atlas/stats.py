"""Summaries of an atlas per layer and matrix, and a plot of them against depth.

Every number is over atlas rows, one per (vector, pole), through DuckDB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neuronmap.atlas.format import AtlasFiles
from neuronmap.atlas.concepts import read_vocab
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.fsio import atomic_file, check_png
from neuronmap.atlas.store import choose_rows, connect, where_clause
from neuronmap.atlas.search import records

if TYPE_CHECKING:  # the handle calls these functions; they only name its type
    from neuronmap.atlas.handle import Atlas

TOKEN_CLASSES = ("word", "subword", "number", "punctuation", "whitespace", "other")
CONFIDENT = 0.5


def token_class(s: str) -> str:
    """The class of a token string (leading space kept), one of ``TOKEN_CLASSES``.

    - ``whitespace``: empty, or only spaces, tabs and newlines (``" "``, ``"\\n\\n"``).
    - ``word``: one leading space, then letters only: a word, or the first piece of a
      longer one, in running text (``" dog"``, ``" Paris"``, ``" été"``, ``" strugg"``).
    - ``subword``: letters only, no leading space: a piece inside a word, or a word
      glued to what precedes it (``"ing"``, ``"Dog"``).
    - ``number``: digits, after at most one leading space (``" 1999"``, ``"7"``).
    - ``punctuation``: no letter or digit, at least one other visible character:
      punctuation and symbols, possibly with whitespace (``"."``, ``" ("``, ``".\\n"``).
    - ``other``: the rest: letters mixed with digits or symbols, special tokens
      (``"<|im_end|>"``), pieces of multi-byte characters (``"\\\\xe2"``).

    Example:
        >>> [token_class(t) for t in [" dog", "ing", " 42", " (", "\\n", "<|im_end|>"]]
        ['word', 'subword', 'number', 'punctuation', 'whitespace', 'other']
    """
    if not s.strip():
        return "whitespace"
    body = s[1:] if s.startswith(" ") else s
    if body.isalpha():
        return "word" if s.startswith(" ") else "subword"
    if body.isdigit():
        return "number"
    if not any(ch.isalnum() for ch in s):
        return "punctuation"
    return "other"


@functools.lru_cache(maxsize=8)
def _classes(vocab: Path, stamp: int) -> np.ndarray:
    tokens = read_vocab(AtlasFiles(vocab.parent, {}))
    return np.array([TOKEN_CLASSES.index(token_class(t)) for t in tokens], np.int8)


def vocab_classes(files: AtlasFiles) -> np.ndarray:
    """Each token id's class, an index into ``TOKEN_CLASSES``; ``[d_vocab]`` int8, computed once per vocab file.

    Classifying a 128k vocabulary takes ~0.1 s in Python; a viewer asks for it on every layer page.
    """
    return _classes(files.vocab, files.vocab.stat().st_mtime_ns)


@dataclass(frozen=True)
class Stats:
    """What ``stats`` found.

    Attributes:
        layers: one row per (layer, matrix): ``layer matrix rows confident entropy_p10
            entropy_p50 entropy_p90 entropy_mean`` then one share per ``TOKEN_CLASSES`` of the
            rows' top-1 tokens, then ``top_tokens`` (the 3 most frequent top-1 tokens, with counts).
            ``confident`` is the share of rows whose top-1 token has p > 0.5.
        top_tokens: the most frequent top-1 tokens over all chosen rows: ``token_id token rows share class``.
        n_rows: rows summarised.
        atlas: the atlas directory.
        agreement: where the atlas holds activation evidence, one row per chosen (layer, matrix, pole):
            ``layer matrix pole neurons`` and the mean scores of ``neuronmap.evidence.agreement`` (``next_hit
            current_hit effect_share`` and their ``*_base``); else None.
    """

    layers: pd.DataFrame
    top_tokens: pd.DataFrame
    n_rows: int
    atlas: Path
    agreement: pd.DataFrame | None = None

    def to_dict(self) -> dict:
        """The serialized form (``--json``, the viewer's API), JSON types only.

        Returns:
            ``{"atlas", "n_rows", "layers", "top_tokens", "agreement"}``: one dict per row of each table (nan as
            None, a layer's ``top_tokens`` as ``[token, rows]`` pairs; ``agreement`` None without evidence).

        Example:
            >>> stats(open_files("demo-atlas"), layers="29").to_dict()["layers"][0]["matrix"]  # doctest: +SKIP
            'gate'
        """
        return {"atlas": str(self.atlas), "n_rows": self.n_rows, "layers": records(self.layers),
                "top_tokens": records(self.top_tokens),
                "agreement": None if self.agreement is None else records(self.agreement)}


def stats(atlas: Atlas, matrices: str | None = None, layers: str | None = None, pole: str | None = None,
          n_top: int = 20) -> Stats:
    """Per layer and matrix: confident share, entropy quantiles, token classes, frequent top tokens.

    Args:
        files: the atlas (``open_files``).
        matrices, layers, pole: which rows (CLI syntax); default all.
        n_top: how many overall most frequent top-1 tokens to return.

    Raises:
        NeuronmapError: options asking for rows the atlas lacks.

    Example:
        >>> s = stats(open_files("demo-atlas"))  # doctest: +SKIP
        >>> s.layers.loc[s.layers.layer == 29, ["matrix", "confident"]]
    """
    mats, lays, poles = choose_rows(atlas.meta, matrices, layers, pole)
    tokens = read_vocab(atlas)
    con = connect()
    con.register("vocab", pd.DataFrame({"token_id": range(len(tokens)), "token": tokens,
                                        "cls": np.array(TOKEN_CLASSES)[vocab_classes(atlas)]}))
    # Only the top-1 id, its p and the entropy are read (not the token strings), once, into a table the queries share.
    con.execute("CREATE TEMP TABLE rows AS SELECT layer, matrix, token_ids[1] AS top_id, probs[1] AS p, entropy "
                f"FROM read_parquet(?) WHERE {where_clause(mats, lays, poles)}", [str(atlas.neurons)])
    shares = ", ".join(f"avg((c.cls = '{k}')::DOUBLE) AS {k}" for k in TOKEN_CLASSES)
    by = con.execute(f"""
        SELECT layer, matrix, count(*) AS rows, avg((p > {CONFIDENT})::DOUBLE) AS confident,
               quantile_cont(entropy, 0.1) AS entropy_p10, quantile_cont(entropy, 0.5) AS entropy_p50,
               quantile_cont(entropy, 0.9) AS entropy_p90, avg(entropy) AS entropy_mean, {shares}
        FROM rows r JOIN vocab c ON c.token_id = r.top_id GROUP BY layer, matrix""").df()
    freq = con.execute("""
        SELECT layer, matrix, list(struct_pack(token := v.token, rows := n) ORDER BY n DESC, top_id) [1:3] AS top_tokens
        FROM (SELECT layer, matrix, top_id, count(*) AS n FROM rows GROUP BY ALL) JOIN vocab v ON v.token_id = top_id
        GROUP BY layer, matrix""").df()
    order = {m: i for i, m in enumerate(mats)}
    by = by.merge(freq, on=["layer", "matrix"])
    by = by.sort_values(["layer", "matrix"], key=lambda s: s.map(order) if s.name == "matrix" else s).reset_index(drop=True)
    by["top_tokens"] = [[(d["token"], int(d["rows"])) for d in v] for v in by["top_tokens"]]
    n_rows = int(by["rows"].sum())
    if n_rows == 0:
        raise NeuronmapError(f"{atlas.root} has no rows for these options: widen matrices=..., layers=... or pole=...")
    top = con.execute(f"""
        SELECT top_id AS token_id, any_value(v.token) AS token, count(*) AS rows, count(*) / {n_rows} AS share
        FROM rows JOIN vocab v ON v.token_id = top_id GROUP BY top_id ORDER BY rows DESC, token_id LIMIT {int(n_top)}""").df()
    top["class"] = [token_class(t) for t in top["token"]]
    agree = None
    if "evidence" in atlas.meta:
        agree = pd.DataFrame(atlas.meta["evidence"]["agreement"])
        agree = agree[agree["layer"].isin(lays) & agree["matrix"].isin(mats) & agree["pole"].isin(poles)]
        agree = agree.reset_index(drop=True)
    return Stats(by, top, n_rows, atlas.root, agree)


def plot(result: Stats, out: Path | str, title: str = "") -> Path:
    """Write a PNG of ``stats`` against depth: confident share, entropy, token classes, frequent top tokens.

    Written to a temporary file beside ``out``, then renamed.

    Raises:
        NeuronmapError: ``out`` is not a .png, or its directory does not exist.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = check_png(out)
    df = result.layers
    colors = {"gate": "tab:orange", "up": "tab:blue", "down": "tab:green"}
    has_agreement = result.agreement is not None and len(result.agreement)
    fig, ax = plt.subplots(3 if has_agreement else 2, 2, figsize=(11, 11 if has_agreement else 7.5), dpi=80)
    for m, g in df.groupby("matrix", sort=False):
        ax[0, 0].plot(g["layer"], 100 * g["confident"], marker="o", ms=3, label=m, color=colors.get(m))
        ax[0, 1].plot(g["layer"], g["entropy_p50"], marker="o", ms=3, label=m, color=colors.get(m))
        ax[0, 1].fill_between(g["layer"], g["entropy_p10"], g["entropy_p90"], alpha=0.1, color=colors.get(m))
    ax[0, 0].set(title=f"confident: top token has p > {CONFIDENT}", xlabel="layer", ylabel="% of rows")
    ax[0, 1].set(title="entropy: median, band 10th-90th percentile", xlabel="layer", ylabel="nats")
    pooled = df.assign(**{k: df[k] * df["rows"] for k in TOKEN_CLASSES}).groupby("layer")[[*TOKEN_CLASSES, "rows"]].sum()
    ax[1, 0].stackplot(pooled.index, *[100 * pooled[k] / pooled["rows"] for k in TOKEN_CLASSES], labels=TOKEN_CLASSES,
                       alpha=0.85)
    ax[1, 0].set(title="class of the top token (all matrices)", xlabel="layer", ylabel="% of rows", ylim=(0, 100))
    top = result.top_tokens.head(15).iloc[::-1]
    ax[1, 1].barh([repr(t) for t in top["token"]], 100 * top["share"], color="tab:gray")
    ax[1, 1].set(title="most frequent top tokens (all rows)", xlabel="% of rows")
    for a in (ax[0, 0], ax[0, 1]):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    ax[1, 0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=6, frameon=False)
    if has_agreement:
        _plot_agreement(result.agreement, ax[2], colors)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_file(out, "plot") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out


def _plot_agreement(agree: pd.DataFrame, ax, colors: dict) -> None:
    """Agreement against depth: per matrix, both poles pooled by their neurons; dashed: the baseline."""
    for col, (score, title) in enumerate((("next", "next token in the decoded top-k at top activations"),
                                          ("current", "current token in the decoded top-k at top activations"))):
        for m, g in agree.groupby("matrix", sort=False):
            w = g.dropna(subset=[f"{score}_hit"]).assign(n=lambda d: d["neurons"].astype(float))
            by = w.groupby("layer").apply(lambda d: pd.Series({
                "hit": (d[f"{score}_hit"] * d["n"]).sum() / d["n"].sum(),
                "base": (d[f"{score}_base"] * d["n"]).sum() / d["n"].sum()}), include_groups=False)
            ax[col].plot(by.index, 100 * by["hit"], marker="o", ms=3, label=m, color=colors.get(m))
            ax[col].plot(by.index, 100 * by["base"], ls="--", lw=1, color=colors.get(m))
        ax[col].set(title=f"{title}\n(dashed: another neuron's top-k, the baseline)", xlabel="layer", ylabel="% of examples")
        ax[col].legend(fontsize=8)
        ax[col].grid(alpha=0.3)
