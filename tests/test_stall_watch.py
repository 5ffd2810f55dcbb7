"""deep_ep_ops.cuda.stall_watch on CPU: a transfer pending past the timeout is reported once,
naming what the stage said it waits for, and the next transfer raises it while it is still
pending; finished transfers are forgotten; the background thread reports without any call; a
capturing caller raises what was reported without testing completion; ``on_stall`` (the
stage's abort) acts once per stalled transfer, again on later passes while it is refused, and
never on a transfer that finished meanwhile."""
from __future__ import annotations

import threading
import time

import pytest

from deep_ep_ops.cuda.stall_watch import StallWatch

WAITS = ("deep_ep.dispatch: rank 0 (host 0, local index 0) waits for its rail peers on host 1 "
         "(rank 2)")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reports_once_then_raises_while_pending() -> None:
    clock, reports = _Clock(), []
    watch = StallWatch(5.0, clock=clock, report=reports.append)
    finished = threading.Event()
    watch.track(finished.is_set, WAITS)
    clock.now = 4.9
    watch.check()
    assert reports == [] and watch.stalls == []
    clock.now = 5.2
    watch.check()
    watch.check()
    assert len(reports) == 1 and reports == watch.stalls
    assert reports[0].startswith(WAITS) and "5.2 s" in reports[0] and "timeout_s=5" in reports[0]
    with pytest.raises(RuntimeError, match=r"rank 0 \(host 0.*host 1 \(rank 2\).*never finished"):
        watch.raise_if_stalled()  # what the stage calls before its next transfer
    finished.set()  # the peer came after all: nothing pending, nothing raised
    watch.raise_if_stalled()
    watch.stop()


def test_finished_transfers_are_forgotten() -> None:
    clock, reports = _Clock(), []
    watch = StallWatch(1.0, clock=clock, report=reports.append)
    for _ in range(3):
        watch.track(lambda: True, WAITS)
    clock.now = 10.0
    watch.raise_if_stalled()
    assert reports == []
    watch.stop()


def test_thread_reports_without_a_call() -> None:
    reports, started_in = [], []
    # (the CUDA stage relaxes the thread's graph-capture mode here)
    watch = StallWatch(0.2, poll_s=0.05, report=reports.append,
                       on_thread_start=lambda: started_in.append(threading.current_thread()))
    watch.track(lambda: False, WAITS)
    deadline = time.monotonic() + 5
    while not reports and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.stop()
    assert len(reports) == 1 and reports[0].startswith(WAITS)
    assert started_in == [watch._thread] and watch._thread is not threading.current_thread()


def test_query_false_tests_no_completion() -> None:
    """While capturing a CUDA graph the stage may not query events: ``query=False`` raises a
    stall already reported and otherwise calls nothing."""
    clock, calls, me = _Clock(), [], threading.current_thread()

    def pending() -> bool:
        if threading.current_thread() is me:  # (the watch's own thread may test any time)
            calls.append(clock.now)
        return False

    watch = StallWatch(1.0, clock=clock, report=lambda text: None)
    watch.track(pending, WAITS)
    clock.now = 0.5
    watch.raise_if_stalled(query=False)  # nothing reported yet, nothing tested
    assert calls == []
    clock.now = 5.0
    watch.check()
    calls.clear()
    with pytest.raises(RuntimeError, match="never finished"):
        watch.raise_if_stalled(query=False)
    assert calls == []
    watch.stop()


def test_on_stall_retries_while_refused_and_acts_once() -> None:
    clock, calls, busy = _Clock(), [], [True]
    me = threading.current_thread()

    def abort(text: str) -> bool:
        if threading.current_thread() is me:  # (the watch's own thread may pass any time)
            calls.append(text)
        return not busy[0]  # refused while "another thread is inside a call"

    # (the thread passes once when it starts, then sleeps: this test drives the passes)
    watch = StallWatch(1.0, poll_s=3600, clock=clock, report=lambda text: None, on_stall=abort)
    watch.track(lambda: False, WAITS)
    clock.now = 2.0
    watch.check()
    assert len(calls) == 1 and calls[0].startswith(WAITS)
    watch.check()  # still refused: asked again
    assert len(calls) == 2 and calls[1] == calls[0]
    busy[0] = False
    watch.check()  # acts now (unless the watch's thread just did)
    n = len(calls)
    assert n in (2, 3)
    watch.check()  # done: not asked any more
    assert len(calls) == n
    watch.stop()


def test_on_stall_spares_a_transfer_that_finished() -> None:
    clock, calls = _Clock(), []
    finished = threading.Event()
    watch = StallWatch(1.0, poll_s=3600, clock=clock, report=lambda text: None,
                       on_stall=lambda text: calls.append(text) or False)
    watch.track(finished.is_set, WAITS)
    clock.now = 2.0
    watch.check()  # reported and refused
    finished.set()  # the peer came before the stage could be aborted
    n = len(calls)
    watch.check()
    assert len(calls) == n and len(watch.stalls) == 1
    watch.stop()
