"""Screenshots of the viewer for the README: `python tools/screenshots.py demo-atlas tuned-atlas -o docs/img`.

Serves the atlases with `neuronmap serve` and drives Debian's Chromium through Playwright, as the browser tests do.
The first atlas must have weights (for the similar vectors and the steering run); the second is compared with it.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("atlases", nargs=2)
    ap.add_argument("-o", "--out", default="docs/img")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-m", "neuronmap", "serve", *args.atlases, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = next(m.group(1) for line in p.stdout if (m := re.search(r"viewer at (http://\S+/)", line)))
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium")
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.screenshot(path=out / "viewer-atlas.png")
            page.goto(url + "search?q=coffee")
            page.screenshot(path=out / "viewer-search.png")
            page.goto(url + "layer/29?matrix=up&class=word")
            page.screenshot(path=out / "viewer-layer.png")
            page.goto(url + "compare")
            page.screenshot(path=out / "viewer-compare.png", full_page=True)
            page.goto(url + "neuron/L29N808")
            page.wait_for_selector("#similar table")
            page.fill("input[name=concept]", "dog")
            page.click("#steer button")
            page.wait_for_selector(".generate-result .clamped li", timeout=600_000)
            page.screenshot(path=out / "viewer-neuron.png", full_page=True)
            b.close()
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)
    print(f"wrote {out}/viewer-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
