"""deep_ep_ops.cuda.stall_watch on CPU: a transfer pending past the timeout is reported once,
naming what the stage said it waits for, and the next transfer raises it while it is still
pending; finished transfers are forgotten; the background thread reports without any call; a
capturing caller raises what was reported without testing completion."""
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
