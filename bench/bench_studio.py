"""How long the studio takes from pressing Generate to playable audio, measured in a real browser.

Starts `midiforge studio` on a checkpoint (in this process, on 127.0.0.1), drives Debian's chromium through
Playwright: sets the options, presses Generate and times until every sample's <audio> has loaded its metadata
(playable), and until the first one has. Prints a table and, with --screenshot, saves the page.

    .venv/bin/python bench/bench_studio.py demo/ckpt --seed 0 -n 3 --max-seconds 45 --top-p 0.95 \
        --screenshot docs/studio.png

Needs `pip install -e .[browser]` and `apt install chromium`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from midiforge.studio.server import Studio, serve_in_thread

READY = """(n) => { const a = [...document.querySelectorAll('#results .sample audio')];
  return a.length === n && a.every((x) => x.readyState >= 1 && x.duration > 0); }"""
FIRST = "() => [...document.querySelectorAll('#results .sample audio')].some((x) => x.readyState >= 1)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--seed", default="0")
    ap.add_argument("-n", "--num-samples", default="3")
    ap.add_argument("--max-seconds", default="45")
    ap.add_argument("--top-p", default="0.95")
    ap.add_argument("--prompt", help="a MIDI prompt to upload")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--screenshot", help="save the page (after the last run) to this PNG")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(tempfile.mkdtemp(prefix="bench_studio_"))
    studio = Studio([args.checkpoint], out)
    server, url = serve_in_thread(studio)
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100}, bypass_csp=True)
            page.goto(url)
            page.wait_for_selector("body[data-ready]")
            if args.prompt:
                page.set_input_files("#upload", args.prompt)
                page.wait_for_function(
                    "() => document.querySelector('#prompt-now').textContent.includes('notes')"
                )
            for field, value in (("seed", args.seed), ("num_samples", args.num_samples),
                                 ("max_seconds", args.max_seconds), ("top_p", args.top_p)):  # fmt: skip
                page.fill(f"#opt-{field}", value)
            for _ in range(args.repeats):
                before = len(studio.queue.jobs)
                t0 = time.perf_counter()
                page.click("#generate")  # clears the results area before it sends the request
                page.wait_for_function(FIRST, timeout=0)
                first = time.perf_counter() - t0
                page.wait_for_function(READY, arg=int(args.num_samples), timeout=0)
                every = time.perf_counter() - t0
                job = list(studio.queue.jobs.values())[before]
                gen = next((ln for ln in job.report if ln.startswith("generated ")), "")
                rows.append((first, every, gen))
            if args.screenshot:
                page.screenshot(path=args.screenshot, full_page=False)
            browser.close()
    finally:
        server.shutdown()
        studio.queue.close()
        shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f}")
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    print(f"machine: {cpu or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, no GPU; checkpoint {args.checkpoint}")  # fmt: skip
    print(
        f"options: --seed {args.seed} -n {args.num_samples} --max-seconds {args.max_seconds} --top-p {args.top_p}"
    )
    print("| run | Generate → first audio playable | → all audio playable | generate's own line |")
    print("|---|---|---|---|")
    for i, (first, every, gen) in enumerate(rows, 1):
        print(f"| {i} | {first:.1f} s | {every:.1f} s | {gen} |", flush=True)


if __name__ == "__main__":
    main()
