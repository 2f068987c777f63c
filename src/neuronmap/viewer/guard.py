"""What every request meets before a route: the Host check and the size limits, and the one way errors are answered.

Every error the viewer gives, whoever raises it (a route, Starlette's routing, this
guard), is ``{"error": "<one line>"}`` under ``/api/`` and an HTML page elsewhere,
never Starlette's plain-text bodies.
"""

from __future__ import annotations

import json
import re

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from neuronmap.atlas.search import MAX_CONCEPTS
from neuronmap.viewer.render import CSP, error_box, layout
from neuronmap.viewer.state import RequestError, Served

HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
# Far above any URL the pages make (an id, a name, a few options, 64 short concepts), far below what would cost
# anything to parse; 4,096 bytes also keeps every number in a query under int()'s 4,300-digit limit.
MAX_PATH = 2048
MAX_QUERY = 4096
MAX_BODY = 64 * 1024  # a steering request is a few fields and a message of at most 2,000 characters
MAX_DIGITS = 9  # more than any count, page or layer a viewer URL holds
_DIGITS = re.compile(r"[0-9]+")


class JSON(JSONResponse):
    def render(self, content) -> bytes:
        # allow_nan=False: a nan that reached here is a bug in a to_dict(), not something to send as invalid JSON.
        return json.dumps(content, ensure_ascii=False, allow_nan=False).encode("utf-8")


def shown(text: str, limit: int = 40) -> str:
    """``text`` as Python writes it, cut to ``limit`` characters, so a message never echoes 4,000 characters back."""
    return repr(text) if len(text) <= limit else f"{text[:limit] + '...'!r} ({len(text):,} characters)"


def whole_number(text: str, what: str, lo: int, hi: int) -> int:
    """``text`` read as a whole number in ``[lo, hi]``, ASCII digits only (``int()`` also reads '٣'; '²' it refuses).

    Raises:
        RequestError: not ASCII digits, too many of them, or out of range; the message names ``what`` and the range.
    """
    if not _DIGITS.fullmatch(text):
        raise RequestError(f"{what}={shown(text)} is not a whole number: expected one from {lo} to {hi} in digits 0-9")
    if len(text) > MAX_DIGITS or not lo <= int(text) <= hi:
        raise RequestError(f"{what}={shown(text)} is out of range: expected a whole number from {lo} to {hi}")
    return int(text)


def error_response(served: Served, request: Request, message: str, status: int, headers: dict | None = None) -> Response:
    """The error as the API's JSON under ``/api/``, else as a page (its search box left empty: the query may be the fault)."""
    h = {**HEADERS, **(headers or {})}
    if request.url.path.startswith("/api/"):
        return JSON({"error": message}, status, headers=h)
    return HTMLResponse(layout("error", error_box(message), served.names, None, "", list(served.reports)), status, headers=h)


def _host(header: str) -> str:
    """The host of a Host header, without the port (``[::1]:8765`` -> ``[::1]``)."""
    return header[: header.index("]") + 1] if header.startswith("[") and "]" in header else header.split(":")[0]


def refusal(served: Served, scope) -> tuple[str, int] | None:
    """Why a request is refused before any route runs (message, status), or None to let it through."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    host = _host(headers.get("host", ""))
    if "*" not in served.hosts and host not in served.hosts:
        why = (f"Host {shown(host)} is not this viewer's address: this viewer answers to {', '.join(served.hosts)} "
               "(a Host header naming another site is refused, so web pages elsewhere cannot reach the viewer)")
        return why, 400
    path, query = scope["path"], scope.get("query_string", b"")
    if len(path) > MAX_PATH:
        return f"the URL path has {len(path):,} characters: at most {MAX_PATH:,}; check the link", 414
    if len(query) > MAX_QUERY:
        why = (f"the query string has {len(query):,} bytes: at most {MAX_QUERY:,}; search fewer or shorter concepts "
               f"per request (at most {MAX_CONCEPTS}) and split the rest into more searches")
        return why, 414
    length = headers.get("content-length")
    if length is not None and (not _DIGITS.fullmatch(length) or len(length) > 12):
        return f"Content-Length {shown(length)} is not a byte count", 400
    if length is not None and int(length) > MAX_BODY:
        return f"the request body has {int(length):,} bytes: at most {MAX_BODY:,}; send a shorter message", 413
    return None


class Guard:
    """ASGI middleware: refuse what ``refusal`` names, answered as ``error_response`` does."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refused = refusal(self.served, scope)
            if refused is not None:
                await error_response(self.served, Request(scope), *refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request) -> bytes:
    """The request body, refused past ``MAX_BODY`` bytes as it arrives (a chunked body names no length up front).

    Raises:
        RequestError: 413 past the limit.
    """
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestError(f"the request body has more than {MAX_BODY:,} bytes: send a shorter message", 413)
    return bytes(body)
