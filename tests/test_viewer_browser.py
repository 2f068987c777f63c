"""The viewer in a real browser: Debian's Chromium driven by Playwright, against a real `neuronmap serve` process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from neuronmap.atlas.handle import Atlas
from neuronmap.testing.synthetic import synthetic_atlas

CHROMIUM = "/usr/bin/chromium"


@contextmanager
def serving(*atlases: Path):
    """`neuronmap serve ATLAS... --port 0` as a subprocess; yields its URL, stops it with Ctrl-C."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "neuronmap", "serve", *map(str, atlases), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in p.stdout:
            m = re.search(r"neuronmap viewer at (http://\S+/)", line)
            if m:
                url = m.group(1)
                break
        assert url, p.stderr.read()
        yield url
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 130  # Ctrl-C: 130 and one line, as the README promises
        err = p.stderr.read()
        assert "Traceback" not in err and err.rstrip().endswith("interrupted: viewer stopped")


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run `make test` (it installs Debian's chromium) or apt-get install chromium"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    pg.close()


def test_search_click_through_and_keyboard(demo_atlas, page):
    with serving(demo_atlas) as url:
        page.goto(url)
        expect(page.locator("#depth-chart svg path.line")).to_have_count(3)  # one line per matrix
        page.select_option("#metric", "entropy_p50")
        expect(page.locator("#depth-chart svg")).to_have_attribute("aria-label", "median entropy (nats)")
        page.keyboard.press("/")  # focuses the search box
        page.keyboard.type("coffee")
        page.keyboard.press("Enter")
        page.wait_for_url("**/search?q=coffee*")
        expect(page.locator("p.method")).to_have_attribute("data-method", "exact")
        page.locator("table.hits a").first.click()
        page.wait_for_url("**/neuron/L29N750")
        card = page.locator('section.card[data-matrix="up"][data-pole="+"]')
        row = card.locator("tr", has=page.locator("code.tok", has_text=re.compile(r"^' coffee'$")))
        up = Atlas.open(demo_atlas).show("L29N750", stored=True).rows.query("matrix == 'up' and pole == '+'").iloc[0]
        p = dict(zip(up["tokens"], up["probs"]))[" coffee"]
        expect(row).to_contain_text(f"{p:.4f}")  # its stored probability, as `show` gives it
        expect(page.locator("#similar table").first).to_be_visible(timeout=30_000)
        page.fill("#q", "L29N808")
        page.keyboard.press("Enter")
        page.wait_for_url("**/neuron/L29N808")
        assert page.errors == []


@pytest.mark.slow
def test_steering_shows_the_clamped_result(demo_atlas, page):
    with serving(demo_atlas) as url:
        page.goto(url + "neuron/L29N808")
        page.fill("input[name=concept]", "dog")
        page.fill("input[name=n]", "2")
        page.click("#steer button")
        expect(page.locator("#steer-status")).to_contain_text(re.compile("running|queued"))
        clamped = page.locator(".clamp-result tr.clamped")
        expect(clamped).to_be_visible(timeout=180_000)
        ratio = float(re.search(r"([\d.]+)x", clamped.inner_text()).group(1))
        assert ratio > 2  # P(dog) rises when the dog neuron is clamped (measured 95x in docs/intervene.md)
        expect(page.locator(".generate-result .clamped li")).to_have_count(2, timeout=180_000)
        expect(page.locator("#steer-status")).to_contain_text("done")
        assert page.errors == []


def test_compare_page_of_two_atlases(tmp_path, page):
    a = synthetic_atlas(tmp_path / "base", 4, 64, 400, k=5, seed=1)
    b = synthetic_atlas(tmp_path / "tuned", 4, 64, 400, k=5, seed=1, change_rate=0.2)
    with serving(a, b) as url:
        page.goto(url)
        page.click("text=compare")
        page.wait_for_url("**/compare?a=base&b=tuned")
        expect(page.locator("#depth-chart svg path.line")).to_have_count(6)  # 3 matrices x 2 poles
        link = page.locator("table a[href*='/neuron/']").first
        nid = link.inner_text()
        link.click()
        page.wait_for_url(f"**/neuron/{nid}")
        expect(page.locator("h1")).to_contain_text(nid)
        assert page.errors == []


def test_hostile_tokens_and_paths_in_the_browser(nasty, page):
    with serving(nasty) as url:
        for path in ["", "neuron/L1N5", "layer/1", "layer/0?matrix=down", "search?q=%3Cscript%3E"]:
            page.goto(url + path)
            page.wait_for_load_state("networkidle")
            assert page.evaluate("window.__xss") is None, path
            assert page.locator("img").count() == 0
        page.goto(url + "layer/0?matrix=down&sort=neuron")
        shown = page.locator("code.tok").all_inner_texts()
        assert "'<script>window.__xss=1</script>'" in shown or "'</div>'" in shown  # legible, as text
        page.goto(url + "neuron/L1N5")
        page.wait_for_selector("#similar table")  # built by app.js from JSON: still text only
        assert page.evaluate("window.__xss") is None
        for path in ["neuron/..%2F..%2Fetc%2Fpasswd", "static/..%2F..%2F..%2Fpyproject.toml", "?atlas=/etc"]:
            r = page.goto(url + path)
            assert r.status == 404, path
            assert "root:" not in page.content() and "[project]" not in page.content()
            expect(page.locator("main")).to_contain_text(re.compile("no page at|unknown atlas"))
        assert page.errors == []


def test_removal_report_links_to_the_neuron_page(tiny_removal, page):
    edited, printed, model_atlas, _ = tiny_removal
    with serving(model_atlas, "--report", edited) as url:
        page.goto(url)
        page.locator("nav .reports a", has_text="no-dog").click()
        page.wait_for_url("**/report/no-dog")
        expect(page.locator("h1")).to_contain_text("Removal report no-dog")
        ratio = printed["steps"][0]["measures"][0]["ratio"]
        expect(page.locator("table.measures")).to_contain_text(f"{ratio:.3g}x")
        assert page.evaluate("window.__xss") is None  # the hostile eliciting prompt is text
        expect(page.locator("table.measures")).to_contain_text("<script>window.__xss=4</script> the animal is a")
        e = printed["steps"][0]["edits"][0]
        page.locator("table.edits a", has_text=re.compile(f"^{e['id']}$")).first.click()
        page.wait_for_url(f"**/neuron/{e['id']}")  # model-atlas is the first atlas: no ?atlas= in its links
        expect(page.locator("h1")).to_contain_text(e["id"])
        expect(page.locator(f'section.card[data-matrix="{e["matrix"]}"]').first).to_be_visible()
        assert page.errors == []
