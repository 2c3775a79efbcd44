"""The studio in a real headless browser: Debian's Chromium driven by Playwright's Python client (pointed at
that binary: nothing downloads a browser build). Loads the page, uploads a POP909 prompt from the shared
corpus, sets a seed, generates two samples from a tiny checkpoint trained here, and checks what a person would
get: two piano rolls drawn, two audio elements that play, two MIDI downloads whose notes are those of
`midiforge generate` with the same seed and arguments. Takes a screenshot.

Skipped on a developer's machine without Chromium or Playwright; under CI=true (where scripts/test.sh installs
both) a missing browser fails the test instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import corpus_dir
from test_studio import JOB_GUARD_S, notes_of, train_tiny

from midiforge import cli
from midiforge.studio.server import Studio, serve_in_thread

pytestmark = pytest.mark.slow


def chromium() -> str:
    """The Chromium binary, or skip (fail under CI=true)."""
    path = (
        os.environ.get("MIDIFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        why = "the browser test needs Debian's chromium and the playwright package (scripts/test.sh installs both)"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return path


WATCH_PROGRESS = """() => {
  // The progress indicator may come and go between two looks: a MutationObserver sees it whenever it shows.
  const progress = document.querySelector("#progress");
  window.sawProgress = false;
  new MutationObserver(() => { if (!progress.hidden) window.sawProgress = true; })
    .observe(progress, { attributes: true, subtree: true, characterData: true, childList: true });
}"""

PLAYS = """async (audio) => {
  // Muted so that no audio device is needed; it plays when its time advances past 0.
  audio.muted = true;
  if (audio.readyState < 1) await new Promise((ok, bad) => {
    audio.addEventListener("loadedmetadata", ok, { once: true });
    audio.addEventListener("error", () => bad(new Error("audio error " + audio.error.code)), { once: true });
  });
  await audio.play();
  await new Promise((ok) => { const f = () => audio.currentTime > 0 ? ok() : requestAnimationFrame(f); f(); });
  audio.pause();
  return { duration: audio.duration, time: audio.currentTime };
}"""


def test_generate_two_samples_in_a_real_browser(tmp_path):
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    prompt = corpus_dir("pop909", "001.mid")
    ckpt = train_tiny(tmp_path / "data")
    studio = Studio([ckpt], tmp_path / "out")
    server, url = serve_in_thread(studio)
    timeout_ms = JOB_GUARD_S * 1000
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=browser_path,
                args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
            )
            # bypass_csp: Playwright's polling predicates are evaluated strings, which the page's CSP forbids.
            page = browser.new_page(
                viewport={"width": 1400, "height": 1000}, accept_downloads=True, bypass_csp=True
            )
            failed, requested = [], []
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url)
            page.wait_for_selector("body[data-ready]")
            page.set_input_files("#upload", str(prompt))
            page.wait_for_function("document.querySelector('#prompt-now').textContent.includes('001.mid')")
            page.fill("#opt-seed", "7")
            page.fill("#opt-num_samples", "2")
            page.fill("#opt-max_tokens", "48")
            page.fill("#opt-prompt_bars", "2")
            page.evaluate(WATCH_PROGRESS)
            page.click("#generate")
            page.wait_for_function(
                "document.querySelectorAll('#results .sample').length === 2", timeout=timeout_ms
            )
            assert (
                page.evaluate("window.sawProgress")
                and page.is_hidden("#progress")
                and page.is_hidden("#error")
            )
            assert "seed 7" in page.inner_text("#job-head")

            cards = page.query_selector_all("#results .sample")
            cli_out = tmp_path / "cli" / "s.mid"
            argv = ["generate", str(ckpt), "-o", str(cli_out), "--prompt", str(prompt), "--prompt-bars", "2"]
            assert cli.main([*argv, "--seed", "7", "-n", "2", "--max-tokens", "48"]) == 0
            for i, card in enumerate(cards, start=1):
                img = card.query_selector("img.pianoroll")
                img.scroll_into_view_if_needed()
                page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img)
                assert img.evaluate("(img) => img.naturalWidth") >= 600
                played = card.query_selector("audio").evaluate(PLAYS)
                assert played["duration"] > 0 and played["time"] > 0
                with page.expect_download() as download:
                    card.query_selector("a.download").click()
                data = Path(download.value.path()).read_bytes()
                assert notes_of(data) == notes_of((cli_out.parent / f"s_{i}.mid").read_bytes())
                assert len(notes_of(data)) > 0
            shot = tmp_path / "studio.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            # "Continue from this" → the prompt line names the sample; the history lists the job.
            cards[1].query_selector("button.continue").click()
            assert page.inner_text("#prompt-now").startswith("prompt: sample 2")
            assert page.locator("#history li").count() == 1
            # A corrupt upload: an error line in the page, and the page still works.
            bad = tmp_path / "bad.mid"
            bad.write_bytes(b"MThd not really")
            page.set_input_files("#upload", str(bad))
            page.wait_for_selector("#error:not([hidden])")
            assert page.inner_text("#error").startswith("not a readable MIDI file")
            assert failed == []  # every request the page made was answered...
            assert all(u.startswith((url, "data:", "blob:")) for u in requested)  # ...by the studio alone
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
        studio.queue.close()
