"""The viewer under hostile HTTP: every route with random and hostile path parts, query values, bodies, methods and Host
headers (seeded, a bounded count). No request may answer 500 or show a traceback, in the response or in the server's
log, and every error is the API's JSON under /api/ and an HTML page elsewhere."""

from __future__ import annotations

import json
import logging
import random
import string

import pytest
from starlette.testclient import TestClient

from neuronmap.viewer import create_app
from tests.conftest import NASTY

SEED = 25
REQUESTS = 1500

# One template per route; {} is a path part the fuzzer fills.
ROUTES = ["/", "/search", "/neuron/{}", "/layer/{}", "/compare", "/report/{}", "/api/atlases", "/api/atlas", "/api/stats",
          "/api/search", "/api/neuron/{}", "/api/similar/{}", "/api/evidence/{}", "/api/layer/{}", "/api/compare",
          "/api/reports", "/api/report/{}", "/api/steer", "/api/jobs/{}", "/favicon.ico", "/static/{}", "/{}", "/api/{}"]
KEYS = ["q", "atlas", "a", "b", "matrices", "matrix", "layers", "pole", "method", "top", "sort", "exact_token", "page",
        "desc", "class", "level", "n", "x"]
HOSTILE = [
    "", " ", "0", "-1", "1", "29", "L1N5", "L0N0", " L1N5 ", "L1N5\n", "L1X5", "l1n5", "L-1N5", "L1N-5", "L+1N5",
    "L0N" + "9" * 5000, "L" + "9" * 5000 + "N0", "L0N" + "9" * 1000, "9" * 5000, "9" * 1000, "1" * 10,
    "²", "L²N5", "L1N٥", "L٢٩N٧٥٠", "٣", "１", "1_000", "0x10", "1e3", "1.5", "nan", "inf", "-0", "+5", "00000001",
    "..", "../..", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "%00", "\x00", "a\x00b", "\ufeff", "\u202e", "🐶", "𝟘",
    "%", "%%", "%ZZ", "?", "#", "&", "=", ";", "*", "\\", "'", '"', "<", ">", "{}", "[]", "null", "true",
    "coffee", "coffee,tea", ",", ",,,", " , ", "dog," * 70, "x" * 300, "up", "gate", "down", "mlp", "+", "-", "both",
    "all", "auto", "exact", "stored", "prob", "agreement", "confidence", "entropy", "norm", "word", "0-3", "3-0", "0-",
    "atlas", "no-dog", "base", ":dog:", "[bold]x[/bold]",
] + [t for t in NASTY if isinstance(t, str)]
BODY_FIELDS = ["neuron", "value", "concept", "text", "chat", "positions", "n", "atlas"]
JSON_VALUES = [None, True, False, 0, 1, -1, 20, 10**30, 1.5, float("inf"), "²", "20x", "1e39", "-5", "L1N5", "dog",
               "coffee", "", " ", [], {}, [1, 2], {"a": 1}, "x" * 3000, "9" * 4000, 2**63]


def _text(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(HOSTILE)
    alphabet = string.printable + "²٣éß🐶\u202e\x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))


def _part(rng: random.Random) -> str:
    from urllib.parse import quote

    text = _text(rng)
    if rng.random() < 0.8:
        return quote(text, safe="")
    return "".join(c for c in text if c.isprintable() and c not in "/?# ")  # as typed; the client would refuse the rest


def _body(rng: random.Random) -> tuple[bytes, str]:
    """A steering body and its content type: mostly JSON objects with hostile fields, some not JSON or not objects."""
    kind = rng.random()
    if kind < 0.6:
        obj = {k: rng.choice(JSON_VALUES + HOSTILE[:30]) for k in rng.sample(BODY_FIELDS, rng.randint(0, len(BODY_FIELDS)))}
        if rng.random() < 0.3:  # near-valid, so the later checks run too
            obj = {"neuron": "L1N5", "value": "20x", "concept": "coffee", **{k: v for k, v in obj.items() if k != "neuron"}}
        return json.dumps(obj).encode(), "application/json"
    if kind < 0.7:
        depth = rng.choice([10, 900, 5000, 30_000, 40_000])  # 40,000: past the 64 KiB limit
        return ("[" * depth + "]" * depth).encode(), "application/json"
    if kind < 0.8:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))), "application/json"
    if kind < 0.9:
        return rng.choice([b"[]", b"1", b'"x"', b"null", b"{", b'{"n": NaN}', b"\xff\xfe", b"{}" * 10]), "application/json"
    return b'{"neuron": "L1N5"}', rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "application/json; x"])


def _request(rng: random.Random) -> dict:
    route = rng.choice(ROUTES)
    path = route.replace("{}", _part(rng)) if "{}" in route else route
    params = [(rng.choice(KEYS), _text(rng)) for _ in range(rng.randint(0, 4))]
    method = "POST" if route == "/api/steer" and rng.random() < 0.85 else rng.choice(["GET"] * 8 + ["POST", "PUT", "DELETE"])
    headers = {}
    if rng.random() < 0.05:
        headers["host"] = rng.choice(["attacker.example", "127.0.0.1.evil", "[::1]", "localhost:1", "", "127.0.0.1:99999"])
    body, ctype = _body(rng) if method in ("POST", "PUT") else (b"", "")
    if ctype:
        headers["content-type"] = ctype
    return {"method": method, "url": path, "params": params, "headers": headers, "content": body}


@pytest.fixture(scope="module")
def app_client(worded, tiny_removal):
    # raise_server_exceptions: a bug raises here with its traceback instead of hiding behind a 500.
    return TestClient(create_app([worded, tiny_removal[2]], reports=[tiny_removal[0]]), base_url="http://127.0.0.1")


def test_no_request_answers_500_or_shows_a_traceback(app_client, caplog, capfd):
    rng = random.Random(SEED)
    caplog.set_level(logging.WARNING)
    seen: dict[int, int] = {}
    for i in range(REQUESTS):
        req = _request(rng)
        r = app_client.request(req["method"], req["url"], params=req["params"], headers=req["headers"], content=req["content"])
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        where = (i, req["method"], req["url"][:200], [(k, v[:80]) for k, v in req["params"]], req["content"][:200])
        assert r.status_code < 500, (where, r.status_code, r.text[:500])
        assert "Traceback" not in r.text and 'File "' not in r.text, where
        if r.status_code < 400:
            continue
        if r.request.url.path.startswith("/api/"):
            assert r.headers["content-type"] == "application/json", (where, r.headers["content-type"], r.text[:200])
            error = r.json()["error"]
            assert isinstance(error, str) and error and "\n" not in error, where
        else:
            assert r.headers["content-type"].startswith("text/html"), (where, r.headers["content-type"], r.text[:200])
            assert "error: " in r.text and "</html>" in r.text, where
    log = caplog.text + "".join(capfd.readouterr())
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-2000:]
    # The mix reached past the guards: successes, refusals and every kind of error the viewer gives.
    assert seen.get(200, 0) > 50 and seen.get(400, 0) > 100 and seen.get(404, 0) > 50, seen
    assert {405, 413, 414, 415} <= set(seen) and 202 in seen, seen
