"""What a crash or a hang costs `map_isolated` (the crash-isolated worker pool of prepare and demo-data).

    .venv/bin/python bench/bench_workers.py [--tasks 400] [--jobs 2] [--timeout 1.0] [--repeat 3]

Each scenario maps a trivial function over --tasks tasks; "crash" makes one task segfault its worker, "hang"
makes one task sleep far past --timeout. Times are the best of --repeat runs, after a warm-up that starts the
worker server. Goal: a hang costs about --timeout plus at most a second of polling (the main loop polls once a
second), never the length of the hang; a crash costs about as much as starting one worker.
The test suite checks what these runs return (every task answered once, the right failure reasons); only this
script looks at the clock.
"""

from __future__ import annotations

import argparse
import ctypes
import operator
import os
import platform
import time

from midiforge.data.workers import map_isolated

HANG_S = 60.0  # how long the hanging task would sleep: far longer than any sensible --timeout


def scenario_tasks(name: str, n: int) -> list[tuple]:
    tasks = [(abs, -i) for i in range(n)]
    if name == "crash":
        tasks[n // 2] = (ctypes.string_at, 0)  # segfault
    elif name == "hang":
        tasks[n // 2] = (time.sleep, HANG_S)
    return tasks


def run(name: str, n: int, jobs: int, timeout: float) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = list(map_isolated(operator.call, scenario_tasks(name, n), jobs=jobs, timeout=timeout))
    elapsed = time.perf_counter() - t0
    assert sorted(i for i, _, _ in results) == list(range(n)), "a task was lost or answered twice"
    return elapsed, sum(not ok for _, ok, _ in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=400)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1.0, help="per-task timeout in seconds (default 1.0)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    print(f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{args.tasks} tasks, {args.jobs} workers, timeout {args.timeout:g} s, best of {args.repeat}\n")
    run("clean", 4, 1, args.timeout)  # warm-up: starts the worker server
    print("| scenario | failed tasks | seconds | vs clean |")
    print("|---|---:|---:|---:|")
    clean = None
    for name in ("clean", "crash", "hang"):
        best, failed = min(run(name, args.tasks, args.jobs, args.timeout) for _ in range(args.repeat))
        clean = best if clean is None else clean
        print(f"| {name} | {failed} | {best:.2f} | {best - clean:+.2f} s |")
    print(
        f"\n(a hang of {HANG_S:g} s should cost about the {args.timeout:g} s timeout plus up to 1 s of polling)"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
