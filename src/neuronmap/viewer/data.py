"""What each page shows, from the request's query: the same API calls the CLI makes, with the same checks.

Each method returns one named result: ``Found`` (the atlas read and the API's result) or a page's own dataclass;
every one has ``atlas`` (the served atlas it read, for the page's header) and ``to_dict()`` (the ``/api/`` payload,
which is the CLI's ``--json``). Results that take long to compute and depend only on the atlas (stats, the
confident words, comparisons) are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.requests import Request

from neuronmap.atlas import search as search_api
from neuronmap.atlas.handle import Atlas
from neuronmap.atlas.browse import PAGE, confident_words, layer_rows
from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.evidence import has_evidence, neuron_evidence
from neuronmap.core.ids import format_ranges, parse_neuron_id
from neuronmap.atlas.scoring import check_weights
from neuronmap.atlas.search import records
from neuronmap.atlas.similar import TOP as SIMILAR_TOP, similar
from neuronmap.atlas.stats import stats
from neuronmap.viewer.guard import MAX_DIGITS, shown, whole_number
from neuronmap.viewer.state import Report, RequestError, Served

METHODS = ("auto", "exact", "stored")
_LAYER = re.compile(r"[0-9]+")  # ASCII digits: isdigit() also takes "²", which int() refuses


def payload(result: object) -> dict:
    """The ``/api/`` form of a result: a plain dict as it is, else its ``to_dict()``."""
    return result if isinstance(result, dict) else result.to_dict()


@dataclass(frozen=True)
class Found:
    """What an API-only data method found: the atlas it read (None: none) and the result (``to_dict()`` or a dict)."""

    atlas: str | None
    result: object

    def to_dict(self) -> dict:
        return payload(self.result)


@dataclass(frozen=True)
class Overview:
    """The front page of one atlas: its meta.json, ``Stats`` and most confident content words."""

    atlas: str
    meta: dict
    stats: object
    words: object


@dataclass(frozen=True)
class SearchPage:
    """A search (None until a concept is typed) and why an ``auto`` search fell back to the stored top-k."""

    atlas: str
    result: object | None
    note: str | None = None

    def to_dict(self) -> dict:
        return self.result.to_dict()


@dataclass(frozen=True)
class NeuronPage:
    """One neuron: ``show``'s ``NeuronReport`` (ranks exact when the weights are present), its evidence if any."""

    atlas: str
    meta: dict
    report: object
    weights_ok: bool
    note: str | None
    evidence: object | None

    def to_dict(self) -> dict:
        return self.report.to_dict()


@dataclass(frozen=True)
class LayerPage:
    """One layer's rows (``layer``'s ``LayerRows``)."""

    atlas: str
    meta: dict
    rows: object

    def to_dict(self) -> dict:
        return self.rows.to_dict()


@dataclass(frozen=True)
class ComparePage:
    """Two served atlases compared (``compare``'s ``Comparison``)."""

    a: str
    b: str
    comparison: object

    @property
    def atlas(self) -> str:
        return self.a

    def to_dict(self) -> dict:
        return self.comparison.to_dict()


@dataclass(frozen=True)
class ReportPage:
    """A removal report and the served atlases of the model it edited or wrote (``report_atlases``)."""

    report: Report
    models: list
    atlas: None = None

    def to_dict(self) -> dict:
        return self.report.to_dict()


def query_int(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter in ``[lo, hi]``, in ASCII digits.

    Raises:
        RequestError: not a whole number, or out of range (the message names the parameter and the range).
    """
    text = request.query_params.get(key)
    if text is None or text == "":
        return default
    return whole_number(text, f"?{key}", lo, hi)


def _opt(request: Request, key: str) -> str | None:
    v = request.query_params.get(key)
    return v if v not in (None, "", "both", "all") else None


def report_atlases(report: dict, atlases: dict[str, Atlas]) -> list[tuple[str, str, frozenset[int]]]:
    """The served atlases of the model a removal report edited, or of the checkpoint it wrote.

    An atlas is of the model edited (``source``) when the sha256 of its weight files (meta.json) are those of the
    source's own files (edits.json's ``source_files``: a GGUF for the demo model), or include that of every file the
    edits rewrote ``before`` the edits; it is of the checkpoint written (``edited``) when they include every such
    file's sha256 ``after`` them.

    Returns:
        ``(atlas name, "source" | "edited", its mapped layers)`` per match, in the order served.
    """
    rewritten = [f for f in report["files"].values() if isinstance(f, dict)]
    own = {f["sha256"] for f in report.get("source_files", [])}
    out = []
    for name, files in atlases.items():
        have = {f["sha256"] for f in files.meta.get("source", {}).get("files", [])}
        for side, key in (("source", "before"), ("edited", "after")):
            if (rewritten and all(f.get(key) in have for f in rewritten)) or (side == "source" and own and own == have):
                out.append((name, side, frozenset(files.meta["decode"]["layers"])))
    return out


class Data:
    """The viewer's data, one method per page."""

    def __init__(self, served: Served):
        self.served = served

    def _atlas(self, request: Request, key: str = "atlas") -> tuple[str, Atlas]:
        return self.served.get(request.query_params.get(key))

    def weights(self, files: Atlas) -> tuple[bool, str | None]:
        """Whether the atlas's weights are where meta.json says, unchanged (sha256, cached by file stat), and why not."""
        try:
            check_weights(files, fix="search uses the stored top-k meanwhile")
            return True, None
        except NeuronmapError as e:
            return False, str(e)

    def atlases(self, request: Request) -> Found:
        return Found(None, {"atlases": [{"name": n, "path": str(f.root), "source": f.meta["source"]["spec"],
                                   "family": f.meta["family"], "n_layers": f.meta["n_layers"], "d_mlp": f.meta["d_mlp"],
                                   "matrices": f.meta["decode"]["matrices"]} for n, f in self.served.atlases.items()]})

    def reports(self, request: Request) -> Found:
        return Found(None, {"reports": [{"name": n, "path": str(r.path), "source": r.report["source"], "out": r.report["out"],
                                   "concepts": [s["concept"] for s in r.report["steps"]], "control": r.report["control"],
                                   "edits": sum(len(s["edits"]) for s in r.report["steps"])}
                                  for n, r in self.served.reports.items()]})

    def report(self, request: Request) -> ReportPage:
        """The report named in the path, and the served atlases of its model."""
        r = self.served.report(request.path_params["name"])
        return ReportPage(r, report_atlases(r.report, self.served.atlases))

    def _words(self, name: str, files: Atlas):
        return self.served.cached(("words", name), lambda: confident_words(files))

    def atlas(self, request: Request) -> Found:
        name, files = self._atlas(request)
        return Found(name, {"name": name, "path": str(files.root), "meta": files.meta,
                      "confident": records(self._words(name, files))})

    def stats(self, request: Request) -> Found:
        name, files = self._atlas(request)
        m, lay, pole = _opt(request, "matrices"), _opt(request, "layers"), _opt(request, "pole")
        return Found(name, self.served.cached(("stats", name, m, lay, pole), lambda: stats(files, m, lay, pole)))

    def overview(self, request: Request) -> Overview:
        name, files = self._atlas(request)
        return Overview(name, files.meta, self.stats(request).result, self._words(name, files))

    def search(self, request: Request) -> SearchPage:
        """``search``'s result; ``note`` says why an ``auto`` search fell back to the stored top-k."""
        name, files = self._atlas(request)
        q = request.query_params.get("q", "")
        concepts = [c for c in (q.split(",") if "," in q.strip(", ") else [q]) if c.strip()]
        if not concepts:
            raise RequestError("no concept given: pass at least one word, e.g. /search?q=coffee")
        method = request.query_params.get("method") or "auto"
        if method not in METHODS:
            raise RequestError(f"unknown method {method!r}: expected auto, exact or stored")
        top = query_int(request, "top", search_api.TOP, 1, 1000)
        note = None
        stored = method == "stored"
        if method == "auto":
            ok, why = self.weights(files)
            stored, note = (False, None) if ok else (True, f"searched the stored top-k: {why}")
        sort = request.query_params.get("sort") or "prob"
        r = search_api.search(files, concepts, _opt(request, "matrices"), _opt(request, "layers"), _opt(request, "pole"),
                              top, 0.0, stored, None, request.query_params.get("exact_token") not in ("1", "true", "on"),
                              sort)
        return SearchPage(name, r, note)

    def neuron(self, request: Request) -> NeuronPage:
        name, files = self._atlas(request)
        ok, note = self.weights(files)
        r = search_api.show(files, request.path_params["neuron"], stored=not ok)
        ev = neuron_evidence(files, request.path_params["neuron"]) if has_evidence(files) else None
        return NeuronPage(name, files.meta, r, ok, note, ev)

    def evidence(self, request: Request) -> Found:
        """``NeuronEvidence``, the payload of ``neuronmap examples --json``."""
        name, files = self._atlas(request)
        if not has_evidence(files):
            parse_neuron_id(request.path_params["neuron"], int(files.meta["n_layers"]), int(files.meta["d_mlp"]))
            raise RequestError(f"atlas {name!r} holds no activation evidence: add it with "
                               f"`neuronmap record {files.root} --corpus CORPUS`", 404)
        return Found(name, neuron_evidence(files, request.path_params["neuron"]))

    def similar(self, request: Request) -> Found:
        name, files = self._atlas(request)
        top = query_int(request, "top", SIMILAR_TOP, 1, 100)
        return Found(name, similar(files, request.path_params["neuron"], _opt(request, "matrices"), top))

    def layer(self, request: Request) -> LayerPage:
        name, files = self._atlas(request)
        layers = files.meta["decode"]["layers"]
        text = request.path_params["layer"]
        if not _LAYER.fullmatch(text):
            raise RequestError(f"layer {shown(text)} is not a layer number: expected e.g. /layer/{layers[-1]}")
        if len(text) > MAX_DIGITS:
            raise RequestError(f"layer {shown(text)} is out of range: the atlas holds layers {format_ranges(layers)}")
        page = query_int(request, "page", 0, 0, 10**7)
        desc = request.query_params.get("desc")
        lr = layer_rows(files, int(text), request.query_params.get("matrix") or None, _opt(request, "pole"),
                        request.query_params.get("sort") or "confidence", None if desc in (None, "") else desc in ("1", "true"),
                        _opt(request, "class"), page * PAGE, PAGE)
        return LayerPage(name, files.meta, lr)

    def compare(self, request: Request) -> ComparePage:
        """Two served atlases compared (default: the first two)."""
        from neuronmap.compare import TOP, compare

        names = self.served.names
        if len(names) < 2:
            raise RequestError("compare needs two atlases: serve both, e.g. `neuronmap serve base-atlas tuned-atlas`", 404)
        a, fa = self.served.get(request.query_params.get("a") or names[0])
        b, fb = self.served.get(request.query_params.get("b") or names[1])
        level = request.query_params.get("level") or "auto"
        top = query_int(request, "top", TOP, 1, 1000)
        c = self.served.cached(("compare", a, b, level, top), lambda: compare(str(fa.root), str(fb.root), level, top=top))
        return ComparePage(a, b, c)
