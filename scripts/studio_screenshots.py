"""Screenshots of the studio at 1400x900 and 400x800 (the README's), taken in Debian's Chromium via Playwright.

    python scripts/studio_screenshots.py CKPT PROMPT.mid [--out docs/img] [--bars 5-8]

Serves the studio on 127.0.0.1 with CKPT, uploads PROMPT.mid, selects the bars on the piano roll, generates two
samples, and writes studio-wide.png and studio-phone.png. tests/test_studio_browser.py runs the same ``shoot``
with a tiny checkpoint, so the screenshots come from the page as the test drives it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

WIDE, PHONE = {"width": 1400, "height": 900}, {"width": 400, "height": 800}


def until(page, js: str, timeout_s: float = 60.0, arg=None):
    """Poll a JavaScript function (string) until it returns a truthy value (works under the page's CSP,
    unlike page.wait_for_function, whose string predicates the CSP forbids); its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(js, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout_s} s: {js}")
        time.sleep(0.05)


def drag_bars(page, canvas, first: int, last: int) -> None:
    """Drag with the mouse across bars first..last of a piano-roll canvas (an ElementHandle)."""
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x0 = canvas.evaluate("(c, n) => c.roll.barX(n)[0]", first) + 2
    x1 = canvas.evaluate("(c, n) => c.roll.barX(n)[1]", last) - 2
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + x0, y)
    page.mouse.down()
    page.mouse.move(box["x"] + (x0 + x1) / 2, y, steps=4)
    page.mouse.move(box["x"] + x1, y, steps=4)
    page.mouse.up()


def shoot(browser, url: str, prompt: Path, out: Path, *, bars=(5, 8), options=None, timeout_s=600.0):
    """Drive the page (upload, select bars, generate) and screenshot it at both sizes: the two PNG paths, and
    the widths in CSS px of the results column and of a sample's piano roll at phone size."""
    out.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    page.set_input_files("#upload", str(prompt))
    canvas = page.wait_for_selector("#prompt-roll canvas")
    drag_bars(page, canvas, *bars)
    for dest, value in (options or {"seed": "3", "num_samples": "2", "max_tokens": "256"}).items():
        page.fill(f"#opt-{dest}", value)
    page.click("#generate")
    until(page, "() => document.querySelectorAll('#results .sample canvas').length > 0", timeout_s)
    page.evaluate("() => document.querySelector('#work').scrollTo(0, 0)")
    time.sleep(0.3)  # the canvases draw on the next animation frame
    wide = out / "studio-wide.png"
    page.screenshot(path=str(wide))
    page.set_viewport_size(PHONE)
    page.reload()  # the same tab: it shows its own latest job again
    until(page, "() => document.querySelectorAll('#results .sample canvas').length > 0", timeout_s)
    page.evaluate("() => document.querySelector('#job-head').scrollIntoView()")  # the results, below the form
    time.sleep(0.3)
    phone = out / "studio-phone.png"
    page.screenshot(path=str(phone))
    widths = page.evaluate(
        """() => ({ work: document.querySelector('#work').getBoundingClientRect().width,
                    roll: document.querySelector('#results .sample canvas').getBoundingClientRect().width })"""
    )
    context.close()
    return [wide, phone], widths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("prompt")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--bars", default="5-8", help="bars to select on the piano roll (default 5-8)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from midiforge.studio.server import Studio, serve_in_thread

    first, last = (int(x) for x in args.bars.split("-"))
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio([args.checkpoint], Path(tmp) / "out")
        server, url = serve_in_thread(studio)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                paths, _ = shoot(browser, url, Path(args.prompt), Path(args.out), bars=(first, last))
                for path in paths:
                    print(path)
                browser.close()
        finally:
            server.shutdown()
            server.server_close()
            studio.queue.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
