"""Reports inter-host transfers that do not finish: which host and rank this rank waits for.

The NCCL rail stage (deep_ep_ops.cuda.interhost) enqueues its transfers and returns; a rail peer
that never posts its side leaves them pending on the GPU, and this rank then blocks at its next
sync with no word of why. ``StallWatch`` follows each enqueued transfer (a completion test,
e.g. a CUDA event's ``query``), and once one has been pending longer than the Buffer's
``timeout_s`` a background thread prints, once, which op waits for which hosts and rail-peer
ranks, and keeps the text in ``stalls``. It then hands the text to ``on_stall`` (the stage's
abort: the pending transfers end, so a rank blocked in a sync wakes up, and every later call on
the stage raises the text), again on later passes while ``on_stall`` answers that it could not
act yet (another thread is inside a call on the stage). Without ``on_stall``, the next
transfer the stage enqueues raises the stall while it is still pending.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class _Pending:
    done: Callable[[], bool]
    what: str  # "deep_ep.dispatch: rank 0 (host 0, local index 0) waits for its rail peers on
    #             host 1 (rank 2), host 2 (rank 4)"
    since: float
    report: str = ""  # once reported
    handled: bool = False  # on_stall acted on it


class StallWatch:
    """Pending transfers of one stage, checked every ``poll_s`` by a daemon thread that runs
    only while something is pending."""

    def __init__(self, timeout_s: float, poll_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic,
                 report: Optional[Callable[[str], None]] = None,
                 on_thread_start: Optional[Callable[[], None]] = None,
                 on_stall: Optional[Callable[[str], bool]] = None) -> None:
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.stalls: list[str] = []
        self._clock = clock
        self._report = report or (lambda text: print(text, file=sys.stderr, flush=True))
        self._pending: collections.deque[_Pending] = collections.deque()
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._on_thread_start = on_thread_start
        self._on_stall = on_stall

    def track(self, done: Callable[[], bool], what: str) -> None:
        """Follow one transfer (the stage calls ``raise_if_stalled`` before enqueuing it)."""
        with self._lock:
            self._pending.append(_Pending(done, what, self._clock()))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deep_ep_ops-stall-watch",
                                                daemon=True)
                self._thread.start()
            self._lock.notify()

    def check(self) -> None:
        """One pass: drop finished transfers, report the ones pending past the timeout."""
        with self._lock:
            while self._pending and self._pending[0].done():
                self._pending.popleft()
            now = self._clock()
            for p in self._pending:
                if not p.report and now - p.since > self.timeout_s and not p.done():
                    p.report = (f"{p.what}: the transfer is still pending after "
                                f"{now - p.since:.1f} s (timeout_s={self.timeout_s:g}); that "
                                "rank stalled, left, or took another path through the ops")
                    self.stalls.append(p.report)
                    self._report(p.report)
            if self._on_stall is None:
                return
            for p in self._pending:  # only what is still pending: a peer that came is not cut
                if p.report and not p.handled:
                    if not self._on_stall(p.report):
                        break  # the stage is inside a call on another thread: next pass
                    p.handled = True

    def raise_if_stalled(self, query: bool = True) -> None:
        """RuntimeError naming the stalled peer while a reported transfer is still pending.
        ``query=False`` (a caller that is capturing a CUDA graph, where a completion test is
        not allowed) only looks at what the thread has reported."""
        if query:
            self.check()
        with self._lock:
            stuck = [p.what for p in self._pending if p.report]
        if stuck:
            raise RuntimeError(f"{stuck[0]}: an earlier inter-host transfer never finished "
                               f"(> {self.timeout_s:g} s); destroy this Buffer and the process "
                               "group")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def _run(self) -> None:
        if self._on_thread_start is not None:
            self._on_thread_start()
        while True:
            with self._lock:
                while not self._pending and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
            self.check()
            time.sleep(self.poll_s)
