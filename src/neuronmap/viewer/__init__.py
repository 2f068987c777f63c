"""A local neuron viewer: ``neuronmap serve ATLAS... [--report EDITED_DIR ...]`` opens the atlases in a browser, offline.

Pages: ``/`` (the atlas against depth, and the removal reports), ``/search?q=coffee``,
``/neuron/L29N750`` (with the steering panel), ``/layer/29?matrix=up``, ``/compare?a=A&b=B``,
``/report/no-paris`` (what ``neuronmap remove`` did and measured); each has a JSON twin
under ``/api/`` with the payload the CLI's ``--json`` prints. Every asset ships in the
package (static/); nothing is fetched from a network.

Stage 10, viewer: the local web pages over atlases and removal reports.
May import: every stage below (core .. compare).
"""

from __future__ import annotations

from pathlib import Path

HOST = "127.0.0.1"
PORT = 8765
WEIGHT_CACHE_BYTES = 2 << 30  # weights kept in memory per served model, so searches stop re-reading them
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(atlases: list[Path | str], device: str = "auto", dtype: str = "auto", host: str = HOST,
               reports: list[Path | str] = ()):
    """The viewer as an ASGI app (Starlette), serving only ``atlases`` and ``reports``.

    Args:
        atlases: atlas directories (``neuronmap map`` output); each is served under its directory name. May be
            empty when ``reports`` is not.
        device, dtype: where steering runs the model (as ``clamp``'s ``--device``/``--dtype``).
        host: the address it will be served on: requests must name it (or localhost) in their Host header,
            which keeps web pages on other sites from reaching a local viewer by DNS rebinding.
        reports: directories written by ``neuronmap remove`` (or their edits.json); each is served at
            ``/report/NAME``, NAME its directory's name.

    Returns:
        A Starlette application.

    Raises:
        NeuronmapError: neither an atlas nor a report, or a path that is not a readable atlas or removal report.

    Example:
        >>> from starlette.testclient import TestClient  # doctest: +SKIP
        >>> TestClient(create_app(["demo-atlas"])).get("/api/search?q=coffee").json()["results"][0]["id"]  # doctest: +SKIP
        'L29N750'
        >>> TestClient(create_app([], reports=["no-paris"])).get("/api/report/no-paris").json()["steps"][0]["concept"]  # doctest: +SKIP
        'Paris'
    """
    from neuronmap.atlas.scoring import keep_weights
    from neuronmap.viewer.app import build
    from neuronmap.viewer.state import serve_atlases
    from neuronmap.viewer.steer import SteerRunner

    served = serve_atlases(list(atlases), list(reports))
    wildcard = host in ("0.0.0.0", "::", "")
    served.hosts = ["*"] if wildcard else [*LOCAL_HOSTS, host]
    keep_weights(WEIGHT_CACHE_BYTES)
    return build(served, SteerRunner(served, device, dtype))
