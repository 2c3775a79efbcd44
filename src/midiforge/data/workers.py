"""Crash-isolated worker processes: map a function over tasks so that a task which kills or hangs its worker
(a parser segfault, an endless loop) costs that task only, reported with a reason, never the whole run.

Used by `prepare` (MIDI → JSON), the dataset's token cache build and `demo-data`.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait

# A file that keeps one parser busy this long is treated like a crash: symusic parses a typical file in <1 ms.
DEFAULT_FILE_TIMEOUT_S = 120.0


def default_jobs() -> int:
    """The CPUs this process may run on (the affinity mask, not the machine's count, where known)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------
# Crash-isolated parallel map
# ---------------------------------------------------------------------------------------------------------


def _mp_context():
    # forkserver: workers fork from a clean single-threaded server (no inherited tqdm/torch threads), cheaply.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["midiforge.data.prepare"])
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_main(conn, fn: Callable, shared: tuple = ()) -> None:
    """Run ``fn(*args, *shared)`` for each task of each batch received; answer one message per task, in order.

    Answering per task (not per batch) is what lets the parent name the task that killed this process: it is
    the first one of the batch without an answer.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:  # a parser crash is an expected event here: no core dump in the user's folder for it
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):
        pass
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for i, args in batch:
            try:
                conn.send((i, True, fn(*args, *shared)))
            except Exception as e:  # fn handles expected failures itself; this is a bug or e.g. MemoryError
                conn.send((i, False, f"internal error: {type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, fn: Callable, shared: tuple = ()):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, shared), daemon=True)
        self.proc.start()
        child.close()
        self.inflight: collections.deque[int] = collections.deque()
        self.since = time.monotonic()  # when the task at the head of ``inflight`` started

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"parser crashed ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"parser crashed (worker exit code {exitcode})"


def map_isolated(
    fn: Callable,
    tasks: Sequence[tuple],
    jobs: int | None = None,
    *,
    timeout: float | None = DEFAULT_FILE_TIMEOUT_S,
    batch_size: int | None = None,
    shared: tuple = (),
) -> Iterator[tuple[int, bool, object]]:
    """Run ``fn(*tasks[i], *shared)`` in ``jobs`` worker processes; yield ``(i, ok, value)`` in completion order.

    ``ok`` is True with ``fn``'s return value, or False with a reason string when the call raised, killed
    its worker (segfault, ``os._exit``) or ran longer than ``timeout`` seconds. A dead worker is replaced and
    the other tasks carry on, so one bad input never costs more than itself. ``fn`` must be a module-level
    function (it is pickled by reference) that handles its own expected errors. ``shared`` (e.g. a tokenizer)
    reaches each worker process once, when it starts, instead of with every batch of tasks.
    """
    n = len(tasks)
    if n == 0:
        return
    jobs = max(1, min(jobs or default_jobs(), n))
    # Batches amortise the message round trip; small enough that the last ones finish together.
    batch_size = batch_size or max(1, min(64, n // (jobs * 8)))
    ctx = _mp_context()
    pending = collections.deque(range(n))
    workers: list[_Worker] = []
    remaining = n

    def refill(w: _Worker) -> None:
        # Keep up to two batches queued at each worker, so it never waits for the parent between batches.
        while pending and len(w.inflight) <= batch_size:
            batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            try:
                w.conn.send([(i, tasks[i]) for i in batch])
            except OSError:  # it just died: the batch goes back, the death is handled by the main loop
                pending.extendleft(reversed(batch))
                return
            if not w.inflight:
                w.since = time.monotonic()
            w.inflight.extend(batch)

    def drain(w: _Worker) -> Iterator[tuple[int, bool, object]]:
        nonlocal remaining
        while w.conn.poll():
            i, ok, value = w.conn.recv()
            w.inflight.remove(i)
            w.since = time.monotonic()
            remaining -= 1
            yield i, ok, value

    finished = False
    try:
        workers = [_Worker(ctx, fn, shared) for _ in range(jobs)]
        for w in workers:
            refill(w)
        while remaining:
            by_handle = {h: w for w in workers for h in (w.conn, w.proc.sentinel)}
            ready = wait(list(by_handle), timeout=1.0 if timeout else None)
            for w in {id(by_handle[h]): by_handle[h] for h in ready}.values():
                try:
                    yield from drain(w)
                except (EOFError, OSError):
                    continue  # died: handled below
                refill(w)
            now = time.monotonic()
            for w in list(workers):
                if w.proc.is_alive():
                    if not (timeout and w.inflight and now - w.since > timeout):
                        continue
                    why = f"parser timed out (> {timeout:g} s)"
                else:
                    why = None
                    try:  # answers sent before it died are still in the pipe
                        yield from drain(w)
                    except Exception:  # EOF, or a message cut short by the crash
                        pass
                w.stop(kill=True)
                workers.remove(w)
                if w.inflight:
                    # Answers come in task order, so the first unanswered task is the one it died on.
                    culprit = w.inflight.popleft()
                    pending.extendleft(reversed(w.inflight))
                    remaining -= 1
                    yield culprit, False, why or _death_reason(w.proc.exitcode)
                if pending:
                    workers.append(_Worker(ctx, fn, shared))
                    refill(workers[-1])
        finished = True
    finally:
        for w in workers:
            w.stop(kill=not finished)


# ---------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------
