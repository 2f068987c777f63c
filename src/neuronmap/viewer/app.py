"""The viewer's routes: each page and its ``/api/...`` twin call the same API function and share its result.

``/api/X`` answers ``result.to_dict()``, the payload ``neuronmap X --json`` prints;
the page renders the same object. Bad input answers 4xx with the CLI's one-line
message: an HTML page for a page, ``{"error": ...}`` for the API.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.damage import damaged_data
from neuronmap.viewer import pages
from neuronmap.viewer.guard import HEADERS, JSON, Guard, error_response, read_body
from neuronmap.viewer.render import error_box, layout
from neuronmap.viewer.state import RequestError, Served
from neuronmap.viewer.data import Data, Found, Overview, SearchPage
from neuronmap.viewer.steer import SteerRunner

STATIC = Path(__file__).parent / "static"
_NEURON = re.compile(r"^\s*L[0-9]+[NF][0-9]+\s*$")  # a neuron's id, or an SAE feature's


def _html(served: Served, request: Request, title: str, body: str, status: int = 200, atlas: str | None = None) -> HTMLResponse:
    text = layout(title, body, served.names, atlas, request.query_params.get("q", ""), list(served.reports))
    return HTMLResponse(text, status, headers=HEADERS)


def _status(e: NeuronmapError) -> int:
    return e.status if isinstance(e, RequestError) else 400


def _failure(e: Exception) -> tuple[str, int]:
    """(message, status) for an exception a route cannot recover from; a bug is re-raised (a 500 with its traceback)."""
    if isinstance(e, NeuronmapError):
        return str(e), _status(e)
    damaged = damaged_data(e)
    if damaged is None:
        raise e
    return damaged, 500


def page(served: Served, title, compute, render):
    """A page route: ``compute(request)`` gives a named result (or a redirect), ``render(request, result)`` its body."""
    def endpoint(request: Request) -> Response:
        try:
            result = compute(request)
            if isinstance(result, Response):
                return result
            return _html(served, request, title(request, result), render(request, result), atlas=result.atlas)
        except Exception as e:
            message, status = _failure(e)
            return _html(served, request, "error", error_box(message), status, request.query_params.get("atlas"))
    return endpoint


def api(compute):
    """An ``/api/`` route: ``compute(request).to_dict()``, the payload of the CLI's ``--json``."""
    def endpoint(request: Request) -> Response:
        try:
            return JSON(compute(request).to_dict(), headers=HEADERS)
        except Exception as e:
            message, status = _failure(e)
            return JSON({"error": message}, status, headers=HEADERS)
    return endpoint


@dataclass(frozen=True)
class IndexPage:
    """``/``: the first (or ``?atlas=``) atlas's overview and the removal reports; the reports alone without an atlas."""

    atlas: str | None
    overview: Overview | None
    reports: list[dict]


class Pages:
    """The computations and renderings that are more than one call of ``Data`` (the index, the search box)."""

    def __init__(self, served: Served, d: Data):
        self.served, self.d = served, d
        self.first = served.names[0] if served.names else ""  # a viewer of reports alone serves no atlas

    def index(self, request: Request) -> IndexPage:
        reports = self.d.reports(request).result["reports"]
        if not self.served.atlases:
            return IndexPage(None, None, reports)
        o = self.d.overview(request)
        return IndexPage(o.atlas, o, reports)

    def render_index(self, request: Request, x: IndexPage) -> str:
        o = x.overview
        head = pages.overview(o.atlas, self.first, o.meta, o.stats, o.words) if o else \
            '<h1>neuronmap</h1><p class="sub">this viewer serves removal reports only: serve an atlas beside them to browse its neurons</p>'
        return head + pages.report_index(x.reports)

    def search(self, request: Request) -> SearchPage | Response:
        q = request.query_params.get("q", "")
        if _NEURON.match(q):  # a neuron id typed into the search box opens that neuron
            name, _ = self.served.get(request.query_params.get("atlas"))
            target = f"/neuron/{q.strip()}" + (f"?atlas={name}" if name != self.first else "")
            return RedirectResponse(target, 303)
        if not q.strip():
            return SearchPage(self.served.get(request.query_params.get("atlas"))[0], None)
        return self.d.search(request)

    def render_search(self, request: Request, x: SearchPage) -> str:
        p = request.query_params
        evidence = "evidence" in self.served.get(x.atlas)[1].meta
        form = pages.search_form(x.atlas, self.first, p.get("q", ""), p.get("matrices", ""), p.get("layers", ""),
                                 p.get("pole", ""), p.get("method", "auto"), p.get("sort", "prob"), evidence)
        return form + (pages.search_results(x.atlas, self.first, x.result, x.note, evidence) if x.result
                       else "<p>type a concept, e.g. coffee</p>")


async def steer_endpoint(steer: SteerRunner, request: Request) -> Response:
    """``POST /api/steer``: queue a steering job (a JSON object), answer its id and place in the queue."""
    try:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # A cross-site form cannot send JSON without a preflight, which this server never grants.
            raise RequestError("POST /api/steer takes a JSON body (Content-Type: application/json)", 415)
        try:
            body = json.loads(await read_body(request) or b"{}")
        except RecursionError as e:  # json's parser recurses once per level
            raise RequestError("the request body nests too deeply to be a steering request: send one flat object "
                               'such as {"neuron": "L29N808", "value": "20x", "concept": "dog", "text": "..."}') from e
        except ValueError as e:
            raise RequestError(f"the request body is not JSON ({str(e)[:200]}): send an object such as "
                               '{"neuron": "L29N808", "value": "20x", "concept": "dog", "text": "..."}') from e
        return JSON(steer.submit(body), 202, headers=HEADERS)
    except NeuronmapError as e:
        return JSON({"error": str(e)}, _status(e), headers=HEADERS)


def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route or file, a method the route lacks) in the viewer's error forms."""
    if exc.status_code == 404:
        msg = (f"no page at {request.url.path}: the viewer has /, /search, /neuron/L{{layer}}N{{index}}, /layer/N, "
               "/compare and /report/NAME")
    elif exc.status_code == 405:
        allow = sorted(m.strip() for m in (exc.headers or {}).get("Allow", "GET").split(","))  # a set's order otherwise
        msg = f"{request.method} is not allowed at {request.url.path}: use {', '.join(allow)} (only POST /api/steer takes a body)"
    else:
        msg = f"{exc.detail} ({request.method} {request.url.path})"
    return error_response(request.app.state.served, request, msg, exc.status_code, exc.headers)


def server_error(request: Request, exc: Exception) -> Response:
    """A bug: one line to the client, not the traceback (Starlette still hands it to the server's log)."""
    msg = f"internal error ({type(exc).__name__}): this is a bug in neuronmap; the server's log has the details"
    return error_response(request.app.state.served, request, msg, 500)


def build(served: Served, steer: SteerRunner) -> Starlette:
    """The Starlette app for ``served`` (``create_app`` in neuronmap.viewer is the public entry)."""
    d = Data(served)
    p = Pages(served, d)
    first = p.first
    # path -> (title of the page, its data, its body); each page's /api/ twin serializes the same data.
    page_table = {
        "/": (lambda r, x: x.atlas or "reports", p.index, p.render_index),
        "/search": (lambda r, x: f"search {r.query_params.get('q', '')}", p.search, p.render_search),
        "/neuron/{neuron}": (lambda r, x: r.path_params["neuron"], d.neuron,
                             lambda r, x: pages.neuron(x.atlas, first, x.meta, x.report, x.weights_ok, x.note, x.evidence)),
        "/layer/{layer}": (lambda r, x: f"layer {r.path_params['layer']}", d.layer,
                           lambda r, x: pages.layer(x.atlas, first, x.meta, x.rows)),
        "/compare": (lambda r, x: "compare", d.compare, lambda r, x: pages.compare(x.a, x.b, first, x.comparison)),
        "/report/{name}": (lambda r, x: f"report {r.path_params['name']}", d.report,
                           lambda r, x: pages.report(x.report, x.models, first)),
    }
    api_table = {
        "/api/atlases": d.atlases, "/api/atlas": d.atlas, "/api/stats": d.stats, "/api/search": d.search,
        "/api/neuron/{neuron}": d.neuron, "/api/similar/{neuron}": d.similar, "/api/evidence/{neuron}": d.evidence,
        "/api/layer/{layer}": d.layer, "/api/compare": d.compare, "/api/reports": d.reports,
        "/api/report/{name}": d.report, "/api/jobs/{job}": lambda r: Found(None, steer.status(r.path_params["job"])),
    }
    routes = [Route(path, page(served, title, compute, render)) for path, (title, compute, render) in page_table.items()]
    routes += [Route(path, api(compute)) for path, compute in api_table.items()]
    routes += [
        Route("/api/steer", partial(steer_endpoint, steer), methods=["POST"]),
        Route("/favicon.ico", lambda request: Response(status_code=204, headers=HEADERS)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                    middleware=[Middleware(Guard, served=served)])
    app.state.served, app.state.steer = served, steer
    return app
