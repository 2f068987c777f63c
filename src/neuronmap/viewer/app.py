"""The viewer's routes: each page and its ``/api/...`` twin call the same API function and share its result.

``/api/X`` answers ``result.to_dict()``, the payload ``neuronmap X --json`` prints;
the page renders the same object. Bad input answers 4xx with the CLI's one-line
message: an HTML page for a page, ``{"error": ...}`` for the API.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from neuronmap.core.errors import NeuronmapError, damaged_data
from neuronmap.viewer import pages
from neuronmap.viewer.guard import HEADERS, JSON, Guard, error_response, read_body
from neuronmap.viewer.render import error_box, layout
from neuronmap.viewer.state import RequestError, Served
from neuronmap.viewer.data import Data
from neuronmap.viewer.steer import SteerRunner

STATIC = Path(__file__).parent / "static"
_NEURON = re.compile(r"^\s*L[0-9]+N[0-9]+\s*$")


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


def build(served: Served, steer: SteerRunner) -> Starlette:
    """The Starlette app for ``served`` (``create_app`` in neuronmap.viewer is the public entry)."""

    def page(title_of, compute, render):
        """A page route: ``compute(request) -> (atlas name, result)``, ``render(request, name, result) -> body``."""
        def endpoint(request: Request) -> Response:
            try:
                name, result = compute(request)
                if isinstance(result, Response):
                    return result
                return _html(served, request, title_of(request, name), render(request, name, result), atlas=name)
            except Exception as e:
                message, status = _failure(e)
                return _html(served, request, "error", error_box(message), status, request.query_params.get("atlas"))
        return endpoint

    def api(compute):
        def endpoint(request: Request) -> Response:
            try:
                _, result = compute(request)
                return JSON(result if isinstance(result, dict) else result.to_dict(), headers=HEADERS)
            except Exception as e:
                message, status = _failure(e)
                return JSON({"error": message}, status, headers=HEADERS)
        return endpoint

    first = served.names[0] if served.names else ""  # a viewer of reports alone serves no atlas
    d = Data(served)

    def index_compute(request: Request):
        """The first (or ``?atlas=``) atlas's overview and the reports; the reports alone when no atlas is served."""
        reports = d.reports(request)[1]["reports"]
        if not served.atlases:
            return None, (None, reports)
        name, overview = d.overview(request)
        return name, (overview, reports)

    def index_render(request: Request, name: str | None, x) -> str:
        overview, reports = x
        head = pages.overview(name, first, *overview) if overview else \
            '<h1>neuronmap</h1><p class="sub">this viewer serves removal reports only: serve an atlas beside them to browse its neurons</p>'

        return head + pages.report_index(reports)

    def search_compute(request: Request):
        q = request.query_params.get("q", "")
        if _NEURON.match(q):  # a neuron id typed into the search box opens that neuron
            name, _ = served.get(request.query_params.get("atlas"))
            target = f"/neuron/{q.strip()}" + (f"?atlas={name}" if name != first else "")
            return name, RedirectResponse(target, 303)
        if not q.strip():
            name, _ = served.get(request.query_params.get("atlas"))
            return name, None
        return d.search(request)

    def search_render(request: Request, name: str, r) -> str:
        p = request.query_params
        evidence = "evidence" in served.get(name)[1].meta
        form = pages.search_form(name, first, p.get("q", ""), p.get("matrices", ""), p.get("layers", ""), p.get("pole", ""),
                                 p.get("method", "auto"), p.get("sort", "prob"), evidence)
        return form + (pages.search_results(name, first, *r, evidence) if r else "<p>type a concept, e.g. coffee</p>")

    async def steer_endpoint(request: Request) -> Response:
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

    def job_compute(request: Request):
        return None, steer.status(request.path_params["job"])

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
        return error_response(served, request, msg, exc.status_code, exc.headers)

    def server_error(request: Request, exc: Exception) -> Response:
        """A bug: one line to the client, not the traceback (Starlette still hands it to the server's log)."""
        msg = f"internal error ({type(exc).__name__}): this is a bug in neuronmap; the server's log has the details"
        return error_response(served, request, msg, 500)

    routes = [
        Route("/", page(lambda r, n: n or "reports", index_compute, index_render)),
        Route("/search", page(lambda r, n: f"search {r.query_params.get('q', '')}", search_compute, search_render)),
        Route("/neuron/{neuron}", page(lambda r, n: r.path_params["neuron"], d.neuron, lambda r, n, x: pages.neuron(n, first, *x))),
        Route("/layer/{layer}", page(lambda r, n: f"layer {r.path_params['layer']}", d.layer, lambda r, n, x: pages.layer(n, first, *x))),
        Route("/compare", page(lambda r, n: "compare", d.compare, lambda r, n, x: pages.compare(*n[:2], first, x))),
        Route("/report/{name}", page(lambda r, n: f"report {r.path_params['name']}", d.report,
                                     lambda r, n, x: pages.report(*x, first))),
        Route("/api/atlases", api(d.atlases)),
        Route("/api/atlas", api(d.atlas)),
        Route("/api/stats", api(d.stats)),
        Route("/api/search", api(lambda r: (None, d.search(r)[1][0]))),
        Route("/api/neuron/{neuron}", api(lambda r: (None, d.neuron(r)[1][1]))),
        Route("/api/similar/{neuron}", api(d.similar)),
        Route("/api/evidence/{neuron}", api(d.evidence)),
        Route("/api/layer/{layer}", api(lambda r: (None, d.layer(r)[1][1]))),
        Route("/api/compare", api(lambda r: (None, d.compare(r)[1]))),
        Route("/api/reports", api(d.reports)),
        Route("/api/report/{name}", api(lambda r: (None, d.report(r)[1][0]))),
        Route("/api/steer", steer_endpoint, methods=["POST"]),
        Route("/api/jobs/{job}", api(job_compute)),
        Route("/favicon.ico", lambda request: Response(status_code=204, headers=HEADERS)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                    middleware=[Middleware(Guard, served=served)])
    app.state.served, app.state.steer = served, steer
    return app
