"""The viewer over HTTP (Starlette's TestClient, real atlases and a real removal): every route, its JSON twin, errors,
escaping, the job queue."""

from __future__ import annotations

import json
import re
import shutil
import threading
import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from neuronmap.cli import main
from neuronmap.cli.flags import as_flags
from neuronmap.core.errors import NeuronmapError
from neuronmap.testing.synthetic import synthetic_atlas
from neuronmap.viewer import create_app
from neuronmap.viewer.jobs import JobQueue
from tests.conftest import NASTY

PAGES = ["/", "/search?q=coffee", "/neuron/L1N5", "/layer/1?matrix=gate&sort=entropy", "/layer/0?class=word&pole=-"]


def client(*atlases, host: str = "127.0.0.1", reports=()) -> TestClient:
    return TestClient(create_app(list(atlases), host=host, reports=list(reports)), base_url=f"http://{host}")


def cli_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err.removeprefix("error: ")


def no_seconds(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "seconds"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer-pair")
    a = synthetic_atlas(root / "base", 4, 64, 400, k=5, seed=1)
    b = synthetic_atlas(root / "tuned", 4, 64, 400, k=5, seed=1, change_rate=0.2)
    return a, b


def test_every_page_and_its_api_twin_answer(worded):
    c = client(worded)
    for path in PAGES:
        r = c.get(path)
        assert r.status_code == 200, (path, r.text[:300])
        assert r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        api = c.get("/api" + path if path != "/" else "/api/atlas")
        assert api.status_code == 200 and api.headers["content-type"] == "application/json", path
    assert c.get("/static/app.js").status_code == 200 and c.get("/static/style.css").status_code == 200
    assert c.get("/api/atlases").json()["atlases"][0]["name"] == "atlas"
    r = c.get("/api/jobs/999")
    assert r.status_code == 404 and r.json()["error"].startswith("no job '999': jobs are numbered from 1")
    r = c.get("/api/nothing")
    assert r.status_code == 404 and "no page at /api/nothing" in r.json()["error"]
    assert c.get("/favicon.ico").status_code == 204


def test_api_payloads_are_the_clis_json(worded, capsys):
    c = client(worded)
    a = str(worded)
    assert no_seconds(c.get("/api/search?q=coffee,Paris&method=exact").json()) == no_seconds(
        cli_json(capsys, "search", a, "coffee", "Paris"))
    assert no_seconds(c.get("/api/search?q=coffee&method=stored&top=3&pole=-").json()) == no_seconds(
        cli_json(capsys, "search", a, "coffee", "--stored", "--top", "3", "--pole", "-"))
    assert c.get("/api/neuron/L1N5").json() == cli_json(capsys, "show", a, "L1N5")
    assert c.get("/api/layer/1?matrix=down&sort=norm&page=1").json() == {
        **cli_json(capsys, "layer", a, "1", "--matrix", "down", "--sort", "norm", "--offset", "50"), "limit": 50}
    assert no_seconds(c.get("/api/similar/L0N2?top=3").json()) == no_seconds(cli_json(capsys, "similar", a, "L0N2", "--top", "3"))
    assert c.get("/api/stats").json() == cli_json(capsys, "stats", a)


def test_search_is_exact_with_weights_and_says_why_when_it_falls_back(worded, tmp_path):
    r = client(worded).get("/search?q=coffee")
    assert 'data-method="exact"' in r.text and "sha256 checked" in r.text
    moved = tmp_path / "moved"
    shutil.copytree(worded, moved)
    meta = json.loads((moved / "meta.json").read_text())
    meta["source"]["path"] = str(tmp_path / "gone")
    (moved / "meta.json").write_text(json.dumps(meta))
    c = client(moved)
    r = c.get("/search?q=coffee")
    assert 'data-method="stored"' in r.text and "searched the stored top-k: the weights moved or were deleted" in r.text
    assert "steering needs the weights" in c.get("/neuron/L1N5").text
    assert c.get("/api/neuron/L1N5").json()["rank_method"] == "stored"
    assert c.get("/api/search?q=coffee&method=exact").status_code == 400


def test_a_neuron_id_in_the_search_box_opens_the_neuron(worded, pair):
    r = client(worded).get("/search?q=%20L1N7%20", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/neuron/L1N7"
    r = client(*pair).get("/search?q=L2N3&atlas=tuned", follow_redirects=False)
    assert r.headers["location"] == "/neuron/L2N3?atlas=tuned"


@pytest.mark.parametrize("path, argv", [
    ("/neuron/L9N1", ["show", "{a}", "L9N1"]),
    ("/neuron/L1N999", ["show", "{a}", "L1N999"]),
    ("/neuron/L1X5", ["show", "{a}", "L1X5"]),
    ("/layer/5", ["layer", "{a}", "5"]),
    ("/layer/1?matrix=mlp", ["layer", "{a}", "1", "--matrix", "mlp"]),
    ("/search?q=coffee&layers=3-1", ["search", "{a}", "coffee", "--layers", "3-1"]),
    ("/search?q=coffee&matrices=mlp", ["search", "{a}", "coffee", "--matrices", "mlp"]),
    ("/api/similar/L1N5?matrices=gate,mlp", ["similar", "{a}", "L1N5", "--matrices", "gate,mlp"]),
])
def test_bad_input_gets_the_clis_message_as_a_4xx(worded, capsys, path, argv):
    message = cli_error(capsys, *[x.format(a=worded) for x in argv])
    c = client(worded)
    page = c.get(path if not path.startswith("/api") else path[4:])
    api = c.get(path if path.startswith("/api") else "/api" + path)
    assert api.status_code == 400 and as_flags(api.json()["error"]) == message  # the CLI's, with parameter names
    if not path.startswith("/api/similar"):
        assert page.status_code == 400 and f"error: {api.json()['error']}".replace("'", "&#x27;") in page.text


def test_only_the_named_atlases_are_readable(worded, pair):
    c = client(*pair)
    for path in ["/neuron/..%2F..%2Fetc%2Fpasswd", "/neuron/../../etc/passwd", "/layer/..%2F..%2F..%2Fetc",
                 "/static/..%2F..%2F..%2Fpyproject.toml", "/static/../viewer/app.py", "/api/neuron/%2Fetc%2Fpasswd",
                 "/%2Fetc%2Fpasswd"]:
        r = c.get(path)
        assert r.status_code in (400, 404), path
        assert "root:" not in r.text and "[project]" not in r.text and "starlette" not in r.text, path
    for path in ["/?atlas=/etc", f"/api/stats?atlas={worded}", "/compare?a=/etc&b=base", "/api/compare?a=base&b=..%2Fbase"]:
        r = c.get(path)
        assert r.status_code == 404, path
        assert "this viewer serves base, tuned; pick one of those" in r.text, path


def test_a_damaged_atlas_answers_one_line_not_a_traceback(worded, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(worded, bad)
    data = bytearray((bad / "neurons.parquet").read_bytes())
    mid = len(data) // 3
    data[mid: mid + 2000] = bytes(2000)  # a data page zeroed; the footer still checks out
    (bad / "neurons.parquet").write_bytes(bytes(data))
    meta = json.loads((bad / "meta.json").read_text())
    del meta["sha256"]  # as written before neuronmap recorded sha256: opens unchecked, fails when read
    (bad / "meta.json").write_text(json.dumps(meta))
    c = client(bad)
    r = c.get("/api/layer/0?matrix=gate")
    assert r.status_code == 500 and r.json()["error"].startswith(f"{bad}/neurons.parquet cannot be read (")
    assert f"the file is damaged; rebuild it with `neuronmap map {meta['source']['spec']} -o {bad} --overwrite`" in r.json()["error"]
    page = c.get("/layer/0?matrix=gate")
    assert page.status_code == 500 and f"error: {bad}/neurons.parquet cannot be read" in page.text


def test_host_header_and_cross_site_posts_are_refused(worded):
    c = client(worded)
    assert c.get("/", headers={"host": "attacker.example"}).status_code == 400
    r = c.post("/api/steer", data={"neuron": "L1N5"})  # a form post, as another site's page could send
    assert r.status_code == 415 and "takes a JSON body" in r.json()["error"]
    assert client(worded, host="0.0.0.0").get("/", headers={"host": "10.1.2.3:8765"}).status_code == 200


@pytest.mark.parametrize("body, message", [
    ({"neuron": "L1X5", "value": "20x", "concept": "coffee"}, "neuron id 'L1X5'"),
    ({"neuron": "L1N5", "value": "twenty", "concept": "coffee"}, "malformed value 'twenty'"),
    ({"neuron": "L1N5", "value": "1e39", "concept": "coffee"}, "which the model's float32 activations cannot hold"),
    ({"neuron": "L1N5", "value": "20x", "concept": "  "}, "empty word="),
    ({"neuron": "L1N5", "value": "20x", "concept": "coffee", "positions": "middle"}, "positions"),
    ({"neuron": "L1N5", "value": "20x", "concept": "coffee", "n": 0}, "n 0 is out of range"),
    ({"neuron": "L1N5", "value": "20x", "concept": "coffee", "chat": "yes"}, "'chat' is 'yes': expected true or false"),
    ({"neuron": "L1N5", "value": "20x", "concept": "coffee", "atlas": "../x"}, "unknown atlas '../x'"),
])
def test_steer_requests_are_checked_before_queueing(worded, body, message):
    r = client(worded).post("/api/steer", json=body)
    assert 400 <= r.status_code < 500 and message in r.json()["error"]


def test_tokens_are_escaped_and_no_token_can_run_script(nasty):
    c = client(nasty)
    texts = [c.get(p).text for p in ["/", "/neuron/L1N5", "/neuron/L0N3", "/layer/1", "/layer/0?matrix=down",
                                      "/search?q=%3Cscript%3E", "/search?q=" + "%22"]]
    for text in texts:
        tags = re.findall(r"<script\b[^>]*>", text)
        assert all(t in ('<script src="/static/app.js">', '<script type="application/json" id="depth-data">') for t in tags), tags
        assert "<img" not in text and "</div>{{" not in text and "window.__xss=1</script>" not in text
    shown = "".join(texts)
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in shown  # visible, as text
    assert "&#x27;\\x07&#x27;" in shown and "&#x27;\\n\\n&#x27;" in shown  # control characters legible
    data = re.search(r'<script type="application/json" id="depth-data">(.*?)</script>', texts[0], re.S).group(1)
    assert "<" not in data and json.loads(data)  # the chart data cannot close its own element


def test_compare_page_and_api(pair, capsys):
    c = client(*pair)
    page = c.get("/compare")
    assert page.status_code == 200 and "Agreement against depth" in page.text and "/neuron/" in page.text
    got = c.get("/api/compare?a=base&b=tuned").json()
    want = cli_json(capsys, "compare", str(pair[0]), str(pair[1]))
    assert no_seconds(got) == no_seconds(want) and got["neuron"]["n_changed"] > 0
    assert client(pair[0]).get("/compare").status_code == 404


def test_compare_at_concept_level_when_shapes_differ(pair, tmp_path, capsys):
    wide = synthetic_atlas(tmp_path / "wide", 3, 80, 400, k=5, seed=2)
    c = client(pair[0], wide)
    page = c.get("/compare")
    assert page.status_code == 200 and "concept level" in page.text and "Only in wide (gained)" in page.text
    want = cli_json(capsys, "compare", str(pair[0]), str(wide))
    assert no_seconds(c.get("/api/compare").json()) == no_seconds(want) and want["level"] == "concept"


def test_the_job_queue_runs_one_at_a_time_in_order_and_drops_nothing():
    q = JobQueue()
    gate, order = threading.Event(), []

    def step(name, wait=False):
        def fn(results):
            if wait:
                assert gate.wait(10)
            order.append(name)
            return {"name": name, "saw": sorted(results)}
        return fn

    first = q.submit({}, [("a", "first a", step("1a", wait=True)), ("b", "first b", step("1b"))])
    second = q.submit({}, [("a", "second", step("2a"))])
    failing = q.submit({}, [("a", "fails", lambda r: (_ for _ in ()).throw(NeuronmapError("bad thing: fix it")))])
    third = q.submit({}, [("a", "third", step("3a"))])
    for _ in range(200):  # the worker picks the first job up
        if q.status(first.id)["state"] == "running":
            break
        threading.Event().wait(0.05)
    assert q.status(first.id)["state"] == "running" and q.status(first.id)["steps"] == ["first a", "first b"]
    s = q.status(second.id)
    assert s["state"] == "queued" and s["position"] == 1 and q.status(third.id)["position"] == 3
    gate.set()
    for job in (first, second, failing, third):
        for _ in range(200):
            if q.status(job.id)["state"] in ("done", "error"):
                break
            threading.Event().wait(0.05)
    assert order == ["1a", "1b", "2a", "3a"]
    assert q.status(first.id)["results"]["b"] == {"name": "1b", "saw": ["a"]}  # step 2 saw step 1's result
    assert q.status(failing.id)["state"] == "error" and q.status(failing.id)["error"] == "bad thing: fix it"
    assert q.status(third.id)["state"] == "done"
    with pytest.raises(NeuronmapError, match="no job '99'"):
        q.status("99")


def test_serve_cli_errors_are_one_line(capsys, tmp_path, worded):
    assert cli_error(capsys, "serve", str(tmp_path)) == (f"{tmp_path} is not a neuronmap atlas: it lacks meta.json or "
                                                         "neurons.parquet; make one with `neuronmap map SOURCE -o ATLAS_DIR`")
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        msg = cli_error(capsys, "serve", str(worded), "--port", str(s.getsockname()[1]))
        assert f"cannot listen on 127.0.0.1:{s.getsockname()[1]}" in msg and "pick another --port" in msg
    finally:
        s.close()


# Tokens GPT-2's pre-tokenizer keeps whole, so running text becomes exactly these ids: joined in a window they would
# form live markup if any were placed unescaped.
HOSTILE = [" <", "<", "script", ">", "</", "img", " src", "=", "x", " onerror", "(", ")", "1", '"', "'", "&", "{{", " dog",
           "window", " alert"]
HOSTILE_TEXT = ' <script>window</script> <img src=x onerror=alert(1)> " & \' {{ dog <img src=x onerror=alert(1)>\n'


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A tiny atlas whose tokenizer reads markup as tokens, with evidence recorded over markup-laden text."""
    from neuronmap.atlas.handle import Atlas
    from neuronmap.evidence.record import RecordOptions, record
    from tests.conftest import atlas_with_tokens

    root = tmp_path_factory.mktemp("hostile")
    atlas = atlas_with_tokens(root, HOSTILE, seed=5)
    (root / "corpus.txt").write_text(HOSTILE_TEXT * 6)
    record(Atlas.open(atlas), root / "corpus.txt", RecordOptions(context=24, examples=4))
    return atlas


def test_evidence_panel_and_api_appear_when_the_atlas_has_evidence(hostile, worded, capsys):
    c = client(hostile)
    page = c.get("/neuron/L1N5")
    assert page.status_code == 200
    section = page.text.split('<section id="evidence">')[1].split("</section>")[0]
    assert "Max-activating" in section and "Min-activating" in section and '<svg class="hist"' in section
    assert section.count('<mark class="fire">') == 8 and "Agreement with the decoded top-k" in section
    api = c.get("/api/evidence/L1N5")
    assert api.status_code == 200 and api.json() == cli_json(capsys, "examples", str(hostile), "L1N5")
    # Without evidence: the panel says how to add it, the API answers 404 with the same advice.
    c = client(worded)
    assert "this atlas holds no activation evidence: add it with" in c.get("/neuron/L1N5").text
    r = c.get("/api/evidence/L1N5")
    assert r.status_code == 404 and "holds no activation evidence: add it with `neuronmap record" in r.json()["error"]
    assert c.get("/api/evidence/L9N0").status_code == 400  # a bad id is a bad request either way


def test_evidence_windows_stay_escaped(hostile):
    c = client(hostile)
    d = c.get("/api/evidence/L0N0").json()
    window = "".join(d["examples"]["+"][0]["before"])
    assert "<" in window or ">" in window  # the windows do hold markup characters
    for n in range(0, 24, 3):
        text = c.get(f"/neuron/L0N{n}").text
        tags = re.findall(r"<script\b[^>]*>", text)
        assert all(t in ('<script src="/static/app.js">',) for t in tags), tags
        assert "<img" not in text
        section = text.split('<section id="evidence">')[1].split("</section>")[0]
        assert "<img" not in section and "<script" not in section
        assert "&lt;" in section  # shown, as text


def test_search_sort_by_agreement_in_the_page_and_its_api(hostile, worded, capsys):
    c = client(hostile)
    page = c.get("/search?q=dog&method=stored&sort=agreement")
    assert page.status_code == 200 and '<select name="sort">' in page.text and "agreement (base)" in page.text
    api = c.get("/api/search?q=dog&method=stored&sort=agreement").json()
    want = cli_json(capsys, "search", str(hostile), "dog", "--stored", "--sort", "agreement")
    assert [h["id"] + h["matrix"] + h["pole"] for h in api["results"]] == \
        [h["id"] + h["matrix"] + h["pole"] for h in want["results"]]
    scores = [-1 if h["agreement"] is None else h["agreement"] for h in api["results"]]
    assert scores == sorted(scores, reverse=True)
    # Without evidence the choice is not offered, and asking for it anyway is a 400 that says how to add it.
    c = client(worded)
    assert '<select name="sort">' not in c.get("/search?q=dog&method=stored").text
    r = c.get("/api/search?q=dog&method=stored&sort=agreement")
    assert r.status_code == 400 and "holds no activation evidence to sort by" in r.json()["error"]


def test_evidence_recorded_while_serving_appears_without_a_restart(worded, tmp_path):
    from neuronmap.atlas.handle import Atlas
    from neuronmap.evidence.record import RecordOptions, record

    atlas = tmp_path / "atlas"
    shutil.copytree(worded, atlas)
    c = client(atlas)
    assert "this atlas holds no activation evidence" in c.get("/neuron/L1N5").text
    assert c.get("/api/stats").json()["agreement"] is None  # computed and cached before the evidence exists
    (tmp_path / "c.txt").write_text(" dog coffee about Paris. tea which river castle 42" * 20)
    record(Atlas.open(atlas), tmp_path / "c.txt", RecordOptions(context=8, examples=3))
    assert '<section id="evidence">' in c.get("/neuron/L1N5").text
    assert c.get("/api/evidence/L1N5").status_code == 200
    assert c.get("/api/stats").json()["agreement"] is not None  # the cached stats were dropped with the old meta


# ------------------------------------------------------------------ removal reports (neuronmap remove's edits.json)


def test_report_page_shows_the_removal_and_links_the_neurons(tiny_removal, worded):
    edited, printed, model_atlas, edited_atlas = tiny_removal
    # worded (another model) first: a link must go to the atlas of the model edited, found by sha256, not to the first.
    c = client(worded, model_atlas, edited_atlas, reports=[edited])
    index = c.get("/")
    assert index.status_code == 200 and 'href="/report/no-dog"' in index.text and "Removal reports" in index.text
    page = c.get("/report/no-dog")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    text = page.text
    step = printed["steps"][0]
    assert "<h1>Removal report no-dog <small>dog</small></h1>" in text
    how = step["method"]
    # --select auto leaves edit and strength to each concept's selection: the options say so instead of "None".
    assert "edit per selection (see each step), strength per selection (see each step)" in text
    assert f'removed with <code>--select {how["select"]} --edit {how["edit"]} --strength {how["strength"]:g}</code>' in text
    t = step["targeting"]
    assert f"P(dog) {t['approx_prob']:.4g} before refinement → {t['prob']:.4g} after" in text
    edits = text.split('<table class="edits">')[1].split("</table>")[0]
    assert len(step["edits"]) == 3 and edits.count("<tr>") == 4  # the heading and one row per edit
    for e in step["edits"]:
        assert f'<a href="/neuron/{e["id"]}?atlas=model-atlas">{e["id"]}</a>' in edits
        assert f'<a href="/neuron/{e["id"]}?atlas=edited-atlas" class="sub">edited</a>' in edits
        assert f"{e['cosine']:.3f}" in edits and f"{e['old_norm']:.3f}" in edits
    measures = text.split('<table class="measures">')[1].split("</table>")[0]
    assert [m["role"] for m in step["measures"]] == ["removed", "control"]
    for m in step["measures"]:
        assert f"<strong>{m['ratio']:.3g}x</strong>" in measures  # the mean ratio, as `remove` prints it
        for q in m["prompts"]:
            assert f"{q['after'] / q['before']:.3g}x" in measures
    assert f"median {step['kl_median']:.4g}, 95th percentile {step['kl_p95']:.4g} nats/token" in text
    # The link goes to that neuron's page in the atlas of the model edited.
    e = step["edits"][0]
    neuron = c.get(f"/neuron/{e['id']}?atlas=model-atlas")
    assert neuron.status_code == 200 and f"<h1>{e['id']} <small>model-atlas</small></h1>" in neuron.text


def test_report_api_is_what_remove_printed(tiny_removal, capsys):
    edited, printed, model_atlas, _ = tiny_removal
    c = client(model_atlas, reports=[edited / "edits.json"])  # the edits.json path itself is a report too
    assert c.get("/api/report/no-dog").json() == printed
    record = json.loads((edited / "edits.json").read_text())
    assert {k: v for k, v in record.items() if k not in ("format", "version", "originals")} == printed
    listed = c.get("/api/reports").json()["reports"]
    assert listed == [{"name": "no-dog", "path": str(edited / "edits.json"), "source": printed["source"],
                       "out": printed["out"], "concepts": ["dog"], "control": "cat", "edits": 3}]


def test_report_finds_the_atlas_of_the_source_by_its_own_files(tiny_removal):
    """A GGUF source (the demo model) is edited through a safetensors export, so the rewritten files' ``before``
    sha256 are the export's, which no atlas of the GGUF records: the report's ``source_files`` tie it to that atlas."""
    from neuronmap.atlas.handle import Atlas
    from neuronmap.viewer.data import report_atlases

    _, printed, model_atlas, edited_atlas = tiny_removal
    atlases = {"model-atlas": Atlas.open(model_atlas), "edited-atlas": Atlas.open(edited_atlas)}
    meta_files = atlases["model-atlas"].meta["source"]["files"]
    assert printed["source_files"] == [{"name": f["name"], "sha256": f["sha256"]} for f in meta_files]
    as_if_gguf = {**printed, "files": {k: {**v, "before": "0" * 64} for k, v in printed["files"].items()}}
    assert [(n, side) for n, side, _ in report_atlases(as_if_gguf, atlases)] == [("model-atlas", "source"),
                                                                                  ("edited-atlas", "edited")]
    assert [(n, side) for n, side, _ in report_atlases({**as_if_gguf, "source_files": []}, atlases)] == [
        ("edited-atlas", "edited")]


def test_report_neurons_are_plain_text_without_an_atlas_of_the_model(tiny_removal, worded):
    edited, printed, _, _ = tiny_removal
    for c in (client(worded, reports=[edited]), client(reports=[edited, edited])):
        text = c.get("/report/no-dog").text
        edits = text.split('<table class="edits">')[1].split("</table>")[0]
        assert "/neuron/" not in edits and all(f"<td>{e['id']}</td>" in edits for e in printed["steps"][0]["edits"])
        assert "none of the served atlases is of this model" in text
    # Reports alone: / lists them (a repeated name gets -2), the atlas pages say there is none.
    c = client(reports=[edited, edited])
    index = c.get("/")
    assert index.status_code == 200 and 'href="/report/no-dog"' in index.text and 'href="/report/no-dog-2"' in index.text
    r = c.get("/api/search?q=dog")
    assert r.status_code == 404 and r.json()["error"].startswith("this viewer serves no atlas, only removal reports")


def test_unknown_report_is_a_404_with_one_line(tiny_removal, worded):
    c = client(worded, reports=[tiny_removal[0]])
    msg = "unknown report 'no-cat': this viewer serves no-dog; open one at /report/NAME"
    assert c.get("/api/report/no-cat").status_code == 404 and c.get("/api/report/no-cat").json() == {"error": msg}
    page = c.get("/report/no-cat")
    assert page.status_code == 404 and f"error: {msg}".replace("'", "&#x27;") in page.text
    for path in ["/report/..%2F..%2Fetc%2Fpasswd", f"/api/report/{str(tiny_removal[0]).replace('/', '%2F')}",
                 "/report/../../etc/passwd", "/api/report/%2Fetc%2Fpasswd"]:
        r = c.get(path)
        assert r.status_code == 404 and "root:" not in r.text and '"steps"' not in r.text, path
    assert client(worded).get("/api/report/no-dog").json() == {
        "error": "unknown report 'no-dog': this viewer serves no report; serve one with `neuronmap serve --report EDITED_DIR`"}


FIX = "--report takes a directory written by `neuronmap remove` (or its edits.json), e.g. --report no-paris"


@pytest.mark.parametrize("make, message", [
    (lambda d, e, a: d / "missing", "--report {p} does not exist: " + FIX),
    (lambda d, e, a: d, "--report {p} holds no edits.json: " + FIX),
    (lambda d, e, a: a, "--report {p} holds no edits.json (it looks like an atlas: pass it without --report): " + FIX),
    (lambda d, e, a: _write(d / "edits.json", "{not json"),
     "--report {p} is not readable JSON (JSONDecodeError: Expecting property name enclosed in double quotes: line 1 "
     "column 2 (char 1)): " + FIX),
    (lambda d, e, a: _write(d / "x.json", json.dumps({**e, "control": float("nan")})),
     "--report {p} is not readable JSON (ValueError: NaN is not a JSON number): " + FIX),
    (lambda d, e, a: _write(d / "x.json", json.dumps({**e, "format": "neuronmap-atlas"})),
     "--report {p} is not a neuronmap edit record (format 'neuronmap-atlas', expected 'neuronmap-edits'): " + FIX),
    (lambda d, e, a: _write(d / "x.json", json.dumps({**e, "version": 7})),
     "--report {p} has edit record version 7; this neuronmap reads version 1: view it with the neuronmap release that wrote it"),
    (lambda d, e, a: _write(d / "x.json", json.dumps({**e, "steps": [{k: v for k, v in e["steps"][0].items() if k != "kl_p95"}]})),
     "--report {p} is damaged: steps[0].kl_p95 is missing; re-run `neuronmap remove` to write it anew"),
    (lambda d, e, a: _write(d / "x.json", json.dumps({**e, "steps": [{**e["steps"][0], "edits": [{**e["steps"][0]["edits"][0], "layer": "1"}]}]})),
     "--report {p} is damaged: steps[0].edits[0].layer is '1', expected a whole number; re-run `neuronmap remove` to write it anew"),
])
def test_bad_report_is_refused_at_start_with_one_line(tiny_removal, tmp_path, capsys, make, message):
    edited, _, model_atlas, _ = tiny_removal
    p = make(tmp_path, json.loads((edited / "edits.json").read_text()), model_atlas)
    assert cli_error(capsys, "serve", str(model_atlas), "--report", str(p)) == message.format(p=p)
    with pytest.raises(NeuronmapError) as e:
        create_app([model_atlas], reports=[p])
    assert as_flags(str(e.value)) == message.format(p=p) and str(e.value).startswith(f"reports={p}")


def _write(path, text: str):
    path.write_text(text)
    return path


def test_serve_needs_an_atlas_or_a_report(capsys):
    assert cli_error(capsys, "serve") == ("no atlas given: pass one or more atlas directories, e.g. `neuronmap serve "
                                          "demo-atlas`, or a removal report with --report EDITED_DIR")


def test_report_strings_are_escaped(tiny_removal, tmp_path):
    """Concept words, prompts and tokens in an edits.json can be hostile: each is shown as text, none runs."""
    edited, _, model_atlas, _ = tiny_removal
    record = json.loads((edited / "edits.json").read_text())
    step = record["steps"][0]
    nasty = [t for t in NASTY if isinstance(t, str)]
    step["concept"] = record["control"] = nasty[0]
    step["targeting"]["top"] = nasty[:3]
    for e in step["edits"]:
        e["old_top"], e["new_top"], e["matrix"], e["id"] = nasty[:4], nasty[4:8], nasty[6], "../../api/atlas"
    for m in step["measures"]:
        m["concept"] = nasty[1]
        for q in m["prompts"]:
            q["prompt"], q["answer"] = nasty[7], nasty[5]
    record["options"]["select"] = nasty[6]
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "edits.json").write_text(json.dumps(record))
    c = client(model_atlas, reports=[tmp_path / "evil"])
    for path in ["/report/evil", "/"]:
        text = c.get(path).text
        tags = re.findall(r"<script\b[^>]*>", text)
        assert all(t in ('<script src="/static/app.js">', '<script type="application/json" id="depth-data">') for t in tags), tags
        assert "<img" not in text and "window.__xss=1</script>" not in text and "window.__xss=3</script>" not in text
    text = c.get("/report/evil").text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in text and "&#x27;&lt;/div&gt;&#x27;" in text
    assert "../../api/atlas" not in text  # the neuron id shown and linked is built from the recorded layer and neuron
    assert c.get("/api/report/evil").json() == {k: v for k, v in record.items() if k not in ("format", "version", "originals")}


# ------------------------------------------------------------------ hostile requests and limits (issue 25)


@pytest.mark.parametrize("path, status, message", [
    ("/api/neuron/L0N" + "9" * 5000, 414, "the URL path has 5,015 characters: at most 2,048"),
    ("/api/neuron/L0N" + "9" * 1000, 400, "index has 1000 digits and is out of range"),
    ("/api/evidence/L0N" + "9" * 5000, 414, "at most 2,048"),
    ("/api/similar/L" + "9" * 5000 + "N0", 414, "at most 2,048"),
    ("/api/layer/" + "9" * 5000, 414, "at most 2,048"),
    ("/api/layer/" + "9" * 1000, 400, ("layer '9999999999999999999999999999999999999999...' (1,000 characters) is out of "
                                       "range: the atlas holds layers 0-1")),
    ("/api/layer/%C2%B2", 400, "layer '²' is not a layer number: expected e.g. /layer/1"),
    ("/api/layer/%D9%A1", 400, "layer '١' is not a layer number"),
    ("/api/search?q=coffee&top=%C2%B2", 400, "?top='²' is not a whole number: expected one from 1 to 1000 in digits 0-9"),
    ("/api/search?q=coffee&top=" + "9" * 20, 400, "is out of range: expected a whole number from 1 to 1000"),
    ("/api/search?q=" + ",".join(["dog"] * 65), 400, "at most 64 concepts per search, got 65: split the query into several searches"),
    ("/api/search?q=" + ",".join(["dog"] * 10_000), 414, "the query string has 40,001 bytes: at most 4,096"),
    ("/api/search", 405, "POST is not allowed at /api/search: use GET, HEAD (only POST"),
    ("/api/steer", 405, "GET is not allowed at /api/steer: use POST"),
])
def test_hostile_urls_answer_one_json_line_and_their_pages_an_html_page(worded, path, status, message):
    c = client(worded)
    method = "POST" if status == 405 and path == "/api/search" else "GET"
    r = c.request(method, path)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text[:300]
    assert message in r.json()["error"] and "\n" not in r.json()["error"]
    if path.startswith("/api/") and "/steer" not in path and "/evidence" not in path and "/similar" not in path:
        page = c.request(method, path[4:])
        assert page.status_code == status and page.headers["content-type"].startswith("text/html")
        assert "error: " in page.text and "Internal Server Error" not in page.text


def test_host_refusals_and_large_bodies_answer_in_the_apis_form(worded):
    c = client(worded)
    r = c.get("/api/atlas", headers={"host": "attacker.example"})
    assert r.status_code == 400 and r.json()["error"].startswith("Host 'attacker.example' is not this viewer's address")
    page = c.get("/", headers={"host": "attacker.example:8765"})
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html") and "Host &#x27;attacker" in page.text
    assert c.get("/", headers={"host": "[::1]:8765"}).status_code == 200
    big = json.dumps({"neuron": "L1N5", "text": "x" * 70_000}).encode()
    r = c.post("/api/steer", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most 65,536" in r.json()["error"]
    r = c.post("/api/steer", content=iter([b"[" * 40_000, b"]" * 40_000]), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "the request body has more than 65,536 bytes: send a shorter message"
    r = c.post("/api/steer", content=b"[" * 30_000 + b"]" * 30_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("the request body nests too deeply")
    for field, message in (("n", "'n' is '²': expected a whole number in digits 0-9"),
                           ("atlas", "'atlas' is '{}': expected an atlas's name, a string")):
        body = {"neuron": "L1N5", "value": "20x", "concept": "coffee", field: "²" if field == "n" else {}}
        r = c.post("/api/steer", json=body)
        assert r.status_code == 400 and r.json() == {"error": message}
    r = c.post("/api/steer", json={"neuron": "L0N" + "9" * 5000, "value": "20x", "concept": "coffee"})
    assert r.status_code == 400 and r.json()["error"].startswith("neuron id 'L0N999999999")


def _serve(atlas, *argv):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "neuronmap", "serve", str(atlas), "--port", "0", *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    while "neuronmap viewer at" not in line:
        line = p.stdout.readline()
        assert line or p.poll() is None, p.stderr.read()
    return p, re.search(r"http://\S+/", line).group(0)


@pytest.mark.parametrize("sig, rc, line", [("SIGTERM", 143, "terminated: viewer stopped"),
                                           ("SIGINT", 130, "interrupted: viewer stopped")])
def test_serve_exits_143_or_130_with_one_line_on_a_signal(worded, sig, rc, line):
    import signal
    import urllib.request

    p, url = _serve(worded)
    assert json.loads(urllib.request.urlopen(url + "api/atlases", timeout=30).read())["atlases"][0]["name"] == "atlas"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=30)
    assert p.returncode == rc and err == line + "\n"


@pytest.mark.slow
def test_serve_with_a_steering_job_running_exits_143_without_an_abort(tmp_path):
    """The demo model steering in the job thread when SIGTERM comes: it aborted ("terminate called without an active
    exception", exit -6) when the interpreter shut down around torch's threads."""
    import signal
    import time
    import urllib.request

    from neuronmap.mapping.mapper import map_model
    from neuronmap.mapping.part import MapOptions

    atlas = tmp_path / "demo29"
    map_model(None, atlas, MapOptions(layers="29", matrices="down"))
    p, url = _serve(atlas)
    try:
        body = json.dumps({"neuron": "L29N808", "value": "20x", "concept": "dog", "text": "hi"}).encode()
        req = urllib.request.Request(url + "api/steer", body, {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=30).read())["id"] == "1"
        deadline = time.time() + 300
        while time.time() < deadline:  # past the model load: clamp or generate runs torch in the job thread
            s = json.loads(urllib.request.urlopen(url + "api/jobs/1", timeout=30).read())
            if s["state"] != "queued" and s["step"] >= 1:
                break
            time.sleep(0.2)
        assert s["state"] == "running" and s["step"] >= 1, s
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143 and err == "terminated: viewer stopped\n"


def test_an_atlas_changed_while_served_is_checked_again(pair, tmp_path):
    # A file changed in place under a running viewer: the next request reopens the atlas, checks its sha256, and
    # answers one line naming the file instead of serving rows from it.
    import shutil

    a = tmp_path / "a"
    shutil.copytree(pair[0], a)
    c = client(a)
    assert c.get("/api/neuron/L0N1").status_code == 200
    b = bytearray((a / "neurons.parquet").read_bytes())
    i = len(b) // 2
    b[i] ^= 1
    b[i + 1] ^= 1
    (a / "neurons.parquet").write_bytes(bytes(b))
    r = c.get("/api/neuron/L0N1")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    msg = r.json()["error"]
    assert msg.startswith("atlas 'a' changed on disk and no longer opens: ") and "neurons.parquet is damaged" in msg
    assert "\n" not in msg
    shutil.copy(pair[0] / "neurons.parquet", a / "neurons.parquet")  # put right: served again
    assert c.get("/api/neuron/L0N1").status_code == 200


def test_a_process_exiting_with_a_job_running_waits_for_its_step_instead_of_aborting():
    # Python kills daemon threads at exit; one inside torch aborted the process ("terminate called without an active
    # exception", exit 134), which failed the test run that had submitted steering jobs.
    import subprocess
    import sys

    code = ("import time, torch\n"
            "from neuronmap.viewer.jobs import JobQueue\n"
            "q = JobQueue()\n"
            "def work(_):\n"
            "    x = torch.randn(600, 600)\n"
            "    t = time.time()\n"
            "    while time.time() - t < 2: x = torch.tanh(x @ x.T / 600)\n"
            "    return {'ok': True}\n"
            "second = q.submit({}, [('a', 'work', work), ('b', 'more work', work)])\n"
            "queued = q.submit({}, [('a', 'work', work)])\n"
            "time.sleep(0.5)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and "terminate called" not in p.stderr, (p.returncode, p.stderr[-500:])


def test_a_closed_queue_takes_no_job_and_drops_the_queued():
    import threading
    import time

    from neuronmap.viewer.jobs import JobQueue

    q, started = JobQueue(), threading.Event()
    running = q.submit({}, [("a", "wait", lambda _: (started.set(), time.sleep(0.3), {})[2]), ("b", "never", lambda _: {})])
    queued = q.submit({}, [("a", "never", lambda _: {})])
    assert started.wait(10)
    q.close(timeout=10)
    assert q.status(running.id)["error"] == "the viewer stopped before this job finished"
    assert q.status(queued.id)["error"] == "the viewer stopped before this job ran"
    with pytest.raises(NeuronmapError, match="the viewer is stopping: it takes no new jobs"):
        q.submit({}, [("a", "x", lambda _: {})])
